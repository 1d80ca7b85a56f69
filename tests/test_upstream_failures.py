"""Upstream trouble: refused, too slow, gone mid-stream, client gone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from gateway.policy import load_policy_text
from gateway.proxy import Gateway
from tests.conftest import TokenFactory
from tests.support import ServerThread, wait_for

POLICY = """
version: 1
upstreams:
  dead:  {url: "http://127.0.0.1:%(dead)d", connect_timeout: 0.5s}
  slow:  {url: "http://127.0.0.1:%(slow)d", read_timeout: 0.3s}
auth:
  issuers:
    - {issuer: https://id.fairgate.example, audiences: [crm-voip-api], algorithms: [HS256],
       secret_env: FAIRGATE_JWT_SECRET}
roles: {agent: [x.read]}
routes:
  - {id: dead, methods: [GET], path: /dead, upstream: dead, public: true}
  - {id: slow, methods: [GET], path: /slow, upstream: slow, public: true}
  - {id: hang, methods: [GET], path: "/t/{tenant}/hang", upstream: slow, permission: x.read}
"""


class SlowUpstream:
    """Accepts connections and never answers; records when they close."""

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        try:
            while await reader.read(65536):
                pass
        finally:
            self.closed += 1
            writer.close()


@pytest.fixture(scope="module")
def failing() -> Iterator[tuple[ServerThread, int, SlowUpstream]]:
    servers = ServerThread()
    slow = SlowUpstream()

    async def start() -> int:
        srv = await asyncio.start_server(slow.handle, "127.0.0.1", 0)
        return int(srv.sockets[0].getsockname()[1])

    slow_port = slow.port = servers.call(start())
    # A port that refuses: bind, note it, close.
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    policy = load_policy_text(POLICY % {"dead": dead_port, "slow": slow_port})
    port = servers.add(Gateway(policy))
    yield servers, port, slow
    servers.stop()


def test_refused_upstream_is_502(failing: tuple[ServerThread, int, SlowUpstream]) -> None:
    _, port, _ = failing
    response = httpx.get(f"http://127.0.0.1:{port}/dead")
    assert response.status_code == 502
    assert response.json()["reason"] == "upstream_unavailable"
    assert response.headers["content-type"] == "application/problem+json"


def test_slow_upstream_is_504(failing: tuple[ServerThread, int, SlowUpstream]) -> None:
    _, port, _ = failing
    response = httpx.get(f"http://127.0.0.1:{port}/slow")
    assert response.status_code == 504
    assert response.json()["reason"] == "upstream_timeout"


def test_client_disconnect_cancels_upstream_request(
    failing: tuple[ServerThread, int, SlowUpstream], token: TokenFactory
) -> None:
    import socket

    _, port, slow = failing
    opened, closed = slow.opened, slow.closed
    sock = socket.create_connection(("127.0.0.1", port))
    # Read timeout is 0.3 s; the client leaves well before that.
    sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: slow.opened > opened, what="upstream connection")
    sock.close()
    wait_for(lambda: slow.closed > closed, timeout=0.25, what="upstream connection closed")


def test_client_disconnect_cancels_upstream_request_under_plain_uvicorn(
    failing: tuple[ServerThread, int, SlowUpstream],
) -> None:
    """Another ASGI server gives no disconnect signal: the Gateway watches
    ``receive`` instead, and still abandons the upstream request."""
    import socket

    import uvicorn

    servers, _, slow = failing
    policy = load_policy_text(POLICY % {"dead": 9, "slow": slow.port})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    config = uvicorn.Config(Gateway(policy), http="httptools", log_level="warning", lifespan="on")
    plain = uvicorn.Server(config)
    running = asyncio.run_coroutine_threadsafe(plain.serve(sockets=[sock]), servers.loop)
    try:
        wait_for(lambda: plain.started, what="plain uvicorn start")
        opened, closed = slow.opened, slow.closed
        client = socket.create_connection(sock.getsockname())
        client.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: slow.opened > opened, what="upstream connection")
        client.close()
        # The watcher arms after 10 ms; the read timeout (0.3 s) is far off.
        wait_for(lambda: slow.closed > closed, timeout=0.25, what="upstream connection closed")
    finally:
        plain.should_exit = True
        running.result(timeout=15)


class StreamingUpstream:
    """Reads a request, waits, then streams a response forever; records closes."""

    def __init__(self) -> None:
        self.received = 0
        self.answered = 0
        self.closed = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readuntil(b"0\r\n\r\n")  # the whole chunked body
            self.received += 1
            await asyncio.sleep(0.3)  # the client leaves meanwhile
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            self.answered += 1
            while True:
                writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()


def test_a_client_gone_before_the_response_head_stops_the_stream() -> None:
    """A streamed upload, then the client leaves while the upstream thinks:
    once the head arrives the gateway must drop the exchange, not stream the
    response to nobody."""
    import socket

    servers = ServerThread()
    upstream = StreamingUpstream()
    try:

        async def start() -> int:
            srv = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
            return int(srv.sockets[0].getsockname()[1])

        up_port = servers.call(start())
        policy = load_policy_text(
            "version: 1\n"
            f'upstreams: {{up: {{url: "http://127.0.0.1:{up_port}"}}}}\n'
            "routes: [{id: feed, methods: [POST], path: /feed, upstream: up, public: true}]\n"
        )
        port = servers.add(Gateway(policy))
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(
            b"POST /feed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        wait_for(lambda: upstream.received == 1, what="the request upstream")
        client.close()
        wait_for(lambda: upstream.answered == 1, what="the upstream's response head")
        wait_for(lambda: upstream.closed == 1, timeout=2, what="the stream dropped")
    finally:
        servers.stop()


def test_a_refused_pipelined_request_silences_the_ones_before_it(
    failing: tuple[ServerThread, int, SlowUpstream],
) -> None:
    """A request still running when a later one on its connection is refused
    by the parser: after the 400 and the FIN nothing more may be written (it
    used to raise "write() after write_eof()" inside the request)."""
    import logging
    import socket
    import time

    _, port, slow = failing
    errors: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record)

    handler = Collect()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "fairgate", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        opened = slow.opened
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_for(lambda: slow.opened > opened, what="the first request upstream")
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):  # until the gateway's FIN
                data += chunk
            # The client keeps its side open while the slow exchange ends
            # (read timeout 0.3 s): that exchange must not write any more.
            wait_for(lambda: slow.closed >= slow.opened, what="the slow exchange ended")
            time.sleep(0.05)  # let its refusal reach the (silenced) send
        assert data.startswith(b"HTTP/1.1 400 ") and data.count(b"HTTP/1.1 ") == 1
        assert not errors, [r.getMessage() for r in errors]
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
