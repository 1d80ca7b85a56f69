"""Hostile request targets (ATTACKS.md 17-25) against the running gateway.

Each target is sent as exact bytes. Refused ones must never reach an
upstream; allowed ones must reach it with exactly the path that was
authorized, as the demo upstream's echo route reports.
"""

from __future__ import annotations

import pytest

from tests.conftest import Stack, TokenFactory
from tests.support import raw_request, request_bytes

ECHO = "/crm/v1/acme/echo"

# (target, expected status, path the upstream must see for allowed ones)
TARGETS: list[tuple[str, int, str | None]] = [
    # 17: dot segments
    ("/crm/v1/acme/leads/../admin/users", 400, None),
    ("/crm/v1/acme/echo/../../globex/echo", 400, None),
    ("/crm/v1/acme/./echo", 400, None),
    ("/crm/v1/acme/echo/%2e%2e/x", 400, None),
    ("/crm/v1/acme/echo/.%2E/x", 400, None),
    ("/crm/v1/acme/echo/%2E", 400, None),
    # 18: encoded separators
    ("/crm/v1/acme/admin%2Fusers", 400, None),
    ("/crm/v1/acme/admin%2fusers", 400, None),
    ("/crm/v1/acme/admin%5Cusers", 400, None),
    ("/crm/v1/acme/admin%5cusers", 400, None),
    ("/crm/v1/acme\\admin\\users", 400, None),
    # 19: empty segments
    ("//crm/v1//acme/admin///users", 400, None),
    ("/crm/v1/acme//echo", 400, None),
    # 20: variants that must not reach the admin upstream
    ("/crm/v1/acme/Admin/users", 404, None),
    ("/crm/v1/acme/admin/users/", 404, None),
    ("/crm/v1/acme/admin/users.", 404, None),
    ("/crm/v1/acme/admin/users%20", 404, None),
    ("/crm/v1/acme/admin/users%09", 400, None),
    ("/crm/v1/acme/ADMIN/users", 404, None),
    # 21: matrix parameters
    ("/crm/v1/acme/admin;x=y/users", 400, None),
    ("/crm/v1/acme/..;/admin/users", 400, None),
    ("/crm/v1/acme/echo;jsessionid=1", 400, None),
    # 22: double encoding is decoded at most once
    ("/crm/v1/acme/echo/%252e%252e%252fadmin", 400, None),
    ("/crm/v1/acme/echo/%25", 400, None),
    # 23: NUL, overlong UTF-8, fragments, control bytes
    ("/crm/v1/acme/echo/%00", 400, None),
    ("/crm/v1/acme/echo/%c0%ae%c0%ae/admin", 400, None),
    ("/crm/v1/acme/echo/%e0%80%ae", 400, None),
    ("/crm/v1/acme/echo/%ff", 400, None),
    ("/crm/v1/acme/echo/%zz", 400, None),
    ("/crm/v1/acme/echo/%4", 400, None),
    ("/crm/v1/acme/echo?q=%zz", 400, None),
    # 26: tenant variants
    ("/crm/v1/ACME/echo", 403, None),
    ("/crm/v1/globex/echo", 403, None),
    # 24: absolute form gets the same decision as origin form
    ("http://evil.example/crm/v1/acme/admin/users", 403, None),
    ("http://evil.example/crm/v1/acme/leads/../admin/users", 400, None),
    # Allowed forms, with the exact path the upstream receives.
    ("/crm/v1/acme/echo", 200, "/crm/v1/acme/echo"),
    ("/crm/v1/acme/echo/a/b", 200, "/crm/v1/acme/echo/a/b"),
    ("/crm/v1/%61cme/echo", 200, "/crm/v1/acme/echo"),
    ("/crm/v1/acme/echo/caf%C3%A9", 200, "/crm/v1/acme/echo/caf%C3%A9"),
    ("/crm/v1/acme/echo/a%20b", 200, "/crm/v1/acme/echo/a%20b"),
    ("/crm/v1/acme/echo/%7euser", 200, "/crm/v1/acme/echo/~user"),
    ("HTTP://evil.example/crm/v1/acme/echo", 200, "/crm/v1/acme/echo"),
]


@pytest.mark.parametrize(("target", "status", "seen"), TARGETS, ids=[t[0] for t in TARGETS])
def test_hostile_target(
    stack: Stack, token: TokenFactory, target: str, status: int, seen: str | None
) -> None:
    raw = request_bytes("GET", target, [("Authorization", f"Bearer {token()}")])
    response = raw_request(stack.port, raw)
    assert response.status == status, response.body
    if status != 200:
        body = response.json()
        reason = {400: "bad_request_path", 404: "route_not_found", 403: None}[status]
        if reason:
            assert body["reason"] == reason
        else:
            assert body["reason"] in ("forbidden", "tenant_mismatch")
        return
    data = response.json()
    assert data["raw_path"] == seen
    assert data["query"] == ""


def test_query_is_forwarded_verbatim(stack: Stack, token: TokenFactory) -> None:
    raw = request_bytes(
        "GET", "/crm/v1/acme/echo?b=2&a=%41+x&c", [("Authorization", f"Bearer {token()}")]
    )
    data = raw_request(stack.port, raw).json()
    assert data["raw_path"] == "/crm/v1/acme/echo"
    assert data["query"] == "b=2&a=%41+x&c"


def test_fragment_in_target_is_refused(stack: Stack, token: TokenFactory) -> None:
    raw = request_bytes("GET", "/crm/v1/acme/echo#frag", [("Authorization", f"Bearer {token()}")])
    response = raw_request(stack.port, raw)
    assert response.status == 400


@pytest.mark.parametrize(
    "header",
    [
        "X-HTTP-Method-Override",
        "X-Original-URL",
        "X-Rewrite-URL",
        "X-HTTP-Method",
        "X-Original-Method",
    ],
)
def test_rewrite_and_override_headers_never_change_the_decision(
    stack: Stack, token: TokenFactory, header: str
) -> None:
    # ATTACKS.md 25: the admin route stays refused, and the header never
    # reaches the upstream on an allowed request.
    value = "DELETE" if "Method" in header else "/crm/v1/acme/admin/users"
    auth = ("Authorization", f"Bearer {token()}")
    refused = raw_request(
        stack.port,
        request_bytes("GET", "/crm/v1/acme/admin/users", [auth, (header, "/crm/v1/acme/echo")]),
    )
    assert refused.status == 403
    data = raw_request(stack.port, request_bytes("GET", ECHO, [auth, (header, value)])).json()
    assert data["method"] == "GET"
    assert data["raw_path"] == ECHO
    names = {name for name, _ in data["headers"]}
    assert header.lower() not in names
