"""Shared pieces of the audit tests (this module holds no tests itself).

Sinks here are small real classes with the Sink interface, to make a sink
block or fail on demand; Redis tests use a real redis-server of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from gateway.audit import AuditConfig, AuditWriter, client_fields, format_ts
from gateway.audit.sinks import each_line
from tests.support import free_port

KEY = b"audit-test-key-" + b"k" * 17
PSEUDONYM_KEY = b"pseudonym-key-" + b"p" * 18
SUBJECTS = ("alice", "bob", "carol")


def make_record(i: int, *, ip: str = "203.0.113.77", t: float = 1_795_000_000.0) -> dict[str, Any]:
    """A request record as the gateway builds it: no raw IP, only client fields."""
    return {
        "ts": format_ts(t + i),
        "request_id": f"req-{i}",
        "instance": "gw",
        "policy_rev": "r1",
        "decision": ("allow", "deny", "shadow_deny")[i % 3],
        "status": (200, 403, 200)[i % 3],
        "reason": (None, "forbidden_role", "rate_limited")[i % 3],
        "rule": "crm.contacts",
        "mode": "enforce",
        "subject": SUBJECTS[i % 3],
        "tenant": "acme" if i % 2 else "globex",
        "roles": ["agent"],
        "plan": "pro",
        "session": f"s{i % 5}",
        "client": client_fields(ip, PSEUDONYM_KEY),
        "method": "GET",
        "path": f"/crm/contacts/{i}",
        "route": "/crm/contacts/{id}",
        "upstream": "crm",
        "upstream_status": 200,
        "bytes_in": 0,
        "bytes_out": 120 + i,
        "latency_ms": 1.5 + i / 10,
        "signals": [],
        "degraded": False,
    }


def file_config(base: Path, **overrides: Any) -> AuditConfig:
    values: dict[str, Any] = {
        "instance": "gw",
        "worker": 0,
        "sinks": (f"file://{base}",),
        "flush_interval": 0.002,
        "batch_size": 8,
        "checkpoint_every": 10,
        "checkpoint_key": KEY,
    }
    values.update(overrides)
    return AuditConfig(**values)


async def until(condition: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Wait for ``condition`` to hold, polling the loop; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.002)


async def build_trail(base: Path, n: int, *, worker: int = 0, **overrides: Any) -> AuditWriter:
    """A real trail: ``n`` records through the writer, closed cleanly."""
    writer = AuditWriter(file_config(base, worker=worker, **overrides))
    await writer.start()
    for i in range(n):
        await writer.write(make_record(i))
    await writer.aclose()
    return writer


def chain_files(base: Path, chain: str = "gw-w0") -> list[Path]:
    return sorted((base / chain).glob("audit-*.jsonl"))


def complete_lines(path: Path) -> list[bytes]:
    """The file's lines that end in a newline: a test that polls a file while
    a writer appends to it may read the last line half written."""
    return path.read_bytes().split(b"\n")[:-1]


def read_records(paths: list[Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in paths:
        for line in complete_lines(path):
            out.append(orjson.loads(line))
    return out


class MemorySink:
    """Keeps every line it accepts."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.closed = False

    async def write_batch(self, lines: list[bytes]) -> None:
        self.lines.extend(each_line(lines))  # a run of records comes as one chunk

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        self.closed = True

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.lines]


class GateSink(MemorySink):
    """Blocks every batch until ``release`` is set: a stalled disk or network."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def write_batch(self, lines: list[bytes]) -> None:
        self.entered.set()
        await self.release.wait()
        self.lines.extend(lines)


class FlakySink(MemorySink):
    """Raises while ``broken``: accepts nothing of a failed batch."""

    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.broken = broken
        self.attempts = 0

    async def write_batch(self, lines: list[bytes]) -> None:
        self.attempts += 1
        if self.broken:
            raise ConnectionError("sink down")
        self.lines.extend(lines)


class RedisServer:
    """A redis-server of the test's own, on a free port, never persisting."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "/usr/bin/redis-server",
                "--save",
                "",
                "--appendonly",
                "no",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
