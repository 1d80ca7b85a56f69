"""Policy files: every error names the file, key path, line and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy import PolicyError, load_policy, load_policy_text
from tests.conftest import DEFAULT_POLICY

BASE = """\
version: 1
upstreams:
  crm: {url: "http://127.0.0.1:9101"}
auth:
  issuers:
    - {issuer: https://id.example.com, audiences: [api], algorithms: [HS256],
       secret_env: FAIRGATE_JWT_SECRET}
roles:
  agent: [crm.leads.read]
plans:
  free: {rate: 5/second, burst: 10}
routes:
  - {id: leads, methods: [GET], path: "/crm/v1/{tenant}/leads", upstream: crm,
     permission: crm.leads.read}
"""


def error_of(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "p.yaml")
    return info.value


def test_default_policy_compiles() -> None:
    policy = load_policy(DEFAULT_POLICY)
    assert {"viewer", "agent", "marketer", "admin", "service", "gateway-admin"} <= set(policy.roles)
    assert {"free", "pro", "enterprise"} <= set(policy.plans)
    assert {r.upstream for r in policy.routes} == {"crm", "voip"}


def test_base_policy_compiles() -> None:
    policy = load_policy_text(BASE)
    assert policy.routes[0].allowed_roles == frozenset({"agent"})


@pytest.mark.parametrize(
    ("old", "new", "path", "line", "expected"),
    [
        (
            "upstream: crm,\n",
            "upstream: crn,\n",
            "routes[0].upstream",
            13,
            "one of the upstreams ['crm']",
        ),
        (
            "permission: crm.leads.read}",
            "permision: crm.leads.read}",
            "routes[0].permision",
            14,
            "no such key here",
        ),
        (
            "agent: [crm.leads.read]",
            "agent: [crm.lead.read]",
            "roles.agent[0]",
            9,
            "a permission that some route requires",
        ),
        ("rate: 5/second", "rate: 5/fortnight", "plans.free.rate", 11, "a rate such as"),
        (
            'url: "http://127.0.0.1:9101"',
            'url: "ftp://x"',
            "upstreams.crm.url",
            3,
            "an http:// URL",
        ),
        ("version: 1", "version: 2", "version", 1, "one of 1"),
        ("methods: [GET]", "methods: [G ET]", "routes[0].methods", 13, "an HTTP method"),
        ("burst: 10", "burst: 0", "plans.free.burst", 11, "greater than or equal to 1"),
    ],
)
def test_errors_name_path_line_and_expectation(
    old: str, new: str, path: str, line: int, expected: str
) -> None:
    assert old in BASE
    error = error_of(BASE.replace(old, new))
    assert error.file == "p.yaml"
    assert error.path == path
    assert error.line == line
    assert expected in error.expected
    assert str(error).startswith(f"p.yaml:{line}: {path}:")


def test_duplicate_keys_are_errors() -> None:
    error = error_of(BASE + "roles:\n  viewer: [crm.leads.read]\n")
    assert error.path == "roles" and error.line == 15 and "once" in error.expected


def test_missing_required_key() -> None:
    error = error_of(BASE.replace("version: 1\n", ""))
    assert error.path == "version" and "required" in error.expected


def test_yaml_syntax_error_has_a_line() -> None:
    error = error_of(BASE + "routes: [\n")
    assert error.line is not None and "valid YAML" in error.expected


def test_route_conflict_is_reported() -> None:
    text = BASE + (
        '  - {id: leads2, methods: [GET], path: "/crm/v1/{tenant}/leads",'
        " upstream: crm, permission: crm.leads.read}\n"
    )
    error = error_of(text)
    assert error.path.startswith("routes[") and "already routed" in error.expected


def test_secret_env_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAIRGATE_JWT_SECRET")
    error = error_of(BASE)
    assert error.path == "auth.issuers[0].secret_env"
    assert "FAIRGATE_JWT_SECRET" in error.expected


def test_mixed_hmac_and_asymmetric_algorithms_refused() -> None:
    error = error_of(BASE.replace("algorithms: [HS256]", "algorithms: [HS256, RS256]"))
    assert error.path == "auth.issuers[0].algorithms" and "never both" in error.expected


def test_inheritance_cycle_refused() -> None:
    text = BASE.replace(
        "agent: [crm.leads.read]",
        "agent: {inherits: [boss], allow: [crm.leads.read]}\n  boss: {inherits: [agent]}",
    )
    error = error_of(text)
    assert "cycle" in error.expected


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "missing.yaml")
    assert "readable policy file" in info.value.expected


def test_units_are_parsed_once() -> None:
    policy = load_policy_text(
        BASE.replace(
            'url: "http://127.0.0.1:9101"}', 'url: "http://127.0.0.1:9101", read_timeout: 1.5m}'
        ).replace("version: 1", "version: 1\nnetwork: {max_body: 2MiB, max_headers: 8KiB}")
    )
    assert policy.upstreams["crm"].read_timeout == 90.0
    assert policy.max_body == 2 * 1024 * 1024 and policy.max_headers == 8192


def test_unsupported_state_backend_is_refused() -> None:
    error = error_of(BASE.replace("version: 1\n", "version: 1\nstate: redis://127.0.0.1:6379\n"))
    assert error.path == "state" and "memory://" in error.expected and error.line == 2


@pytest.mark.parametrize(
    ("extra", "path", "expected"),
    [
        (
            "detectors: {duplicates: {routes: [nope], max: 2, per: 1m}}",
            "detectors.duplicates.routes[0]",
            "the id of a route",
        ),
        (
            "enforcement: {ladder: [{after: 2, action: warn},"
            " {after: 2, action: suspend, for: 1h}]}",
            "enforcement.ladder[1].after",
            "a count above the previous rung's (2)",
        ),
        (
            "enforcement: {ladder: [{after: 1, action: throttle}]}",
            "enforcement.ladder[0]",
            "a duration (for: 15m) for throttle",
        ),
        (
            "enforcement: {ladder: [{after: 1, action: exile}]}",
            "enforcement.ladder[0].action",
            "one of",
        ),
        (
            "detectors: {scraping: {mode: enforce, sequential_run: 1}}",
            "detectors.scraping.sequential_run",
            "greater than or equal to 2",
        ),
    ],
)
def test_detector_and_ladder_errors(extra: str, path: str, expected: str) -> None:
    error = error_of(BASE + extra + "\n")
    assert error.path == path
    assert expected in error.expected
    assert error.line == 15


def test_the_audit_flush_is_a_bounded_duration() -> None:
    audit = "audit: {sinks: [stdout], flush: 500ms}\n"
    policy = load_policy_text(BASE + audit, "p.yaml")
    assert policy.audit is not None and policy.audit.flush == 0.5
    default = load_policy_text(BASE + "audit: {sinks: [stdout]}\n", "p.yaml")
    assert default.audit is not None and default.audit.flush == 0.2
    for bad in ("0s", "1m", "soon"):
        error = error_of(BASE + audit.replace("500ms", bad))
        assert error.path == "audit.flush" and error.line == 15
        assert "duration" in error.expected
