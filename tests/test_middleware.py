"""``Fairgate(app, policy=...)`` guarding an in-process Starlette app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from gateway import Fairgate
from gateway.audit import verify
from gateway.policy import load_policy_text
from tests.conftest import TokenFactory
from tests.support import ServerThread, wait_for
from tests.test_audit_helpers import complete_lines

POLICY = """
version: 1
upstreams: {app: {url: "http://in-process"}}
auth:
  issuers:
    - {issuer: https://id.fairgate.example, audiences: [crm-voip-api], algorithms: [HS256],
       secret_env: FAIRGATE_JWT_SECRET}
roles: {agent: [notes.read]}
routes:
  - {id: notes, methods: [GET], path: "/t/{tenant}/notes", upstream: app, permission: notes.read}
"""


async def notes(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "path": request.url.path,
            "subject": request.headers.get("x-fairgate-subject"),
            "identity": request.scope["state"]["fairgate"].subject,
        }
    )


def make_client() -> TestClient:
    app = Starlette(routes=[Route("/t/{tenant}/notes", notes)])
    return TestClient(Fairgate(app, policy=load_policy_text(POLICY)))


def test_allowed_request_reaches_app_with_identity(token: TokenFactory) -> None:
    client = make_client()
    response = client.get(
        "/t/acme/notes",
        headers={"Authorization": f"Bearer {token()}", "X-Fairgate-Subject": "mallory"},
    )
    assert response.status_code == 200
    assert response.json() == {"path": "/t/acme/notes", "subject": "alice", "identity": "alice"}
    assert response.headers["x-request-id"]


def test_refusals_are_problem_json(token: TokenFactory) -> None:
    client = make_client()
    response = client.get("/t/globex/notes", headers={"Authorization": f"Bearer {token()}"})
    assert response.status_code == 403
    assert response.json()["reason"] == "tenant_mismatch"
    assert client.get("/t/acme/notes").status_code == 401
    assert client.get("/t/acme/other").json()["reason"] == "route_not_found"


def test_middleware_applies_fair_usage_and_releases_slots(token: TokenFactory) -> None:
    policy = load_policy_text(
        POLICY.replace(
            "roles: {agent: [notes.read]}",
            "roles: {agent: [notes.read]}\n"
            "plans: {free: {rate: 1/minute, burst: 2, concurrent: 1}}",
        )
    )
    app = Fairgate(Starlette(routes=[Route("/t/{tenant}/notes", notes)]), policy=policy)
    client = TestClient(app)
    headers = {"Authorization": f"Bearer {token(plan='free')}"}
    first = client.get("/t/acme/notes", headers=headers)
    assert first.status_code == 200
    assert first.headers["ratelimit"] == '"plan-free";r=1;t=60'
    assert client.get("/t/acme/notes", headers=headers).status_code == 200
    refused = client.get("/t/acme/notes", headers=headers)
    assert refused.status_code == 429 and refused.json()["reason"] == "rate_limited"
    assert app.engine.meter.inflight == {}


def test_websockets_are_refused_not_passed_through(token: TokenFactory) -> None:
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(websocket.headers.get("x-fairgate-subject", ""))

    app = Starlette(routes=[WebSocketRoute("/t/{tenant}/notes", ws)])
    client = TestClient(Fairgate(app, policy=load_policy_text(POLICY)))
    try:
        with client.websocket_connect(
            "/t/acme/notes", headers={"X-Fairgate-Subject": "root"}
        ) as socket:
            socket.receive_text()
        raise AssertionError("the WebSocket reached the app")
    except WebSocketDisconnect as exc:
        assert exc.code == 1008


def audit_policy(directory: Path) -> str:
    return POLICY + f'audit: {{sinks: ["file://{directory}"], ip_key_env: FAIRGATE_AUDIT_KEY}}\n'


def audit_lines(directory: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in sorted(directory.glob("*/audit-*.jsonl"))
        for line in complete_lines(path)
    ]


def test_middleware_records_every_decision_in_the_audit_trail(
    tmp_path: Path, token: TokenFactory
) -> None:
    """Served and refused requests alike get one record, with the app's
    status and bytes; the host's lifespan starts the writer and seals it."""
    app = Starlette(routes=[Route("/t/{tenant}/notes", notes)])
    guarded = Fairgate(app, policy=load_policy_text(audit_policy(tmp_path)))
    headers = {"Authorization": f"Bearer {token()}"}
    with TestClient(guarded) as client:
        served = client.get("/t/acme/notes", headers=headers)
        assert served.status_code == 200
        assert client.get("/t/globex/notes", headers=headers).status_code == 403
        assert client.get("/t/acme/other").status_code == 404
    records = audit_lines(tmp_path)
    assert [r.get("type") for r in records] == [None, None, None, "checkpoint"]
    assert records[-1]["final"] is True
    ok, mismatch, missing = records[:3]
    assert (ok["decision"], ok["status"], ok["upstream_status"]) == ("allow", 200, 200)
    assert ok["subject"] == "alice" and ok["bytes_out"] == len(served.content)
    assert ok["request_id"] == served.headers["x-request-id"]
    assert (mismatch["decision"], mismatch["reason"], mismatch["status"]) == (
        "deny",
        "tenant_mismatch",
        403,
    )
    assert (missing["reason"], missing["subject"]) == ("route_not_found", None)
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("*/audit-*.jsonl"))
    assert token().encode() not in raw and b"testclient" not in raw
    assert verify([tmp_path]).ok


def test_middleware_without_lifespan_starts_its_writer_on_the_first_request(
    tmp_path: Path, token: TokenFactory
) -> None:
    app = Starlette(routes=[Route("/t/{tenant}/notes", notes)])
    guarded = Fairgate(app, policy=load_policy_text(audit_policy(tmp_path)))
    servers = ServerThread()
    try:
        port = servers.add(guarded, lifespan="off")
        response = httpx.get(
            f"http://127.0.0.1:{port}/t/acme/notes",
            headers={"Authorization": f"Bearer {token()}"},
        )
        assert response.status_code == 200
        wait_for(lambda: len(audit_lines(tmp_path)) == 1, what="the record on disk")
        [record] = audit_lines(tmp_path)
        assert (record["decision"], record["status"], record["route"]) == ("allow", 200, "notes")
        # Without lifespan the host seals the trail itself.
        servers.call(guarded.aclose(), timeout=30)
        assert audit_lines(tmp_path)[-1]["final"] is True
        assert verify([tmp_path]).ok
    finally:
        servers.stop()


def test_a_trail_that_cannot_start_refuses_requests_and_retries_sparingly(
    tmp_path: Path, token: TokenFactory
) -> None:
    import threading

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the audit directory should be")
    app = Starlette(routes=[Route("/t/{tenant}/notes", notes)])
    guarded = Fairgate(app, policy=load_policy_text(audit_policy(blocked)))
    servers = ServerThread()
    try:
        port = servers.add(guarded, lifespan="off")
        before = threading.active_count()
        for _ in range(5):
            response = httpx.get(
                f"http://127.0.0.1:{port}/t/acme/notes",
                headers={"Authorization": f"Bearer {token()}"},
            )
            assert response.status_code == 503
            assert response.json()["reason"] == "audit_unavailable"
            assert response.headers["retry-after"]
        # One failed start, not one per request: no sink threads pile up.
        assert threading.active_count() <= before + 1
    finally:
        servers.stop()


async def test_concurrent_first_requests_start_a_failing_trail_once(tmp_path: Path) -> None:
    import asyncio

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the audit directory should be")
    guarded = Fairgate(
        Starlette(routes=[Route("/t/{tenant}/notes", notes)]),
        policy=load_policy_text(audit_policy(blocked)),
    )
    assert guarded.audit is not None
    writer = guarded.audit.writer
    attempts = 0
    real_start = writer.start

    async def counted_start() -> None:
        nonlocal attempts
        attempts += 1
        await real_start()

    writer.start = counted_start  # type: ignore[method-assign]
    decisions = await asyncio.gather(*(guarded._audit_ready(guarded.audit) for _ in range(5)))
    assert attempts == 1
    assert [d.reason if d else None for d in decisions] == ["audit_unavailable"] * 5


SCREENED = POLICY.replace(
    "roles: {agent: [notes.read]}",
    "roles: {agent: [notes.read, notes.write]}",
).replace(
    "permission: notes.read}\n",
    "permission: notes.read}\n"
    '  - {id: tickets, methods: [POST], path: "/t/{tenant}/tickets", upstream: app,\n'
    "     permission: notes.write}\n"
    "detectors: {duplicates: {mode: enforce, routes: [tickets], max: 2, per: 10m}}\n"
    "enforcement: {ladder: [{after: 1, action: warn}]}\n",
)


async def echo_body(request: Request) -> JSONResponse:
    return JSONResponse({"body": (await request.body()).decode()}, status_code=201)


def test_middleware_screens_bodies_like_the_proxy(token: TokenFactory) -> None:
    """Screened routes read the body whole before the app: duplicates are
    flagged, an oversize body is refused, and the app still gets every byte."""
    app = Starlette(routes=[Route("/t/{tenant}/tickets", echo_body, methods=["POST"])])
    client = TestClient(Fairgate(app, policy=load_policy_text(SCREENED)))
    headers = {"Authorization": f"Bearer {token()}"}
    sent = [
        client.post("/t/acme/tickets", headers=headers, content=b'{"body": "on fire"}')
        for _ in range(3)
    ]
    assert [r.status_code for r in sent] == [201, 201, 201]
    assert sent[0].json() == {"body": '{"body": "on fire"}'}
    assert "fairgate-warning" not in sent[1].headers
    assert sent[2].headers["fairgate-warning"] == "duplicate_submission"
    chunked = client.post(
        "/t/acme/tickets", headers=headers, content=iter([b"x" * 40_000, b"x" * 40_000])
    )
    assert chunked.status_code == 413
    assert chunked.json()["reason"] == "payload_too_large"


def test_a_screened_body_is_counted_once(tmp_path: Path, token: TokenFactory) -> None:
    app = Starlette(routes=[Route("/t/{tenant}/tickets", echo_body, methods=["POST"])])
    text = SCREENED + f'audit: {{sinks: ["file://{tmp_path}"], ip_key_env: FAIRGATE_AUDIT_KEY}}\n'
    body = b'{"body": "on fire, once"}'
    with TestClient(Fairgate(app, policy=load_policy_text(text))) as client:
        response = client.post(
            "/t/acme/tickets", headers={"Authorization": f"Bearer {token()}"}, content=body
        )
        assert response.status_code == 201
    [record] = [r for r in audit_lines(tmp_path) if r.get("type") is None]
    assert record["bytes_in"] == len(body)
