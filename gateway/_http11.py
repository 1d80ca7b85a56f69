"""The HTTP/1.1 client connection behind :mod:`gateway.transport`.

One :class:`Http11Connection` is an :class:`asyncio.Protocol` that carries one request/response
exchange at a time. It only keeps state and wakes whoever waits on it; the awaiting, the
mapping of failures onto ``UpstreamError`` and the pooling live in ``gateway.transport``, so
this module needs nothing from it (no import cycle) and the hot callbacks stay small.

Everything the event loop calls (``data_received`` and the httptools callbacks) is
synchronous and allocation-light: a response costs one headers list, one lower-cased name per
header and the body chunks themselves. The consumer side waits on a single future at a time
(``wait``), woken by any change of state, and re-checks the state itself afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httptools

__all__ = ["MAX_HEAD_BYTES", "READ_HIGH_WATER", "HeadTooLarge", "Http11Connection"]

# Past this many buffered body bytes nobody has taken yet, stop reading from the socket: the
# kernel's receive window then pushes back on the upstream, so a slow client can't make the
# gateway hold an unbounded amount of a large download.
READ_HIGH_WATER = 256 * 1024

# An upstream that never finishes its head must not make us buffer forever (llhttp itself has
# no limit). 64 KiB is far above what real services send, including 1xx interim heads.
MAX_HEAD_BYTES = 64 * 1024

_PARSER_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)


class HeadTooLarge(Exception):
    """The upstream's response head exceeded :data:`MAX_HEAD_BYTES`."""


class _StopParsing(Exception):
    """Raised from a parser callback to stop llhttp at a point it can't be told about.

    httptools ignores what ``on_headers_complete`` returns, so there's no way to say "this is
    the answer to a HEAD, expect no body". Raising makes ``feed_data`` fail with an
    ``HttpParserCallbackError`` right after the head, which ``data_received`` recognises by
    the ``stopped`` flag and turns into a clean end of message.
    """


def _expire(fut: asyncio.Future[bool]) -> None:
    # Timer callback of Http11Connection.wait: False tells the waiter it timed out. A plain
    # result rather than an exception, so an expiry that races a wake-up leaves nothing
    # unretrieved behind.
    if not fut.done():
        fut.set_result(False)


class Http11Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to an upstream; see the module docstring.

    State of the current exchange, read directly by ``gateway.transport``:

    - ``head_done``: the final (non-1xx) head was parsed; ``status``/``headers`` are set.
    - ``message_done``: the whole response is on our side (body chunks may still sit in
      ``chunks``); the connection may be reused if ``keep_alive`` and not ``must_close``.
    - ``closed``: no more bytes will arrive (EOF, reset, abort or a protocol error, which is
      then in ``error``).
    """

    __slots__ = (
        "active",
        "buffered",
        "chunks",
        "closed",
        "error",
        "exchanges",
        "got_bytes",
        "head_bytes",
        "head_done",
        "headers",
        "idle_hook",
        "idle_since",
        "is_head",
        "keep_alive",
        "loop",
        "message_done",
        "must_close",
        "parser",
        "reading_paused",
        "status",
        "stopped",
        "transport",
        "until_eof",
        "waiter",
        "write_paused",
    )

    transport: asyncio.Transport

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # httptools ships no stubs before 0.6.2; keep it Any so typing doesn't depend on it.
        self.parser: Any = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[bool] | None = None
        # Set by the pool while the connection sits idle, so that a close noticed then
        # removes it from the idle stack at once instead of on the next checkout.
        self.idle_hook: Callable[[Http11Connection], None] | None = None
        self.idle_since = 0.0
        self.exchanges = 0
        self.closed = False
        self.error: BaseException | None = None
        self.write_paused = False
        self.reading_paused = False
        self.stopped = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.active = False
        self.is_head = False
        self.head_done = False
        self.message_done = False
        self.got_bytes = False
        self.head_bytes = 0
        self.status = 0
        self.keep_alive = False
        self.until_eof = False
        self.must_close = False

    # -- driven by gateway.transport ---------------------------------------------------------

    def begin(self, is_head: bool) -> None:
        """Reset the per-exchange state; the caller writes the request right after."""
        self.exchanges += 1
        self.active = True
        self.is_head = is_head
        self.head_done = False
        self.message_done = False
        self.got_bytes = False
        self.head_bytes = 0
        self.status = 0
        self.keep_alive = False
        self.until_eof = False

    async def wait(self, timeout: float) -> bool:
        """Sleep until the state changes (True) or ``timeout`` seconds pass (False).

        A cancelled waiter means the caller gave up mid-exchange; the connection is then in
        an unknown state, so it is aborted before ``CancelledError`` propagates.
        """
        loop = self.loop
        fut: asyncio.Future[bool] = loop.create_future()
        self.waiter = fut
        timer = loop.call_later(timeout, _expire, fut)
        try:
            return await fut
        except asyncio.CancelledError:
            self.abort()
            raise
        finally:
            self.waiter = None
            timer.cancel()

    def send(self, data: bytes) -> None:
        """Write unless the connection is gone; a write that finds it gone aborts it.

        asyncio drops writes to a closed transport but uvloop raises RuntimeError, and the
        peer may have closed while we awaited (a connect, a body chunk). Either way the
        caller then sees ``closed`` and reports the failure with its context.
        """
        if self.closed:
            return
        try:
            self.transport.write(data)
        except RuntimeError:
            self.abort()

    def take(self) -> bytes:
        """Detach everything buffered as one bytes object and resume reading if paused."""
        chunks = self.chunks
        if len(chunks) == 1:
            data = chunks.pop()
        else:
            # Coalescing means fewer yields (and fewer ASGI sends) downstream; the buffer is
            # bounded by READ_HIGH_WATER plus one socket read, so the copy is too.
            data = b"".join(chunks)
            chunks.clear()
        self.buffered = 0
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        return data

    def drop_body(self) -> None:
        """Forget unread body bytes (the message is complete) before going back to the pool."""
        if self.chunks:
            self.chunks.clear()
            self.buffered = 0
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection now (RST, nothing flushed). Idempotent."""
        if not self.closed:
            self.closed = True
            self.must_close = True
            self.transport.abort()
        self._wake()

    def close(self) -> None:
        """Close an idle connection politely (FIN after any buffered output)."""
        if not self.closed:
            self.closed = True
            self.must_close = True
            self.transport.close()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.abort()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.error is None:
            self.error = exc
        self.closed = True
        self._left_pool_if_idle()
        self._wake()

    def eof_received(self) -> bool:
        if self.active and self.head_done and self.until_eof:
            # A body without content-length or chunking ends exactly here. httptools exposes
            # no llhttp_finish(), so the end of message is ours to declare.
            self.message_done = True
            self.active = False
        self.closed = True
        self.must_close = True
        self._left_pool_if_idle()
        self._wake()
        return False  # let the transport close itself

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # Bytes nobody asked for (on an idle connection, or after a complete response):
            # the framing can no longer be trusted, so the connection must not be reused.
            self.must_close = True
            self.abort()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except _PARSER_ERRORS as exc:
            self._parser_stopped(exc)
            return
        if not self.head_done:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._fail(HeadTooLarge(f"response head exceeds {MAX_HEAD_BYTES} bytes"))

    def _parser_stopped(self, exc: Exception) -> None:
        if self.stopped:
            self.stopped = False
            if self.must_close:
                self.abort()
            else:
                # After a HEAD the parser sits in its error state: start a fresh one. Anything
                # else in this read would be a (forbidden) HEAD body and is dropped.
                self.parser = httptools.HttpResponseParser(self)
        elif self.message_done:
            # Junk after a complete response (e.g. data after `connection: close`): keep the
            # response, lose the connection.
            self.abort()
        else:
            self._fail(exc)

    def _left_pool_if_idle(self) -> None:
        hook = self.idle_hook
        if hook is not None:
            self.idle_hook = None
            hook(self)

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.head_done:
            # A second response to one request (pipelined junk): stop here.
            self.must_close = True
            self.stopped = True
            raise _StopParsing
        # A fresh list per message: interim 1xx heads are dropped this way, and the list
        # handed to the caller with the final head is never touched again.
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status: int = parser.get_status_code()
        if status < 200:
            # Interim response (100 Continue, 103 Early Hints): llhttp treats it as a complete
            # bodiless message and goes on parsing; 101 surfaces as HttpParserUpgrade.
            return
        self.status = status
        self.head_done = True
        keep_alive: bool = parser.should_keep_alive()
        if self.is_head:
            if not keep_alive:
                # llhttp thinks a bodiless head without content-length needs EOF; for HEAD it
                # doesn't, so decide from the version and `connection` alone.
                keep_alive = self._reusable_by_headers(parser.get_http_version())
            self.keep_alive = keep_alive
            self.message_done = True
            self.active = False
            self.stopped = True
            self._wake()
            raise _StopParsing
        if not keep_alive:
            self.until_eof = self._body_until_eof(status)
        self.keep_alive = keep_alive
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > READ_HIGH_WATER and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.head_done:
            return  # end of an interim 1xx message
        self.message_done = True
        self.active = False
        self._wake()

    # -- rare paths ----------------------------------------------------------------------------

    def _body_until_eof(self, status: int) -> bool:
        # Mirrors llhttp's message_needs_eof() (RFC 9112 6.3): only consulted when llhttp
        # already said the connection won't be kept alive.
        if status == 204 or status == 304:
            return False
        te = b""
        for name, value in self.headers:
            if name == b"content-length":
                return False
            if name == b"transfer-encoding":
                te = value
        return not te.rstrip().lower().endswith(b"chunked")

    def _reusable_by_headers(self, version: str) -> bool:
        tokens: set[bytes] = set()
        for name, value in self.headers:
            if name == b"connection":
                tokens.update(t.strip() for t in value.lower().split(b","))
        if version == "1.0":
            return b"keep-alive" in tokens
        return b"close" not in tokens
