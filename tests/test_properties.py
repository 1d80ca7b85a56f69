"""Property tests: whatever a client sends, nothing refused reaches the app
behind the gateway, and what reaches it is exactly what was authorized.

They drive the engine through the ASGI middleware around a recording app
(the same engine and header code as the proxy), so hypothesis can try
thousands of requests quickly.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import Fairgate
from gateway.headers import HOP_BY_HOP, is_owned, normal_name
from gateway.policy import load_policy
from gateway.target import BadTarget, canonical_target
from tests.conftest import DEFAULT_POLICY

POLICY = load_policy(DEFAULT_POLICY)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.seen.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


SEGMENTS = st.sampled_from(
    [
        "crm",
        "voip",
        "v1",
        "acme",
        "globex",
        "leads",
        "admin",
        "users",
        "echo",
        "1001",
        "..",
        ".",
        "",
        "%2e",
        "%2F",
        "%2f",
        "%5c",
        ";x=1",
        "%00",
        "%252e",
        "Admin",
        "%61cme",
        "calls",
        "%20",
        "a%2",
        "%c0%ae",
        "ACME",
        "leads;",
        "#f",
        "%3B",
        "~",
        "caf%C3%A9",
    ]
)
PATHS = st.lists(SEGMENTS, min_size=1, max_size=7).map(lambda s: "/" + "/".join(s))
NAMES = st.sampled_from(
    [
        b"x-fairgate-subject",
        b"X_Fairgate_Roles",
        b"x.fairgate.tenant",
        b"x-forwarded-for",
        b"forwarded",
        b"x-real-ip",
        b"connection",
        b"x-http-method-override",
        b"x-original-url",
        b"x-rewrite-url",
        b"keep-alive",
        b"te",
        b"upgrade",
        b"x-request-id",
        b"accept",
        b"x-custom",
        b"X-Fairgate-Plan",
        b"proxy-authorization",
        b"transfer-encoding",
        b"authorization",
    ]
)
VALUES = st.sampled_from(
    [
        b"admin",
        b"mallory",
        b"globex",
        b"10.0.0.1",
        b"x-custom",
        b"close, x-fairgate-subject",
        b"DELETE",
        b"/crm/v1/acme/admin/users",
        b"keep-alive, accept",
        b"Bearer junk",
    ]
)
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=6)
ROLES = st.sampled_from(["agent", "viewer", "marketer", "admin", "service", "gateway-admin"])


def run(app: Any, method: str, raw_path: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    path, _, query = raw_path.partition(b"?")
    scope = {
        "type": "http",
        "method": method,
        "path": unquote(path.decode("latin-1")),
        "raw_path": path,
        "query_string": query,
        "headers": headers,
        "client": ("203.0.113.9", 5555),
        "scheme": "http",
        "http_version": "1.1",
    }
    asyncio.run(app(scope, receive, send))
    return status


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=PATHS,
    headers=HEADERS,
    role=ROLES,
    method=st.sampled_from(["GET", "POST", "DELETE", "PATCH"]),
)
def test_refused_never_reaches_and_allowed_is_exact(
    path: str, headers: list[tuple[bytes, bytes]], role: str, method: str
) -> None:
    from gateway.demokey import mint_token
    from tests.conftest import SECRET

    token = mint_token(sub="alice", tenant="acme", roles=[role], plan="pro", secret=SECRET)
    recorder = Recorder()
    # The audit trail is not under test here: a writer process per example
    # would only slow the search (and write into the working tree).
    app = Fairgate(recorder, policy=POLICY, audit=False)
    # Client headers first, token last: hostile headers cannot displace it.
    sent = [(k.lower(), v) for k, v in headers if k.lower() != b"authorization"]
    sent.append((b"authorization", f"Bearer {token}".encode()))
    status = run(app, method, path.encode(), sent)
    if status != 200:
        assert recorder.seen == [], "a refused request reached the app"
        return
    assert len(recorder.seen) == 1
    scope = recorder.seen[0]
    # The app sees exactly the canonical form of what the client sent.
    try:
        canonical, forward, _ = canonical_target(path.encode(), b"")
    except BadTarget:
        raise AssertionError(f"an ambiguous target was allowed: {path!r}") from None
    assert scope["path"] == canonical
    assert scope["raw_path"] == forward
    assert scope["method"] == method
    # And it was authorized: the route's permission is held, the tenant is ours.
    match = POLICY.router.match(method, canonical)
    assert match is not None and not hasattr(match, "allow")
    route = match.route  # type: ignore[union-attr]
    assert route.public or role in route.allowed_roles
    tenant = match.params.get("tenant")  # type: ignore[union-attr]
    assert tenant in (None, "acme") or role == "gateway-admin"
    # No client-sent owned or hop-by-hop header survived; identity is the token's.
    forwarded = scope["headers"]
    names = [normal_name(k) for k, _ in forwarded]
    identity = {k: v for k, v in forwarded if k.startswith(b"x-fairgate-")}
    assert identity[b"x-fairgate-subject"] == b"alice"
    assert identity[b"x-fairgate-tenant"] == b"acme"
    assert identity[b"x-fairgate-roles"] == role.encode()
    assert names.count(b"x-fairgate-subject") == 1
    assert names.count(b"x-forwarded-for") == 1
    assert (b"x-forwarded-for", b"203.0.113.9") in forwarded
    for name in names:
        assert name not in HOP_BY_HOP - {b"host"}, name
    for name, value in zip(names, (v for _, v in forwarded), strict=True):
        if is_owned(name):
            assert value not in (
                b"admin",
                b"mallory",
                b"globex",
                b"10.0.0.1",
                b"DELETE",
                b"/crm/v1/acme/admin/users",
            ), (name, value)
