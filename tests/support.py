"""Test harness: real servers on loopback, and a raw HTTP client.

Servers run under real uvicorn (httptools, uvloop) in a background thread
with its own event loop, so tests can talk to them over real sockets.
Hostile request targets go through ``raw_request``, because HTTP client
libraries normalise the very paths these tests must send.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvloop

from gateway.admin import bind
from gateway.serve import server


class ServerThread:
    """Run ASGI apps under uvicorn on free loopback ports in one thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._servers: list[Any] = []
        self._running: list[Any] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def add(self, app: Any, *, lifespan: str = "on", port: int = 0) -> int:
        sock = bind("127.0.0.1", port)
        srv = server(app, lifespan=lifespan)
        self._servers.append(srv)
        self._running.append(asyncio.run_coroutine_threadsafe(srv.serve(sockets=[sock]), self.loop))
        wait_for(lambda: srv.started, what="server start")
        return int(sock.getsockname()[1])

    def call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Shut every server down cleanly (lifespan shutdown included), then the loop."""
        for srv in self._servers:
            srv.should_exit = True
        for running in self._running:
            with contextlib.suppress(Exception):
                running.result(timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def wait_for(condition: Callable[[], Any], *, timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``condition`` until it is truthy; fail the test on timeout."""
    import time

    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        import orjson

        return orjson.loads(self.body)


def raw_request(port: int, data: bytes, *, timeout: float = 10.0) -> RawResponse:
    """Send exact bytes; read one response until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if _complete(b"".join(chunks)):
                break
    return parse_response(b"".join(chunks))


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def parse_response(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines or not lines[0].startswith(b"HTTP/"):
        raise AssertionError(f"no HTTP response: {data[:200]!r}")
    status = int(lines[0].split()[1])
    headers = []
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.decode().strip(), value.decode("latin-1").strip()))
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        body = _dechunk(body)
    return RawResponse(status, headers, body, head)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def request_bytes(
    method: str,
    target: str | bytes,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    host: str = "gateway.test",
) -> bytes:
    t = target if isinstance(target, bytes) else target.encode("latin-1")
    lines = [method.encode() + b" " + t + b" HTTP/1.1", b"Host: " + host.encode()]
    for name, value in headers or []:
        lines.append(f"{name}: {value}".encode("latin-1"))
    if body:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    import os

    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A free loopback port for a server a test starts, below the kernel's
    ephemeral range. A port the kernel picks (a bind to port 0) is one it may
    also give, before the server binds it, to any outgoing connection as its
    local port: a server then failed to start now and then, "address already
    in use". Never the same port twice in a session."""
    low = _ephemeral_low()
    for _ in range(500):
        port = random.randint(10_000, low - 1) if low > 10_500 else 0
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen = int(s.getsockname()[1])
        _PORTS_GIVEN.add(chosen)
        return chosen
    raise RuntimeError("no free loopback port below the ephemeral range")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass
class FairgateProcess:
    """``fairgate run`` in a subprocess, as an operator starts it."""

    proc: Any
    port: int
    admin_port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def stop(self, sig: int = 15, timeout: float = 30) -> tuple[int, str]:
        """Send ``sig`` (SIGTERM by default); the exit code and stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=timeout)
        return int(self.proc.returncode), str(err)


def start_fairgate(policy: Any, env: dict[str, str], cwd: Any, *args: str) -> FairgateProcess:
    """Start ``fairgate run`` on free loopback ports; wait until it answers."""
    import subprocess
    import sys

    import httpx

    port, admin_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--policy",
            str(policy),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--admin",
            f"127.0.0.1:{admin_port}",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )

    def answers() -> bool:
        if proc.poll() is not None:
            return True
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return httpx.get(f"http://127.0.0.1:{admin_port}/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, timeout=30, what="fairgate run")
    if proc.poll() is not None:
        raise AssertionError(f"fairgate run exited: {proc.communicate()[1]}")
    return FairgateProcess(proc, port, admin_port)


REQUIRE_EXTENSIONS = __import__("os").environ.get("FAIRGATE_REQUIRE_EXTENSIONS") == "1"


def load_native(name: str) -> tuple[Any, str]:
    """``(gateway.<name> or None, the import error)``: a native module may be unbuilt."""
    import importlib

    try:
        return importlib.import_module(f"gateway.{name}"), ""
    except ImportError as exc:  # pragma: no cover - depends on the build
        return None, repr(exc)


def require_native(module: Any, error: str, name: str) -> Any:
    """The native twin, or a skip (a failure with FAIRGATE_REQUIRE_EXTENSIONS=1)."""
    import pytest

    if module is None:
        build = "python setup.py build_ext --inplace"
        msg = f"native gateway.{name} is not built (run `{build}`): {error}"
        if REQUIRE_EXTENSIONS:
            pytest.fail(f"FAIRGATE_REQUIRE_EXTENSIONS=1 but {msg}")
        pytest.skip(msg)
    return module
