"""Behaviour of the built-in demo upstreams that `fairgate demo` proxies to."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct

import pytest
from starlette.testclient import TestClient
from starlette.types import Message

from gateway.demo import crm, voip


@pytest.fixture
def crm_client() -> TestClient:
    return TestClient(crm.create_app())


@pytest.fixture
def voip_client() -> TestClient:
    return TestClient(voip.create_app())


def test_health(crm_client: TestClient, voip_client: TestClient) -> None:
    assert crm_client.get("/crm/v1/health").json() == {"status": "ok"}
    assert voip_client.get("/voip/v1/health").json() == {"status": "ok"}


def test_leads_pagination(crm_client: TestClient) -> None:
    first = crm_client.get("/crm/v1/acme/leads").json()
    assert (first["page"], first["per_page"], first["total"]) == (1, 50, 2000)
    assert first["items"][0]["id"] == 1001
    assert first["items"][0]["email"] == "lead1001@example.com"
    assert first["next"] == "/crm/v1/acme/leads?page=2"

    second = crm_client.get(first["next"]).json()
    assert [lead["id"] for lead in second["items"]] == list(range(1051, 1101))

    body = crm_client.get("/crm/v1/acme/leads?page=10&per_page=200").json()
    assert len(body["items"]) == 200 and body["items"][-1]["id"] == 3000
    assert body["next"] is None

    partial = crm_client.get("/crm/v1/acme/leads?page=7&per_page=300").json()
    assert partial["per_page"] == 200  # clamped to the maximum
    assert partial["next"] == "/crm/v1/acme/leads?page=8&per_page=200"
    assert crm_client.get("/crm/v1/acme/leads?page=0").status_code == 422
    assert crm_client.get("/crm/v1/acme/leads?per_page=x").status_code == 422


def test_tenants_are_isolated(crm_client: TestClient) -> None:
    crm_client.post("/crm/v1/acme/leads", json={"name": "Only Acme", "email": "a@acme.test"})
    assert crm_client.get("/crm/v1/acme/leads").json()["total"] == 2001
    assert crm_client.get("/crm/v1/globex/leads").json()["total"] == 2000


def test_lead_lifecycle(crm_client: TestClient) -> None:
    headers = {"x-fairgate-subject": "user-42", "x-fairgate-tenant": "acme"}
    body = {"name": "Jane Roe", "email": "jane@example.com"}
    resp = crm_client.post("/crm/v1/acme/leads", json=body, headers=headers)
    assert resp.status_code == 201
    lead = resp.json()
    assert lead == {**body, "id": 3001, "owner": "user-42", "status": "new"}
    assert resp.headers["location"] == "/crm/v1/acme/leads/3001"

    assert crm_client.get(resp.headers["location"]).json() == lead
    patched = crm_client.patch("/crm/v1/acme/leads/3001", json={"status": "qualified"})
    assert patched.status_code == 200 and patched.json()["status"] == "qualified"
    replaced = crm_client.put("/crm/v1/acme/leads/3001", json={"name": "J", "email": "j@x.io"})
    assert replaced.json() == {
        "id": 3001,
        "name": "J",
        "email": "j@x.io",
        "owner": "user-42",
        "status": "new",
    }

    assert crm_client.delete("/crm/v1/acme/leads/3001").status_code == 204
    missing = crm_client.get("/crm/v1/acme/leads/3001")
    assert missing.status_code == 404 and missing.json() == {"error": "not_found"}
    assert crm_client.delete("/crm/v1/acme/leads/3001").status_code == 404


def test_owner_defaults_to_anonymous(crm_client: TestClient) -> None:
    resp = crm_client.post("/crm/v1/acme/leads", json={"name": "N", "email": "n@example.com"})
    assert resp.json()["owner"] == "anonymous"


def test_not_found_is_json(crm_client: TestClient) -> None:
    for path in ("/crm/v1/acme/leads/99999", "/crm/v1/acme/contacts/1", "/crm/v1/acme/nope"):
        resp = crm_client.get(path)
        assert resp.status_code == 404 and resp.json() == {"error": "not_found"}
    assert crm_client.post("/crm/v1/acme/campaigns/999/send").status_code == 404
    assert (
        crm_client.put("/crm/v1/acme/leads/1", json={"name": "x", "email": "x@y"}).status_code
        == 404
    )


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"name": "x"}',
        b'{"name": "x", "email": "no-at-sign"}',
        b'{"name": "x", "email": "a@b", "status": "bogus"}',
        b'{"name": 1, "email": "a@b"}',
        b'{"name": "x", "email": "a@b", "owner": "me"}',
    ],
)
def test_invalid_lead_bodies(crm_client: TestClient, body: bytes) -> None:
    resp = crm_client.post("/crm/v1/acme/leads", content=body)
    assert resp.status_code == 422 and resp.json()["error"] == "invalid"


def test_invalid_patch(crm_client: TestClient) -> None:
    assert crm_client.patch("/crm/v1/acme/leads/1001", json={"status": "x"}).status_code == 422
    assert crm_client.put("/crm/v1/acme/leads/1001", json={"name": "x"}).status_code == 422


def test_contacts_campaigns_tickets_users(crm_client: TestClient) -> None:
    contacts = crm_client.get("/crm/v1/globex/contacts").json()
    assert contacts["total"] == 500
    cid = contacts["items"][0]["id"]
    assert crm_client.get(f"/crm/v1/globex/contacts/{cid}").json()["id"] == cid
    made = crm_client.post("/crm/v1/globex/contacts", json={"name": "C", "email": "c@g.io"})
    assert made.status_code == 201

    campaigns = crm_client.get("/crm/v1/acme/campaigns").json()["items"]
    sent = crm_client.post(f"/crm/v1/acme/campaigns/{campaigns[0]['id']}/send")
    assert sent.status_code == 202
    assert sent.json() == {
        "campaign": campaigns[0]["id"],
        "queued": 1200,
    }  # new/contacted/qualified

    ticket = {"subject": "Broken", "body": "Please help"}
    resp = crm_client.post(
        "/crm/v1/acme/tickets", json=ticket, headers={"x-fairgate-subject": "u1"}
    )
    assert resp.status_code == 201 and resp.json()["created_by"] == "u1"
    assert crm_client.get(resp.headers["location"]).json()["status"] == "open"
    assert crm_client.post("/crm/v1/acme/tickets", json={"subject": "x"}).status_code == 422

    user = crm_client.post("/crm/v1/acme/admin/users", json={"email": "new@acme.example"})
    assert user.status_code == 201 and user.json()["role"] == "agent"
    assert crm_client.get("/crm/v1/acme/admin/users").json()["total"] == 5


def test_signup(crm_client: TestClient) -> None:
    resp = crm_client.post("/crm/v1/signup", json={"company": "Initech, Inc.", "email": "b@i.io"})
    assert resp.status_code == 201 and resp.json()["tenant"] == "initech-inc"
    users = crm_client.get("/crm/v1/initech-inc/admin/users").json()["items"]
    assert users[0]["email"] == "b@i.io" and users[0]["role"] == "admin"
    again = crm_client.post("/crm/v1/signup", json={"company": "ACME", "email": "x@a.io"})
    assert again.json()["tenant"] == "acme-2"  # never collides with an existing tenant
    assert crm_client.post("/crm/v1/signup", json={"company": "Acme"}).status_code == 422
    assert (
        crm_client.post("/crm/v1/signup", json={"company": "!!", "email": "a@b"}).status_code == 422
    )


def test_export_streams_json_lines(crm_client: TestClient) -> None:
    with crm_client.stream("GET", "/crm/v1/acme/export") as resp:
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        assert "content-length" not in resp.headers
        lines = list(resp.iter_lines())
    assert len(lines) == 2000
    assert json.loads(lines[0])["id"] == 1001 and json.loads(lines[-1])["id"] == 3000


def test_import_digests_body(crm_client: TestClient) -> None:
    payload = b"x" * 300_000
    resp = crm_client.post("/crm/v1/acme/import", content=iter([payload[:1000], payload[1000:]]))
    assert resp.json() == {"bytes": 300_000, "sha256": hashlib.sha256(payload).hexdigest()}


def test_calls(voip_client: TestClient) -> None:
    headers = {"x-fairgate-subject": "agent-7"}
    resp = voip_client.post("/voip/v1/acme/calls", json={"to": "+15551234567"}, headers=headers)
    assert resp.status_code == 201
    call = resp.json()
    assert call["state"] == "ringing" and call["created_by"] == "agent-7"
    assert call["from"].startswith("+1555")
    assert resp.headers["location"] == f"/voip/v1/acme/calls/{call['id']}"
    assert voip_client.get(resp.headers["location"]).json() == call

    hung = voip_client.delete(resp.headers["location"])
    assert hung.status_code == 200 and hung.json()["state"] == "ended"
    assert voip_client.get(resp.headers["location"]).json()["state"] == "ended"
    assert voip_client.delete("/voip/v1/acme/calls/1").status_code == 404
    assert voip_client.get("/voip/v1/acme/calls").json()["total"] == 301


@pytest.mark.parametrize(
    "body", [{"to": "5551234567"}, {"to": "+0123456789"}, {"to": "+1555", "from": "x"}, {}]
)
def test_call_validation(voip_client: TestClient, body: dict[str, str]) -> None:
    assert voip_client.post("/voip/v1/acme/calls", json=body).status_code == 422


def test_sms(voip_client: TestClient) -> None:
    resp = voip_client.post("/voip/v1/globex/sms", json={"to": "+442071234567", "text": "hi"})
    assert resp.status_code == 202
    assert resp.json()["status"] == "queued" and isinstance(resp.json()["id"], int)
    assert voip_client.get("/voip/v1/globex/sms").json()["total"] == 101
    too_long = {"to": "+442071234567", "text": "x" * 1601}
    assert voip_client.post("/voip/v1/globex/sms", json=too_long).status_code == 422
    assert voip_client.post("/voip/v1/globex/sms", json={"to": "+442071234567"}).status_code == 422


def test_numbers_and_recordings_list(voip_client: TestClient) -> None:
    assert voip_client.get("/voip/v1/acme/numbers").json()["total"] == 5
    assert voip_client.get("/voip/v1/acme/recordings").json()["total"] == 20


@pytest.mark.parametrize("size", [0, 10, 44, 65536, 65536 * 3 + 17])
def test_recording_download_with_length(voip_client: TestClient, size: int) -> None:
    with voip_client.stream("GET", f"/voip/v1/acme/recordings/1?size={size}") as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "audio/wav"
        assert resp.headers["content-length"] == str(size)
        data = resp.read()
    assert len(data) == size
    if size >= 44:
        assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
        assert struct.unpack("<I", data[40:44])[0] == size - 44


def test_recording_download_chunked(voip_client: TestClient) -> None:
    with voip_client.stream("GET", "/voip/v1/acme/recordings/7?size=200000&chunked=1") as resp:
        assert "content-length" not in resp.headers
        chunks = list(resp.iter_raw())
    assert sum(map(len, chunks)) == 200_000


def test_recording_head_and_bad_size(voip_client: TestClient) -> None:
    head = voip_client.head("/voip/v1/acme/recordings/1")
    assert head.status_code == 200 and head.headers["content-length"] == str(8 * 1024 * 1024)
    assert voip_client.get("/voip/v1/acme/recordings/1?size=-1").status_code == 422
    assert voip_client.get(f"/voip/v1/acme/recordings/1?size={4 * 2**30 + 1}").status_code == 422


def test_voip_upload(voip_client: TestClient) -> None:
    resp = voip_client.post("/voip/v1/acme/upload", content=b"abc")
    assert resp.json() == {"bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}


@pytest.mark.parametrize(
    ("client_name", "service", "path"),
    [
        ("crm_client", "crm", "/crm/v1/acme/echo"),
        ("crm_client", "crm", "/crm/v1/acme/echo/a/b%2Fc/"),
        ("voip_client", "voip", "/voip/v1/echo"),
        ("voip_client", "voip", "/echo"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
def test_echo_reports_raw_request(
    request: pytest.FixtureRequest, client_name: str, service: str, path: str, method: str
) -> None:
    client: TestClient = request.getfixturevalue(client_name)
    body = b"hello \x00 world"
    headers = [("X-Dup", "one"), ("x-dup", "two"), ("x-fairgate-subject", "u1")]
    resp = client.request(method, f"{path}?b=2&a=%20x&a=1", content=body, headers=headers)
    assert resp.status_code == 200
    echo = resp.json()
    assert echo["service"] == service and echo["method"] == method
    assert echo["raw_path"] == path
    assert echo["path"] == path.replace("%2F", "/")
    assert echo["query"] == "b=2&a=%20x&a=1"
    assert [h for h in echo["headers"] if h[0] == "x-dup"] == [["x-dup", "one"], ["x-dup", "two"]]
    assert ["x-fairgate-subject", "u1"] in echo["headers"]
    assert echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_echo_head_and_empty_body(voip_client: TestClient) -> None:
    assert voip_client.head("/voip/v1/acme/echo").status_code == 200
    echo = voip_client.get("/voip/v1/acme/echo").json()
    assert echo["body_length"] == 0 and echo["query"] == ""
    assert echo["body_sha256"] == hashlib.sha256(b"").hexdigest()


def test_echo_reports_raw_bytes_as_latin1() -> None:
    """Drive the ASGI app directly: TestClient would normalise non-ASCII bytes first."""
    sent: list[Message] = []
    chunks = [b"ab", b"c"]

    async def receive() -> Message:
        body = chunks.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(chunks)}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "PATCH",
        "path": "/crm/v1/acme/echo/x y//z",
        "raw_path": b"/crm/v1/acme/echo/x%20y//z\xff",
        "query_string": b"q=%E9&q=\xe9",
        "headers": [(b"x-a", b"\xe9t\xe9"), (b"X-Mixed", b"1"), (b"x-a", b"2")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
        "scheme": "http",
        "root_path": "",
    }
    asyncio.run(crm.create_app()(scope, receive, send))
    assert sent[0]["status"] == 200
    echo = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert echo["path"] == "/crm/v1/acme/echo/x y//z"
    assert echo["raw_path"] == "/crm/v1/acme/echo/x%20y//z\xff"
    assert echo["query"] == "q=%E9&q=\xe9"
    assert echo["headers"] == [["x-a", "\xe9t\xe9"], ["X-Mixed", "1"], ["x-a", "2"]]
    assert echo["body_length"] == 3
    assert echo["body_sha256"] == hashlib.sha256(b"abc").hexdigest()
