"""gateway.transport against real loopback upstreams: uvicorn for the well-behaved ones, raw
asyncio servers (or a thread with blocking sockets) for the misbehaving ones. No mocks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httptools
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.transport import (
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tests.support import free_port

# -- helpers ------------------------------------------------------------------------------------


async def read_all(resp: UpstreamResponse) -> bytes:
    try:
        return b"".join([chunk async for chunk in resp.iter_body()])
    finally:
        await resp.aclose()


async def get(
    pool: UpstreamPool, target: bytes = b"/", method: bytes = b"GET"
) -> tuple[int, bytes]:
    resp = await pool.request(method, target, [])
    return resp.status, await read_all(resp)


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll a condition instead of sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def aiter_chunks(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


# -- uvicorn upstream ---------------------------------------------------------------------------


class EchoApp:
    """Raw ASGI app: /hello (11 bytes), /echo (length + sha256 + headers), /stream (chunked)."""

    def __init__(self) -> None:
        self.clients: set[tuple[str, int]] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        self.clients.add(tuple(scope["client"]))
        path = scope["path"]
        if path == "/echo":
            digest = hashlib.sha256()
            size = 0
            more = True
            while more:
                message = await receive()
                body = message.get("body", b"")
                digest.update(body)
                size += len(body)
                more = message.get("more_body", False)
            payload = json.dumps(
                {
                    "length": size,
                    "sha256": digest.hexdigest(),
                    "method": scope["method"],
                    "target": scope["raw_path"].decode() + "?" + scope["query_string"].decode(),
                    "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
                }
            ).encode()
            await send_simple(send, 200, payload)
        elif path == "/stream":
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"x-kind", b"s")]}
            )
            for i in range(5):
                await send(
                    {"type": "http.response.body", "body": b"part%d;" % i, "more_body": True}
                )
            await send({"type": "http.response.body", "body": b""})
        else:
            await send_simple(send, 200, b"hello world")


async def send_simple(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def uvicorn_upstream(app: Any) -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, http="httptools", lifespan="off", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await until(lambda: server.started or task.done(), timeout=5)
        assert server.started
        yield port
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def echo() -> AsyncIterator[tuple[EchoApp, UpstreamPool]]:
    app = EchoApp()
    async with uvicorn_upstream(app) as port:
        pool = UpstreamPool(f"http://127.0.0.1:{port}", read_timeout=5)
        try:
            yield app, pool
        finally:
            await pool.aclose()


# -- raw asyncio upstreams ----------------------------------------------------------------------

Handler = Callable[["Conn"], Awaitable[None]]


class Conn:
    """One accepted connection of a RawServer, with a tiny HTTP/1.1 request reader."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = asyncio.Event()  # set once the peer (our client) closed or reset

    async def read_request(self) -> tuple[bytes, dict[bytes, bytes], bytes] | None:
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head[:-4].split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        body = b""
        if b"content-length" in headers:
            body = await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding") == b"chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
                data = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(data[:-2])
            body = b"".join(parts)
        return lines[0], headers, body

    async def wait_closed_by_peer(self) -> None:
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.closed.set()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class RawServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.conns: list[Conn] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for conn in self.conns:
            conn.writer.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        conn = Conn(reader, writer)
        self.conns.append(conn)
        try:
            await self.handler(conn)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            # Cancelled only by __aexit__; ending normally keeps asyncio's streams
            # callback from logging the cancellation as an error.
            pass
        finally:
            writer.close()


def keepalive_handler(response: bytes) -> Handler:
    async def handle(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(response)

    return handle


OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"


# -- URL and framing ----------------------------------------------------------------------------


def test_url_validation_and_host_header() -> None:
    assert UpstreamPool("http://127.0.0.1:9101").host_header == b"127.0.0.1:9101"
    assert UpstreamPool("http://127.0.0.1:9101/").host_header == b"127.0.0.1:9101"
    assert UpstreamPool("http://Example.com").host_header == b"example.com"
    assert UpstreamPool("http://[::1]:8080").host_header == b"[::1]:8080"
    for bad in ("https://x:1", "ftp://x", "http://x:1/api", "http://x:1?q", "http://u:p@x:1"):
        with pytest.raises(ValueError):
            UpstreamPool(bad)
    with pytest.raises(ValueError):
        UpstreamPool("http://x:notaport")


def test_exception_hierarchy() -> None:
    assert issubclass(UpstreamUnavailable, UpstreamError)
    assert issubclass(UpstreamTimeout, UpstreamError)
    assert not issubclass(UpstreamTimeout, UpstreamUnavailable)


async def test_request_head_framing() -> None:
    seen: list[tuple[bytes, dict[bytes, bytes], bytes]] = []

    async def handle(conn: Conn) -> None:
        while (req := await conn.read_request()) is not None:
            seen.append(req)
            await conn.send(OK_HELLO)

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        target = b"/crm/v1/acme/leads?page=2&q=%20x"
        assert await get(pool, target) == (200, b"hello world")
        resp = await pool.request(b"POST", b"/p", [(b"x-a", b"1"), (b"X-B", b"two")])
        await read_all(resp)
        resp = await pool.request(b"PUT", b"/p", [], b"abc", 3)
        await read_all(resp)
        resp = await pool.request(b"DELETE", b"/p", [], b"")
        await read_all(resp)
        await pool.aclose()
        assert len(srv.conns) == 1
    (line0, h0, _), (line1, h1, _), (_, h2, body2), (_, h3, _) = seen
    assert line0 == b"GET " + target + b" HTTP/1.1"
    assert h0 == {b"host": pool.host_header}
    assert line1 == b"POST /p HTTP/1.1"
    assert h1 == {b"host": pool.host_header, b"x-a": b"1", b"x-b": b"two", b"content-length": b"0"}
    assert h2[b"content-length"] == b"3" and body2 == b"abc"
    assert b"content-length" not in h3 and b"transfer-encoding" not in h3


async def test_bytes_body_length_conflict_is_a_programming_error() -> None:
    pool = UpstreamPool("http://127.0.0.1:9")
    with pytest.raises(ValueError):
        await pool.request(b"POST", b"/", [], b"abc", 5)
    with pytest.raises(ValueError):
        await pool.request(b"POST", b"/", [], aiter_chunks([b"abc"]), -1)


# -- against uvicorn ----------------------------------------------------------------------------


async def test_keepalive_reuses_one_connection(echo: tuple[EchoApp, UpstreamPool]) -> None:
    app, pool = echo
    for _ in range(5):
        assert await get(pool, b"/hello") == (200, b"hello world")
    resp = await pool.request(b"GET", b"/hello", [])
    assert (b"content-length", b"11") in resp.headers
    assert all(name == name.lower() for name, _ in resp.headers)
    await read_all(resp)
    assert len(app.clients) == 1


async def test_content_length_bodies_arrive_intact(echo: tuple[EchoApp, UpstreamPool]) -> None:
    app, pool = echo
    small = b"x" * 100
    big = bytes(range(256)) * 8192  # 2 MiB: written after the head, not coalesced
    for body in (small, big):
        resp = await pool.request(b"POST", b"/echo?a=1", [(b"x-t", b"1")], body, len(body))
        info = json.loads(await read_all(resp))
        assert info["length"] == len(body)
        assert info["sha256"] == hashlib.sha256(body).hexdigest()
        assert info["target"] == "/echo?a=1"
    # The same with an iterator and a declared length.
    chunks = [big[i : i + 100_000] for i in range(0, len(big), 100_000)]
    resp = await pool.request(b"PUT", b"/echo", [], aiter_chunks(chunks), len(big))
    info = json.loads(await read_all(resp))
    assert (info["length"], info["sha256"]) == (len(big), hashlib.sha256(big).hexdigest())
    assert ["content-length", str(len(big))] in info["headers"]
    assert len(app.clients) == 1


async def test_chunked_request_body_streams_intact(echo: tuple[EchoApp, UpstreamPool]) -> None:
    _, pool = echo
    chunks = [bytes([i % 251]) * (1000 + 7919 * i) for i in range(60)]  # ~14 MiB, odd sizes
    data = b"".join(chunks)
    resp = await pool.request(b"POST", b"/echo", [], aiter_chunks(chunks), None)
    assert resp.status == 200
    info = json.loads(await read_all(resp))
    assert ["transfer-encoding", "chunked"] in info["headers"]
    assert (info["length"], info["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    # Still reusable afterwards.
    assert await get(pool, b"/hello") == (200, b"hello world")


async def test_chunked_response_from_uvicorn(echo: tuple[EchoApp, UpstreamPool]) -> None:
    app, pool = echo
    resp = await pool.request(b"GET", b"/stream", [])
    assert (b"transfer-encoding", b"chunked") in resp.headers
    assert await read_all(resp) == b"part0;part1;part2;part3;part4;"
    assert await get(pool, b"/hello") == (200, b"hello world")
    assert len(app.clients) == 1


async def test_streamed_upload_respects_write_flow_control() -> None:
    total = 48 * 1024 * 1024
    pulled = 0
    pulled_while_stalled = -1

    async def upload() -> AsyncIterator[bytes]:
        nonlocal pulled
        block = b"u" * 65536
        for _ in range(total // len(block)):
            pulled += len(block)
            yield block

    async def handle(conn: Conn) -> None:
        nonlocal pulled_while_stalled
        await conn.reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)  # not reading: socket buffers fill, the transport pauses
        pulled_while_stalled = pulled
        size = len(await conn.reader.readexactly(total))
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n%08d" % size)

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request(b"POST", b"/", [], upload(), total)
        assert int(await read_all(resp)) == total
    # Only what the kernel's socket buffers and the transport's high-water mark hold was
    # pulled from the iterator while the upstream didn't read; without flow control it
    # would have been all of it.
    assert 0 < pulled_while_stalled < 20 * 1024 * 1024


async def test_body_iterator_length_mismatch_aborts() -> None:
    async def handle(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.wait_closed_by_peer()

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        with pytest.raises(UpstreamUnavailable, match="exceeds"):
            await pool.request(b"POST", b"/", [], aiter_chunks([b"abc", b"def"]), 4)
        with pytest.raises(UpstreamUnavailable, match="ended after 3 of 10"):
            await pool.request(b"POST", b"/", [], aiter_chunks([b"abc"]), 10)
        await until(lambda: len(srv.conns) == 2 and all(c.closed.is_set() for c in srv.conns))


async def test_body_iterator_error_propagates_and_aborts() -> None:
    async def handle(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.wait_closed_by_peer()

    class ClientGone(Exception):
        pass

    async def broken() -> AsyncIterator[bytes]:
        yield b"abc"
        raise ClientGone

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        with pytest.raises(ClientGone):
            await pool.request(b"POST", b"/", [], broken(), None)
        await until(lambda: len(srv.conns) == 1 and srv.conns[0].closed.is_set())


async def test_early_response_stops_the_upload() -> None:
    answered = asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.send(
            b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig"
        )
        answered.set()
        await conn.wait_closed_by_peer()

    async def upload() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        await answered.wait()
        for _ in range(3):
            await asyncio.sleep(0.01)  # let the 413 be read
            yield b"b" * 1000

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request(b"POST", b"/", [], upload(), 4000)
        assert resp.status == 413
        assert await read_all(resp) == b"big"
        await until(lambda: srv.conns[0].closed.is_set())


# -- response framing from raw upstreams --------------------------------------------------------


async def test_chunked_response_is_dechunked() -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-trailer: 1\r\n\r\n"
    )

    async def handle(conn: Conn) -> None:
        while await conn.read_request() is not None:
            for i in range(0, len(response), 7):  # awkward segment boundaries
                await conn.send(response[i : i + 7])

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        for _ in range(3):
            assert await get(pool) == (200, b"hello world")
        assert len(srv.conns) == 1
        await pool.aclose()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.binary(max_size=3000),
    chunk_sizes=st.lists(st.integers(1, 700), min_size=1, max_size=8),
    cuts=st.lists(st.integers(1, 400), min_size=1, max_size=8),
)
async def test_chunked_response_any_segmentation(
    body: bytes, chunk_sizes: list[int], cuts: list[int]
) -> None:
    """Any chunking of any body, split into any TCP segments, comes out intact."""
    wire = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    pos = i = 0
    while pos < len(body):
        piece = body[pos : pos + chunk_sizes[i % len(chunk_sizes)]]
        wire.append(b"%x\r\n" % len(piece) + piece + b"\r\n")
        pos += len(piece)
        i += 1
    wire.append(b"0\r\n\r\n")
    response = b"".join(wire)

    async def handle(conn: Conn) -> None:
        while await conn.read_request() is not None:
            i = 0
            n = 0
            while i < len(response):
                step = cuts[n % len(cuts)]
                await conn.send(response[i : i + step])
                i += step
                n += 1

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        assert await get(pool) == (200, body)
        assert await get(pool) == (200, body)
        assert len(srv.conns) == 1
        await pool.aclose()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\n",
    ],
)
async def test_close_delimited_body(head: bytes) -> None:
    async def handle(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(head)
        for i in range(3):
            await asyncio.sleep(0.005)
            await conn.send(b"piece%d " % i)
        conn.writer.close()

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        assert await get(pool) == (200, b"piece0 piece1 piece2 ")
        assert await get(pool) == (200, b"piece0 piece1 piece2 ")  # not reused: new connection
        assert len(srv.conns) == 2


async def test_http10_keepalive_is_reused() -> None:
    response = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer(keepalive_handler(response)) as srv:
        pool = UpstreamPool(srv.url)
        assert await get(pool) == (200, b"ok")
        assert await get(pool) == (200, b"ok")
        assert len(srv.conns) == 1
        await pool.aclose()


async def test_connection_close_response_not_reused() -> None:
    response = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with RawServer(keepalive_handler(response)) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request(b"GET", b"/", [])
        assert (b"connection", b"close") in resp.headers  # hop-by-hop headers are kept
        assert await read_all(resp) == b"ok"
        assert await get(pool) == (200, b"ok")
        assert len(srv.conns) == 2
        await until(lambda: all(c.writer.transport.is_closing() for c in srv.conns[:1]))


async def test_interim_100_continue_is_skipped() -> None:
    async def handle(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await asyncio.sleep(0.01)
            await conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
            await conn.send(b"HTTP/1.1 201 Created\r\nX-Final: 1\r\nContent-Length: 4\r\n\r\ndone")

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        for _ in range(2):
            resp = await pool.request(b"POST", b"/", [(b"expect", b"100-continue")], b"data", 4)
            assert resp.status == 201
            assert resp.headers == [(b"x-final", b"1"), (b"content-length", b"4")]
            assert await read_all(resp) == b"done"
        assert len(srv.conns) == 1
        await pool.aclose()


async def test_head_and_bodiless_statuses_then_reuse() -> None:
    async def handle(conn: Conn) -> None:
        while (req := await conn.read_request()) is not None:
            line = req[0]
            if line.startswith(b"HEAD"):
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            elif b"/204" in line:
                await conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif b"/304" in line:
                await conn.send(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n")
            elif b"/head-chunked" in line:
                await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            else:
                await conn.send(OK_HELLO)

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url, read_timeout=2)
        resp = await pool.request(b"HEAD", b"/", [])
        assert resp.status == 200 and (b"content-length", b"1000") in resp.headers
        assert await read_all(resp) == b""
        assert await get(pool, b"/after-head") == (200, b"hello world")
        assert await get(pool, b"/head-chunked", b"HEAD") == (200, b"")
        assert await get(pool, b"/204") == (204, b"")
        assert await get(pool, b"/304") == (304, b"")
        assert await get(pool, b"/") == (200, b"hello world")
        assert len(srv.conns) == 1
        await pool.aclose()


# -- failures -----------------------------------------------------------------------------------


async def test_refused_port_is_unavailable() -> None:
    pool = UpstreamPool(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamUnavailable) as info:
        await pool.request(b"GET", b"/", [])
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


async def test_dns_failure_is_unavailable() -> None:
    pool = UpstreamPool("http://no-such-host.invalid:80", connect_timeout=5)
    with pytest.raises(UpstreamUnavailable):
        await pool.request(b"GET", b"/", [])


async def test_connect_timeout() -> None:
    # A listener with a zero backlog that never accepts: once its queue holds one
    # connection, the kernel drops further SYNs and connect() hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    loop = asyncio.get_running_loop()
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            try:
                await asyncio.wait_for(loop.sock_connect(filler, ("127.0.0.1", port)), 0.2)
            except TimeoutError:
                break
        pool = UpstreamPool(f"http://127.0.0.1:{port}", connect_timeout=0.2)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match="connecting"):
            await pool.request(b"GET", b"/", [])
        assert time.monotonic() - started < 2
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_never_answers_times_out() -> None:
    async def handle(conn: Conn) -> None:
        await conn.read_request()
        await conn.wait_closed_by_peer()

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url, read_timeout=0.2)
        with pytest.raises(UpstreamTimeout, match="no response head"):
            await pool.request(b"GET", b"/", [])
        await until(lambda: srv.conns[0].closed.is_set())  # timed-out connection is dropped


async def test_body_stall_times_out_mid_stream() -> None:
    async def handle(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
        await conn.wait_closed_by_peer()

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url, read_timeout=0.2)
        resp = await pool.request(b"GET", b"/", [])
        body = resp.iter_body()
        assert await body.__anext__() == b"first"
        with pytest.raises(UpstreamTimeout, match="no body bytes"):
            await body.__anext__()
        await resp.aclose()
        await until(lambda: srv.conns[0].closed.is_set())


async def test_closed_after_head_is_unavailable_mid_body() -> None:
    async def handle(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request(b"GET", b"/", [])
        assert resp.status == 200
        got = []
        with pytest.raises(UpstreamUnavailable, match="middle of the response body"):
            async for chunk in resp.iter_body():
                got.append(chunk)
        assert got == [b"partial"]
        await resp.aclose()


@pytest.mark.parametrize(
    "reply",
    [None, b"", b"HTTP/1.1 200 OK\r\nContent-Le"],
    ids=["closes-on-accept", "nothing", "half-a-head"],
)
async def test_closed_before_head_is_unavailable(reply: bytes | None) -> None:
    async def handle(conn: Conn) -> None:
        if reply is not None:
            await conn.read_request()
            await conn.send(reply)

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        with pytest.raises(UpstreamUnavailable, match="before a complete response head"):
            await pool.request(b"GET", b"/", [])


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTZ/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
    ],
    ids=["bad-status-line", "bad-status-code", "duplicate-length", "unexpected-101"],
)
async def test_malformed_response_is_unavailable(reply: bytes) -> None:
    async def handle(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(reply)
        await conn.wait_closed_by_peer()

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        with pytest.raises(UpstreamUnavailable, match="malformed") as info:
            await pool.request(b"GET", b"/", [])
        assert isinstance(
            info.value.__cause__, httptools.HttpParserError | httptools.HttpParserUpgrade
        )
        await until(lambda: srv.conns[0].closed.is_set())


async def test_endless_head_is_cut_off() -> None:
    async def handle(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\n")
        with contextlib.suppress(ConnectionError):
            for i in range(10_000):
                await conn.send(b"x-filler-%d: %s\r\n" % (i, b"y" * 100))

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        with pytest.raises(UpstreamUnavailable, match="head exceeds"):
            await pool.request(b"GET", b"/", [])


async def test_junk_after_response_prevents_reuse() -> None:
    response = OK_HELLO + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    async with RawServer(keepalive_handler(response)) as srv:
        pool = UpstreamPool(srv.url)
        assert await get(pool) == (200, b"hello world")
        assert await get(pool) == (200, b"hello world")
        assert len(srv.conns) == 2
        await pool.aclose()


# -- the pool -----------------------------------------------------------------------------------


async def test_stale_pooled_connection_is_retried_once() -> None:
    # Each connection answers one request, then drops the next one unanswered: exactly the
    # race of an upstream closing an idle keep-alive connection as our request goes out.
    async def handle(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(OK_HELLO)
        await conn.read_request()

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        for n in range(1, 4):
            assert await get(pool) == (200, b"hello world")
            assert len(srv.conns) == n
        # A non-idempotent method is never replayed.
        with pytest.raises(UpstreamUnavailable, match="before a complete response head"):
            await pool.request(b"POST", b"/", [], b"x", 1)
        # Nor is a streamed body (it can't be replayed).
        assert await get(pool) == (200, b"hello world")
        with pytest.raises(UpstreamUnavailable):
            await pool.request(b"PUT", b"/", [], aiter_chunks([b"x"]), 1)
        await pool.aclose()


async def test_idle_connection_closed_by_upstream_is_skipped() -> None:
    async def handle(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(OK_HELLO)  # keep-alive by default, but close right away

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        assert await get(pool) == (200, b"hello world")
        await until(lambda: not pool._idle)  # the EOF evicts it from the idle stack
        assert await get(pool) == (200, b"hello world")
        assert len(srv.conns) == 2


async def test_idle_timeout_closes_connections() -> None:
    async def handle(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(OK_HELLO)
        await conn.wait_closed_by_peer()

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url, idle_timeout=0.1)
        assert await get(pool) == (200, b"hello world")
        await until(lambda: srv.conns[0].closed.is_set(), timeout=2)
        assert await get(pool) == (200, b"hello world")
        assert len(srv.conns) == 2
        await pool.aclose()


async def test_max_idle_and_lifo() -> None:
    gate = asyncio.Event()

    async def handle(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await gate.wait()
            await conn.send(OK_HELLO)
        conn.closed.set()

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url, max_idle=2)
        pending = [asyncio.create_task(get(pool)) for _ in range(4)]
        await until(lambda: len(srv.conns) == 4)  # no cap on active connections
        gate.set()
        assert await asyncio.gather(*pending) == [(200, b"hello world")] * 4
        await until(lambda: sum(c.closed.is_set() for c in srv.conns) == 2)
        assert len(pool._idle) == 2
        oldest, newest = pool._idle
        assert await get(pool) == (200, b"hello world")
        # LIFO: the newest was taken and put back on top; taking the oldest would swap them.
        assert pool._idle == [oldest, newest]
        await pool.aclose()
        await until(lambda: all(c.closed.is_set() for c in srv.conns))
        with pytest.raises(UpstreamUnavailable, match="closed"):
            await pool.request(b"GET", b"/", [])


async def test_unread_response_closes_connection() -> None:
    async with RawServer(
        keepalive_handler(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    ) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request(b"GET", b"/", [])
        await resp.aclose()
        await resp.aclose()  # idempotent
        assert not pool._idle
        await until(lambda: srv.conns[0].writer.transport.is_closing())


async def test_cancellation_while_waiting_for_head_closes_connection() -> None:
    received = asyncio.Event()

    async def handle(conn: Conn) -> None:
        await conn.read_request()
        received.set()
        await conn.wait_closed_by_peer()

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        task = asyncio.create_task(pool.request(b"GET", b"/", []))
        await asyncio.wait_for(received.wait(), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(srv.conns[0].closed.wait(), 2)
        assert not pool._idle


async def test_cancellation_mid_body_closes_connection() -> None:
    async def handle(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await conn.wait_closed_by_peer()

    async with RawServer(handle) as srv:
        pool = UpstreamPool(srv.url)
        resp = await pool.request(b"GET", b"/", [])
        chunks: list[bytes] = []

        async def consume() -> None:
            async for chunk in resp.iter_body():
                chunks.append(chunk)

        task = asyncio.create_task(consume())
        await until(lambda: chunks == [b"abc"])
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(srv.conns[0].closed.wait(), 2)  # closed before any aclose()
        await resp.aclose()
        assert not pool._idle


# -- backpressure: a big download runs in flat memory ------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_large_download_runs_in_flat_memory() -> None:
    total = 200 * 1024 * 1024
    block = b"z" * (1024 * 1024)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve() -> None:
        # A thread, so the upstream keeps producing while the event loop is idle: without
        # read backpressure, everything would pile up in the client's buffer.
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            with contextlib.suppress(OSError):
                for _ in range(total // len(block)):
                    conn.sendall(block)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    pool = UpstreamPool(f"http://127.0.0.1:{port}", read_timeout=10)
    try:
        baseline = rss_bytes()
        peak = baseline
        resp = await pool.request(b"GET", b"/big", [])
        await asyncio.sleep(0.3)  # a stalled client: the upstream must be held back meanwhile
        peak = max(peak, rss_bytes())
        received = 0
        count = 0
        async for chunk in resp.iter_body():
            received += len(chunk)
            count += 1
            if count % 32 == 0:
                peak = max(peak, rss_bytes())
                await asyncio.sleep(0.001)  # slower than the producer
        await resp.aclose()
        assert received == total
        assert peak - baseline < 50 * 1024 * 1024, f"RSS grew by {(peak - baseline) >> 20} MiB"
    finally:
        await pool.aclose()
        listener.close()
        thread.join(5)


# -- the same paths under uvloop, the loop the gateway runs on in production ---------------------


async def _with_echo(case: Callable[[tuple[EchoApp, UpstreamPool]], Awaitable[None]]) -> None:
    app = EchoApp()
    async with uvicorn_upstream(app) as port:
        pool = UpstreamPool(f"http://127.0.0.1:{port}", read_timeout=5)
        try:
            await case((app, pool))
        finally:
            await pool.aclose()


UVLOOP_CASES: dict[str, Callable[[], Awaitable[None]]] = {
    case.__name__.removeprefix("test_"): case
    for case in (
        test_request_head_framing,
        test_streamed_upload_respects_write_flow_control,
        test_body_iterator_length_mismatch_aborts,
        test_early_response_stops_the_upload,
        test_chunked_response_is_dechunked,
        test_interim_100_continue_is_skipped,
        test_head_and_bodiless_statuses_then_reuse,
        test_refused_port_is_unavailable,
        test_never_answers_times_out,
        test_body_stall_times_out_mid_stream,
        test_closed_after_head_is_unavailable_mid_body,
        test_junk_after_response_prevents_reuse,
        test_stale_pooled_connection_is_retried_once,
        test_idle_connection_closed_by_upstream_is_skipped,
        test_cancellation_while_waiting_for_head_closes_connection,
        test_cancellation_mid_body_closes_connection,
        test_large_download_runs_in_flat_memory,
    )
}
UVLOOP_CASES |= {
    "closes_on_accept": lambda: test_closed_before_head_is_unavailable(None),
    "bad_status_line": lambda: test_malformed_response_is_unavailable(b"HTTZ/1.1 200\r\n\r\n"),
    "keepalive_uvicorn": lambda: _with_echo(test_keepalive_reuses_one_connection),
    "content_length_uvicorn": lambda: _with_echo(test_content_length_bodies_arrive_intact),
    "chunked_upload_uvicorn": lambda: _with_echo(test_chunked_request_body_streams_intact),
}


@pytest.mark.parametrize("case", sorted(UVLOOP_CASES))
def test_under_uvloop(case: str) -> None:
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(UVLOOP_CASES[case]())
