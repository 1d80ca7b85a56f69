"""The reverse proxy end to end: real uvicorn, real demo upstreams."""

from __future__ import annotations

import hashlib
import os

import httpx

from tests.conftest import Stack, TokenFactory
from tests.support import raw_request, request_bytes


def echo(client: httpx.Client, headers: dict[str, str], **kwargs: object) -> dict[str, object]:
    response = client.request(
        kwargs.pop("method", "GET"),
        kwargs.pop("url", "/crm/v1/acme/echo"),  # type: ignore[arg-type]
        headers=headers,
        **kwargs,
    )  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    data: dict[str, object] = response.json()
    return data


def header_map(data: dict[str, object]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in data["headers"]:  # type: ignore[attr-defined]
        out.setdefault(name, []).append(value)
    return out


def test_allowed_request_reaches_upstream_unchanged(
    client: httpx.Client, alice: dict[str, str]
) -> None:
    response = client.get("/crm/v1/acme/leads", params={"page": 2, "per_page": 5}, headers=alice)
    assert response.status_code == 200
    body = response.json()
    assert body["page"] == 2 and len(body["items"]) == 5
    assert response.headers["x-request-id"]


def test_every_method_is_forwarded(client: httpx.Client, alice: dict[str, str]) -> None:
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        data = echo(client, alice, method=method, url="/crm/v1/acme/echo/x")
        assert data["method"] == method
    head = client.head("/crm/v1/acme/echo/x", headers=alice)
    assert head.status_code == 200 and head.content == b""


def test_identity_and_forwarding_headers_added(client: httpx.Client, alice: dict[str, str]) -> None:
    data = echo(client, alice)
    headers = header_map(data)
    assert headers["x-fairgate-subject"] == ["alice"]
    assert headers["x-fairgate-tenant"] == ["acme"]
    assert headers["x-fairgate-roles"] == ["agent"]
    assert headers["x-fairgate-plan"] == ["pro"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["forwarded"] == [
        "for=127.0.0.1;proto=http;host=" + headers["x-forwarded-host"][0]
    ]
    assert "authorization" not in headers  # the crm upstream is not configured to receive it


def test_hop_by_hop_and_connection_named_headers_removed(
    client: httpx.Client, alice: dict[str, str]
) -> None:
    data = echo(
        client,
        {
            **alice,
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic abc",
            "X-Kept": "yes",
        },
    )
    headers = header_map(data)
    for gone in ("x-secret-hop", "keep-alive", "te", "upgrade", "proxy-authorization"):
        assert gone not in headers, gone
    assert headers["x-kept"] == ["yes"]


def test_request_id_kept_when_well_formed_and_replaced_otherwise(
    client: httpx.Client, alice: dict[str, str]
) -> None:
    good = "req-0123456789abcdef"
    response = client.get("/crm/v1/acme/echo", headers={**alice, "X-Request-Id": good})
    assert response.headers["x-request-id"] == good
    assert header_map(response.json())["x-request-id"] == [good]
    bad = "bad id\twith junk"
    response = client.get("/crm/v1/acme/echo", headers={**alice, "X-Request-Id": bad})
    rid = response.headers["x-request-id"]
    assert rid != bad and len(rid) == 32
    assert header_map(response.json())["x-request-id"] == [rid]


def test_content_length_body_streams_intact(client: httpx.Client, alice: dict[str, str]) -> None:
    body = os.urandom(3 * 1024 * 1024)
    response = client.post("/crm/v1/acme/import", content=body, headers=alice)
    assert response.status_code == 200
    assert response.json() == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def test_chunked_body_streams_intact(client: httpx.Client, alice: dict[str, str]) -> None:
    parts = [os.urandom(100_000) for _ in range(20)]
    response = client.post("/voip/v1/acme/upload", content=iter(parts), headers=alice)
    assert response.status_code == 200
    whole = b"".join(parts)
    assert response.json() == {"bytes": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}


def test_chunked_response_passes(client: httpx.Client, alice: dict[str, str]) -> None:
    response = client.get(
        "/voip/v1/acme/recordings/7", params={"size": 500_000, "chunked": 1}, headers=alice
    )
    assert response.status_code == 200
    assert len(response.content) == 500_000
    assert "content-length" not in response.headers


def test_large_download_streams_with_flat_memory(
    client: httpx.Client, alice: dict[str, str]
) -> None:
    size = 1024**3  # 1 GiB through the gateway; the gateway runs in this process.
    rss_before = _rss()
    peak = 0
    received = 0
    with client.stream(
        "GET", "/voip/v1/acme/recordings/1", params={"size": size}, headers=alice
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(size)
        for chunk in response.iter_raw(1 << 20):
            received += len(chunk)
            if received % (64 << 20) < len(chunk):
                peak = max(peak, _rss() - rss_before)
    assert received == size
    assert peak < 100 * 1024 * 1024, f"memory grew by {peak} bytes"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_body_over_max_body_is_413(stack: Stack, token: TokenFactory) -> None:
    limit = stack.policy.max_body
    raw = request_bytes(
        "POST",
        "/crm/v1/acme/import",
        [("Authorization", f"Bearer {token()}"), ("Content-Length", str(limit + 1))],
    )
    response = raw_request(stack.port, raw)
    assert response.status == 413
    assert response.json()["reason"] == "payload_too_large"


def test_chunked_body_over_max_body_is_413(
    client: httpx.Client, stack: Stack, alice: dict[str, str]
) -> None:
    chunk = b"x" * (1 << 20)
    count = stack.policy.max_body // len(chunk) + 2
    response = client.post("/voip/v1/acme/upload", content=iter([chunk] * count), headers=alice)
    assert response.status_code == 413
    assert response.json()["reason"] == "payload_too_large"


def test_header_block_over_limit_is_431(stack: Stack, token: TokenFactory) -> None:
    raw = request_bytes(
        "GET",
        "/crm/v1/acme/leads",
        [("Authorization", f"Bearer {token()}"), ("X-Big", "a" * 20000)],
    )
    response = raw_request(stack.port, raw)
    assert response.status == 431
    assert response.json()["reason"] == "headers_too_large"


def test_content_length_with_transfer_encoding_is_400(stack: Stack, token: TokenFactory) -> None:
    raw = (
        b"POST /crm/v1/acme/echo HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + token().encode() + b"\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"0\r\n\r\n"
    )
    response = raw_request(stack.port, raw)
    assert response.status == 400


def test_unknown_route_is_404_and_wrong_method_is_405(
    client: httpx.Client, alice: dict[str, str]
) -> None:
    response = client.get("/crm/v1/acme/nothing-here", headers=alice)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["reason"] == "route_not_found"
    assert body["request_id"] == response.headers["x-request-id"]
    assert set(body) >= {"type", "title", "status", "detail", "reason", "request_id"}
    response = client.patch("/crm/v1/acme/leads", headers=alice)
    assert response.status_code == 405
    assert response.json()["reason"] == "method_not_allowed"
    assert response.headers["allow"] == "GET, HEAD, POST"


def test_upstream_response_headers_pass_and_hop_by_hop_do_not(
    client: httpx.Client, alice: dict[str, str]
) -> None:
    response = client.post(
        "/crm/v1/acme/leads", json={"name": "N", "email": "n@example.com"}, headers=alice
    )
    assert response.status_code == 201
    assert response.headers["location"].startswith("/crm/v1/acme/leads/")
    assert response.json()["owner"] == "alice"


def test_parser_refusals_are_problem_json(stack: Stack) -> None:
    raw = (
        b"POST /crm/v1/acme/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\nConnection: close\r\n\r\nhello!"
    )
    response = raw_request(stack.port, raw)
    assert response.status == 400
    assert response.header("content-type") == "application/problem+json"
    assert response.json()["reason"] == "bad_request"


def test_oversize_head_is_refused_while_it_arrives(stack: Stack) -> None:
    import socket

    # A header that never ends: the gateway must answer 431 and close without
    # waiting for (or buffering) the rest.
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(b"GET /crm/v1/acme/leads HTTP/1.1\r\nHost: x\r\nX-Flood: ")
        for _ in range(64):
            try:
                sock.sendall(b"a" * 16384)
            except OSError:
                break  # closed by the gateway: good
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 431")
    assert b"headers_too_large" in data
