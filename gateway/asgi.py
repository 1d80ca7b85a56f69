"""Glue between ASGI and the engine: build the context, send a refusal.

Both adapters (the proxy and the middleware) use these, so a refusal looks
the same whichever way Fairgate is deployed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any

from gateway.context import RequestContext
from gateway.decision import Decision
from gateway.headers import valid_request_id
from gateway.problems import render_problem

# Set by gateway.serve's uvicorn protocol; plain strings to avoid importing uvicorn here.
RAW_TARGET = "fairgate.raw_target"
DISCONNECT = "fairgate.disconnect"

Scope = dict[str, Any]
Message = dict[str, Any]


# A random per-process prefix and a counter: unique across replicas and
# restarts, and no system call per request (os.urandom costs one).
_ID_PREFIX = os.urandom(8).hex()
_ids = itertools.count(1)


def _new_prefix() -> None:
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(8).hex()


# Forked workers (--workers N) must not share a prefix.
os.register_at_fork(after_in_child=_new_prefix)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):016x}"


class DisconnectSignal:
    """The server's word that a request's client went away.

    gateway.serve's protocol puts one in every request's scope and fires it
    from ``connection_lost``. While the app has armed it with a task, firing
    cancels that task: a forwarding exchange stops at once instead of running
    on for nobody, and nothing is spent per request to watch for it (no
    watcher task, no timer).
    """

    __slots__ = ("fired", "gone", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.gone = False  # the client has left (whether or not anything was armed)
        self.fired = False  # ... and an armed task was cancelled for it

    def arm(self) -> DisconnectSignal:
        """Cancel the current task when the client leaves. If it has already
        left, ``fired`` is true on return and nothing is cancelled: the caller
        stops by itself (a cancellation now could land anywhere later)."""
        if self.gone:
            self.fired = True
        else:
            self.task = asyncio.current_task()
        return self

    def disarm(self) -> None:
        self.task = None

    def fire(self) -> None:
        self.gone = True
        task = self.task
        if task is not None and not self.fired:
            self.fired = True
            self.task = None
            task.cancel()


def context_from_scope(scope: Scope, request_id_header: bytes) -> RequestContext:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    request_id = None
    for name, value in headers:
        if name == request_id_header:
            # Two ids, or a malformed one, are not the client's to keep.
            request_id = value if request_id is None and valid_request_id(value) else b""
    client = scope.get("client")
    extensions = scope.get("extensions") or {}
    raw_target = extensions.get(RAW_TARGET)
    if raw_target is not None:
        # The target exactly as sent (fragment and absolute form included).
        raw_path, _, query = raw_target.partition(b"?")
    else:
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
        query = scope.get("query_string", b"")
    return RequestContext(
        method=scope["method"],
        raw_path=raw_path,
        query=query,
        headers=headers,
        peer=client[0] if client else None,
        scheme=scope.get("scheme", "http"),
        request_id=request_id.decode() if request_id else new_request_id(),
        started=time.perf_counter(),
        disconnect=extensions.get(DISCONNECT),
    )


async def send_decision(
    send: Any,
    decision: Decision,
    request_id: str,
    request_id_header: bytes,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    head: bool = False,
) -> None:
    status, headers, body = render_problem(decision, request_id, request_id_header)
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
