"""Abuse detectors and the enforcement ladder (ATTACKS.md 32-35), against a
gateway of their own under real uvicorn, with the demo upstreams."""

from __future__ import annotations

import httpx
import pytest

from gateway.demokey import mint_token
from gateway.policy import load_policy_text
from gateway.proxy import Gateway
from tests.conftest import SECRET, Stack

POLICY = """
version: 1
network: {{trusted_proxies: [127.0.0.1/32]}}
upstreams:
  crm: {{url: "http://127.0.0.1:{crm}"}}
  voip: {{url: "http://127.0.0.1:{voip}"}}
auth:
  issuers:
    - {{issuer: https://id.fairgate.example, audiences: [crm-voip-api], algorithms: [HS256],
       secret_env: FAIRGATE_JWT_SECRET}}
  lockout: {{max_failures: 100000}}
roles: {{agent: [crm.read, crm.write, voip.sms]}}
plans:
  solo: {{seats: 1}}
routes:
  - {{id: lead, methods: [GET], path: "/crm/v1/{{tenant}}/leads/{{lead_id}}", upstream: crm,
     permission: crm.read, object: lead_id}}
  - {{id: leads, methods: [GET], path: "/crm/v1/{{tenant}}/leads", upstream: crm,
     permission: crm.read}}
  - {{id: tickets, methods: [POST], path: "/crm/v1/{{tenant}}/tickets", upstream: crm,
     permission: crm.write}}
  - {{id: sms, methods: [POST], path: "/voip/v1/{{tenant}}/sms", upstream: voip,
     permission: voip.sms}}
detectors:
  scraping: {{mode: {scraping}, sequential_run: 20, distinct_objects: {{max: 100, per: 10m}}}}
  account_sharing: {{mode: enforce, distinct_networks: {{max: 2, per: 1h}},
                    distinct_devices: {{max: 2, per: 1h}}}}
  spam: {{mode: enforce, fan_out: {{routes: [sms], field: to, max: 5, per: 1h}}}}
  duplicates: {{mode: enforce, routes: [tickets], max: 2, per: 10m}}
  probing: {{mode: enforce, refusals: {{max: 5, per: 10m}}}}
enforcement:
  ladder:
    - {{after: 1, action: warn}}
    - {{after: 3, action: throttle, for: 15m}}
    - {{after: 5, action: suspend, for: 1h}}
    - {{after: 8, action: terminate}}
  throttle_rate: 1/minute
"""


class Env:
    def __init__(self, stack: Stack, scraping: str = "enforce") -> None:
        policy = load_policy_text(
            POLICY.format(crm=stack.crm_port, voip=stack.voip_port, scraping=scraping)
        )
        self.gateway = Gateway(policy)
        self.port = stack.servers.add(self.gateway)

    def call(
        self,
        method: str,
        path: str,
        sub: str = "scraper",
        plan: str | None = None,
        headers: dict[str, str] | None = None,
        **kw: object,
    ) -> httpx.Response:
        token = mint_token(
            sub=sub,
            tenant="acme",
            roles=["agent"],
            plan=plan,
            secret=SECRET,
            extra=kw.pop("claims", None),
        )  # type: ignore[arg-type]
        return httpx.request(
            method,
            f"http://127.0.0.1:{self.port}{path}",
            headers={"Authorization": f"Bearer {token}", **(headers or {})},
            **kw,
        )  # type: ignore[arg-type]


@pytest.fixture()
def env(stack: Stack) -> Env:
    return Env(stack)


def test_32_sequential_scraping_is_flagged_then_refused_as_the_ladder_says(env: Env) -> None:
    responses = [env.call("GET", f"/crm/v1/acme/leads/{i}") for i in range(1001, 1301)]
    statuses = [r.status_code for r in responses]
    # The first 19 in the run pass untouched; the 20th is the first signal: a warning.
    assert statuses[:19] == [200] * 19 and "fairgate-warning" not in responses[18].headers
    assert statuses[19] == 200 and responses[19].headers["fairgate-warning"] == "scraping"
    # Offense 3: throttled (1/minute: the next ones are refused).
    assert "throttled" in responses[21].headers["fairgate-warning"]
    throttled = next(r for r in responses if r.status_code == 429)
    assert throttled.json()["reason"] == "rate_limited"
    assert throttled.json()["detail"].startswith("Throttled")
    # Offense 5: suspended. From then on the standing step refuses everything.
    suspended = next(r for r in responses if r.status_code == 403)
    assert suspended.json()["reason"] == "suspended"
    assert int(suspended.headers["retry-after"]) <= 3600
    assert statuses[-1] == 403
    assert env.call("GET", "/crm/v1/acme/leads").json()["reason"] == "suspended"
    # Others are untouched.
    assert env.call("GET", "/crm/v1/acme/leads/1001", sub="reader").status_code == 200


def test_shadow_detector_only_records(stack: Stack) -> None:
    env = Env(stack, scraping="shadow")
    statuses = [env.call("GET", f"/crm/v1/acme/leads/{i}").status_code for i in range(1001, 1061)]
    assert statuses == [200] * 60


def test_33_account_sharing_from_many_networks(env: Env) -> None:
    def from_net(net: str) -> httpx.Response:
        return env.call(
            "GET", "/crm/v1/acme/leads", sub="shared", headers={"X-Forwarded-For": f"{net}.7"}
        )

    assert from_net("198.51.100").status_code == 200
    assert "fairgate-warning" not in from_net("203.0.113").headers
    third = from_net("192.0.2")
    assert third.status_code == 200 and third.headers["fairgate-warning"] == "account_sharing"


def test_33_more_live_sessions_than_seats(env: Env) -> None:
    first = env.call("GET", "/crm/v1/acme/leads", sub="seat", plan="solo", claims={"sid": "s1"})
    assert "fairgate-warning" not in first.headers
    second = env.call("GET", "/crm/v1/acme/leads", sub="seat", plan="solo", claims={"sid": "s2"})
    assert second.headers["fairgate-warning"] == "account_sharing"


def test_35_duplicate_submissions(env: Env) -> None:
    body = {"subject": "printer", "body": "on fire"}
    responses = [env.call("POST", "/crm/v1/acme/tickets", sub="dup", json=body) for _ in range(4)]
    assert [r.status_code for r in responses] == [201, 201, 201, 201]
    assert "fairgate-warning" not in responses[1].headers
    assert responses[2].headers["fairgate-warning"] == "duplicate_submission"
    # A different body is not a duplicate.
    other = env.call("POST", "/crm/v1/acme/tickets", sub="dup2", json={"subject": "x", "body": "y"})
    assert "fairgate-warning" not in other.headers


def test_spam_fan_out(env: Env) -> None:
    sent = [
        env.call(
            "POST",
            "/voip/v1/acme/sms",
            sub="spammer",
            json={"to": f"+1555000{i:04d}", "text": "WIN"},
        )
        for i in range(7)
    ]
    assert all(r.status_code == 202 for r in sent)
    assert "fairgate-warning" not in sent[4].headers
    assert sent[5].headers["fairgate-warning"] == "spam"


def test_probing_escalates_to_suspension(env: Env) -> None:
    # Refusals 6..10 are offenses 1..5 (max 5 per 10 minutes); offense 5 suspends.
    for _ in range(9):
        assert env.call("GET", "/crm/v1/globex/leads", sub="prober").status_code == 403
    assert env.call("GET", "/crm/v1/acme/leads", sub="prober").status_code == 200
    assert env.call("GET", "/crm/v1/globex/leads", sub="prober").json()["reason"] == (
        "tenant_mismatch"
    )
    response = env.call("GET", "/crm/v1/acme/leads", sub="prober")
    assert response.status_code == 403
    assert response.json()["reason"] == "suspended"
    assert "probing" in response.json()["detail"]


def test_chunked_bodies_are_screened_too(env: Env) -> None:
    body = b'{"subject": "printer", "body": "on fire"}'
    responses = [
        env.call(
            "POST",
            "/crm/v1/acme/tickets",
            sub="chunky",
            headers={"content-type": "application/json"},
            content=iter([body[:10], body[10:]]),
        )
        for _ in range(3)
    ]
    assert [r.status_code for r in responses] == [201, 201, 201]
    assert responses[2].headers["fairgate-warning"] == "duplicate_submission"
    huge = env.call(
        "POST", "/crm/v1/acme/tickets", sub="chunky", content=iter([b"x" * 40_000, b"x" * 40_000])
    )
    assert huge.status_code == 413 and huge.json()["reason"] == "payload_too_large"
