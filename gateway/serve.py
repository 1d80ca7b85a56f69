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
from collections.abc import Callable, Generator
from typing import Any

import uvicorn

from gateway.asgi import DISCONNECT, RAW_TARGET, DisconnectSignal, new_request_id
from gateway.decision import Decision, deny
from gateway.problems import render_problem

logger = logging.getLogger("fairgate")


# (decision, request id, client host): records a request the protocol refused.
RefusalHook = Callable[[Decision, str, "str | None"], None]

# The request line and header block are capped while they arrive: uvicorn
# would otherwise buffer any amount before the app (and its 431) sees them.
DEFAULT_MAX_HEAD = 64 * 1024


def _protocol(max_head: int, on_refusal: RefusalHook | None = None) -> Any:
    """uvicorn's httptools protocol, keeping the request target as sent, and
    refusing oversize or malformed heads with problem+json.

    uvicorn hands the app a parsed path: fragment dropped, absolute form
    reduced. The canonical-target step must judge the bytes the client sent,
    so the raw target travels in ``scope["extensions"]``. ``on_refusal``
    records what the protocol refuses itself (the Gateway's ``parser_refusal``).
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is a dependency
        return "h11"
    from gateway.response_head import headers_complete

    class RawTargetProtocol(HttpToolsProtocol):  # type: ignore[misc]
        # Bytes received since the current head began; None once it is complete.
        _head: int | None = 0
        _too_large = False
        # (cycle, signal) of requests whose response is not complete yet: one,
        # or a few when the client pipelines.
        _signals: tuple[tuple[Any, DisconnectSignal], ...] = ()
        _lingering = False  # refused and answered: waiting for the client to go
        _linger_timer: asyncio.TimerHandle | None = None

        def data_received(self, data: bytes) -> None:
            if self._lingering:
                return  # refused: what the client still sends is read and dropped
            # Counted before parsing: httptools buffers an unfinished header
            # value itself, so callbacks alone would see the flood too late.
            if self._head is not None:
                end = data.find(b"\r\n\r\n")  # body bytes after the head do not count
                self._head += len(data) if end < 0 else end
                if self._head > max_head:
                    self._too_large = True
                    self.send_400_response("head too large")
                    return
            super().data_received(data)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._head = 0  # the next bytes on this connection start a new head

        def on_headers_complete(self) -> None:
            self._head = None
            # uvicorn's, with a cycle that writes response heads in one
            # native call (gateway.response_head), not two regular
            # expressions per header.
            headers_complete(self)
            extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
            extensions[RAW_TARGET] = bytes(self.url)
            cycle = self.cycle
            if cycle is None or cycle.scope is not self.scope:
                return  # an upgrade: uvicorn made no cycle for it
            gone = extensions[DISCONNECT] = DisconnectSignal()
            pending = (cycle, gone)
            if self._signals:
                live = [p for p in self._signals if not p[0].response_complete]
                self._signals = (*live, pending)
            else:
                self._signals = (pending,)

        def _linger(self) -> None:
            """Close after the client has had time to read the refusal. Closing
            with its bytes still unread (a flood of header, a refused body) makes
            the kernel reset the connection, and the answer is lost with it: so
            send the answer and a FIN, drop what still arrives, and close on the
            client's EOF or after LINGER seconds, as NGINX's lingering close does."""
            self._lingering = True
            # Requests of this connection still running, or queued behind it,
            # must see it gone: nothing may be written after the FIN.
            for cycle in (self.cycle, *(c for c, _ in self.pipeline)):
                if cycle is not None:
                    cycle.disconnected = True
                    cycle.message_event.set()
            self.pipeline.clear()
            self._client_gone()
            self.flow.resume_reading()  # uvicorn may have paused a large body
            transport = self.transport
            if transport.can_write_eof():
                transport.write_eof()
            self._linger_timer = self.loop.call_later(LINGER, transport.close)

        def eof_received(self) -> None:
            if self._lingering:
                self.transport.close()
                return
            super().eof_received()

        def connection_lost(self, exc: Exception | None) -> None:
            # uvicorn swallows ``send`` once the client is gone, and only a
            # ``receive`` would say so: tell the app directly instead.
            if self._linger_timer is not None:
                self._linger_timer.cancel()
                self._linger_timer = None
            self._client_gone()
            super().connection_lost(exc)

        def _client_gone(self) -> None:
            """Fire the disconnect signals of the requests still answering."""
            signals, self._signals = self._signals, ()
            for cycle, gone in signals:
                if not cycle.response_complete:
                    gone.fire()

        def send_400_response(self, msg: str) -> None:
            # Requests the parser refuses (ambiguous framing such as
            # Content-Length with Transfer-Encoding, bad syntax, an oversize
            # head) get the same problem+json as every other refusal.
            decision = (
                deny("headers_too_large", f"The request head exceeds {max_head} bytes.")
                if self._too_large
                else deny("bad_request", "The request is not valid HTTP/1.1.")
            )
            request_id = new_request_id()
            status, headers, body = render_problem(decision, request_id)
            head = [f"HTTP/1.1 {status} {REASON_PHRASES.get(status, 'Error')}\r\n".encode()]
            head += [name + b": " + value + b"\r\n" for name, value in headers]
            self.transport.write(b"".join([*head, b"connection: close\r\n\r\n", body]))
            self._linger()
            # A refusal is a decision: the app records it (the Gateway's audit
            # trail). Only one refused in its head: a request whose body the
            # parser refuses has reached the app, which records it itself.
            if on_refusal is not None and self._head is not None:
                try:
                    on_refusal(decision, request_id, self.client[0] if self.client else None)
                except Exception:
                    logger.exception("recording refused request %s failed", request_id)

    return RawTargetProtocol


REASON_PHRASES = {400: "Bad Request", 431: "Request Header Fields Too Large"}
# Measured with loadtests/bench_ab.py (docs/PERFORMANCE.md): 4 k fewer instructions
# per proxied request, 6 k with a plan, 11 k with the audit trail on. Cyclic garbage
# waits at most 20 000 allocations (a few MB) longer.
GC_THRESHOLD = (20_000, 20, 20)
# How long a refused connection stays open to let its client read the answer.
LINGER = 2.0


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def server(app: Any, *, lifespan: str = "on", max_head: int = DEFAULT_MAX_HEAD) -> _Server:
    # Taken from the app itself, not from whatever uvicorn wraps it in.
    on_refusal: RefusalHook | None = getattr(app, "parser_refusal", None)
    config = uvicorn.Config(
        app,
        loop="none",
        http=_protocol(max_head, on_refusal),
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
    Then young collections run every GC_THRESHOLD[0] allocations instead of
    700: nearly every object of a request dies by reference counting, so a
    collection every few requests mostly walks the requests still in flight.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
