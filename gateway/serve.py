"""Run several ASGI apps on uvicorn in one event loop, stopping together.

uvicorn's ``Server`` installs its own signal handlers, and the last one wins;
with a public and an admin listener (and the demo's upstreams) in one
process, one handler must stop them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

from gateway.asgi import RAW_TARGET

logger = logging.getLogger("fairgate")


def _protocol() -> Any:
    """uvicorn's httptools protocol, keeping the request target as sent.

    uvicorn hands the app a parsed path: fragment dropped, absolute form
    reduced. The canonical-target step must judge the bytes the client sent,
    so the raw target travels in ``scope["extensions"]``.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is a dependency
        return "h11"

    class RawTargetProtocol(HttpToolsProtocol):  # type: ignore[misc]
        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[RAW_TARGET] = bytes(self.url)

    return RawTargetProtocol


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def server(app: Any, *, lifespan: str = "on") -> _Server:
    config = uvicorn.Config(
        app,
        loop="none",
        http=_protocol(),
        lifespan=lifespan,  # type: ignore[arg-type]
        # Access logs would carry raw client IPs; the audit trail records
        # requests with pseudonymous addresses instead.
        access_log=False,
        # uvicorn would otherwise believe X-Forwarded-For from loopback peers
        # and rewrite the client address before the gateway sees the socket.
        # Only gateway.clientaddr decides which proxies to trust.
        proxy_headers=False,
        server_header=False,
        date_header=False,
        log_level="warning",
        timeout_graceful_shutdown=10,
    )
    return _Server(config)


async def serve_all(pairs: list[tuple[uvicorn.Server, socket.socket]]) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for srv, _ in pairs:
            srv.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop)
    try:
        await asyncio.gather(*(srv.serve(sockets=[sock]) for srv, sock in pairs))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


def run(coro: Any) -> None:
    """Run on uvloop when it is installed: it roughly halves loop overhead.

    Everything loaded so far (the policy, compiled routes, modules) lives for
    the whole run: freezing it keeps the collector from walking it again and
    again, which otherwise costs full collections of tens of milliseconds.
    """
    gc.collect()
    gc.freeze()
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
