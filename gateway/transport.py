"""Upstream HTTP/1.1 client with a keep-alive connection pool.

Our exception hierarchy:

* UpstreamError
  + UpstreamUnavailable - refused, reset, DNS failure, closed before a complete response head
  |                       (or mid-body), malformed response, request body length mismatch,
  |                       pool closed.
  + UpstreamTimeout     - connect timeout; no response head, or no body bytes, within
                          read_timeout; request body write stalled for read_timeout.

The gateway's hot path is "forward a small request, relay a small response", so this is built
straight on ``loop.create_connection`` and ``httptools`` rather than a general-purpose client:
a pooled GET costs one ``transport.write``, one future (plus its timer) and one wake-up. The
connection protocol itself is in :mod:`gateway._http11`.

Usage::

    pool = UpstreamPool("http://127.0.0.1:9101")
    resp = await pool.request(b"GET", b"/crm/v1/acme/leads?page=2", [(b"accept", b"*/*")])
    try:
        async for chunk in resp.iter_body():
            ...
    finally:
        await resp.aclose()

Once :meth:`UpstreamPool.aclose` has run, the pool is closed for good: new requests raise
``UpstreamUnavailable`` and connections of responses still in flight are closed instead of
pooled when those responses finish.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

from gateway._http11 import Http11Connection

__all__ = [
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class UpstreamError(Exception):
    """Base class: the upstream exchange failed (the gateway answers 502/504)."""


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached or broke the exchange."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect, answer or send body bytes in time."""


# RFC 9110 9.2.2. POST/PATCH are never replayed: the upstream may have acted on them.
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
# Methods for which a zero-length body goes without any framing header (RFC 9110 8.6: a
# user agent SHOULD NOT send content-length in a request that has no content for these).
_NO_EMPTY_LENGTH = frozenset((b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"))
# Bytes bodies up to this size go out in the same write as the head (one syscall, one
# segment); beyond it the copy costs more than the extra write.
_COALESCE_LIMIT = 64 * 1024


def _lost(conn: Http11Connection, when: str) -> UpstreamUnavailable:
    """The exception for a connection that closed (or broke) while we needed more of it."""
    err = conn.error
    if isinstance(err, httptools.HttpParserError | httptools.HttpParserUpgrade):
        exc = UpstreamUnavailable(f"malformed response from upstream {when}: {err}")
    elif err is not None:
        exc = UpstreamUnavailable(f"upstream connection failed {when}: {err!r}")
    else:
        exc = UpstreamUnavailable(f"upstream closed the connection {when}")
    exc.__cause__ = err
    return exc


class UpstreamResponse:
    """A response head plus its not-yet-read body.

    ``headers`` are as received (names lower-cased), hop-by-hop ones included. Always finish
    with :meth:`aclose` (reading the body to its end also returns the connection early).
    """

    __slots__ = ("_conn", "_pool", "_tail", "headers", "status")

    def __init__(self, pool: UpstreamPool, conn: Http11Connection) -> None:
        self.status = conn.status
        self.headers = conn.headers
        self._pool = pool
        self._tail = b""
        if conn.message_done:
            # Typical for small responses: the body came with the head. Detach it and give
            # the connection back now, before the caller even starts relaying.
            if conn.chunks:
                self._tail = conn.take()
            self._conn: Http11Connection | None = None
            pool._release(conn)
        else:
            self._conn = conn

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Yield the (de-chunked) body. Raises UpstreamTimeout / UpstreamUnavailable."""
        if self._tail:
            tail = self._tail
            self._tail = b""
            yield tail
        conn = self._conn
        if conn is None:
            return
        timeout = self._pool._read_timeout
        while True:
            if conn.chunks:
                data = conn.take()
                if conn.message_done:
                    # Release before the last yield: once released, `conn` may already carry
                    # someone else's exchange, so it is never looked at again.
                    self._conn = None
                    self._pool._release(conn)
                    yield data
                    return
                yield data
            elif conn.message_done:
                self._conn = None
                self._pool._release(conn)
                return
            elif conn.closed:
                self._conn = None
                raise _lost(conn, "in the middle of the response body")
            elif not await conn.wait(timeout):
                self._conn = None
                conn.abort()
                raise UpstreamTimeout(f"upstream sent no body bytes for {timeout}s")

    async def aclose(self) -> None:
        """Pool the connection if the response is complete on the wire, else close it."""
        self._tail = b""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if conn.message_done:
            conn.drop_body()
            self._pool._release(conn)
        else:
            conn.abort()


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to one upstream origin (http only).

    Idle connections form a LIFO stack (the warmest socket is reused first and the cold
    ones at the bottom age out after ``idle_timeout``); at most ``max_idle`` are kept. There
    is no cap on connections in use. Must be used from a single event loop.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 1.0,
        read_timeout: float = 30.0,
        max_idle: int = 64,
        idle_timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"only http:// upstreams are supported, got {url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"upstream URL must be an origin without a path, got {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"upstream URL must not carry credentials, got {url!r}")
        host = parts.hostname
        if not host:
            raise ValueError(f"upstream URL has no host: {url!r}")
        port = parts.port  # raises ValueError itself for a bad port
        self._host = host
        self._port = 80 if port is None else port
        netloc = host.encode("ascii" if host.isascii() else "idna")
        if b":" in netloc:  # an IPv6 literal
            netloc = b"[" + netloc + b"]"
        if port is not None:
            netloc += b":%d" % port
        self._host_header = netloc
        # The constant middle of every request head, built once.
        self._head_mid = b" HTTP/1.1\r\nhost: " + self._host_header + b"\r\n"
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._idle: list[Http11Connection] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._forget_cb = self._forget  # bound once: it is attached on every release

    @property
    def host_header(self) -> bytes:
        """The ``host`` header value sent upstream, e.g. ``b"127.0.0.1:9101"``."""
        return self._host_header

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes] = b"",
        content_length: int | None = 0,
    ) -> UpstreamResponse:
        """Send one request and return once the final response head has arrived.

        ``target`` (path + query) and ``headers`` are written verbatim; the caller
        guarantees they hold no CR/LF and no framing headers. A ``bytes`` body is always
        framed by its own length (``content_length`` may be omitted; a different non-zero
        value raises ValueError). An iterator body is sent as ``content-length`` when
        ``content_length`` is an int, chunked when it is None.
        """
        if self._closed:
            raise UpstreamUnavailable("upstream pool is closed")
        parts = [method, b" ", target, self._head_mid]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")

        if isinstance(body, bytes):
            size = len(body)
            if content_length and content_length != size:
                raise ValueError(f"content_length={content_length} but the body has {size}")
            if size or method not in _NO_EMPTY_LENGTH:
                parts.append(b"content-length: %d\r\n\r\n" % size)
            else:
                parts.append(b"\r\n")
            rest = b""
            if size <= _COALESCE_LIMIT:
                parts.append(body)
            else:
                rest = body
            payload = b"".join(parts)
            is_head = method == b"HEAD"

            conn = self._checkout()
            if conn is not None:
                try:
                    return await self._exchange(conn, payload, rest, is_head)
                except UpstreamUnavailable:
                    # The stale keep-alive race: the upstream closed this idle connection as
                    # our request went out. Replay once on a fresh connection if no byte of
                    # an answer came back and the method is safe to repeat.
                    if conn.got_bytes or method not in _IDEMPOTENT:
                        raise
            conn = await self._connect()
            return await self._exchange(conn, payload, rest, is_head)

        if content_length is None:
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
        elif content_length < 0:
            raise ValueError(f"negative content_length: {content_length}")
        elif content_length or method not in _NO_EMPTY_LENGTH:
            parts.append(b"content-length: %d\r\n\r\n" % content_length)
        else:
            parts.append(b"\r\n")
        conn = self._checkout() or await self._connect()
        await self._send_streaming(conn, b"".join(parts), body, content_length, method)
        return await self._receive_head(conn)

    async def aclose(self) -> None:
        """Close the idle connections and refuse new requests (see the module docstring)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.idle_hook = None
            conn.close()

    # -- exchanges -------------------------------------------------------------------------------

    async def _exchange(
        self, conn: Http11Connection, payload: bytes, rest: bytes, is_head: bool
    ) -> UpstreamResponse:
        conn.begin(is_head)
        conn.send(payload)
        if rest:
            conn.send(rest)
        return await self._receive_head(conn)

    async def _receive_head(self, conn: Http11Connection) -> UpstreamResponse:
        timeout = self._read_timeout
        while not conn.head_done:
            if conn.closed:
                raise _lost(conn, "before a complete response head")
            if not await conn.wait(timeout):
                conn.abort()
                raise UpstreamTimeout(f"no response head from upstream within {timeout}s")
        return UpstreamResponse(self, conn)

    async def _send_streaming(
        self,
        conn: Http11Connection,
        head: bytes,
        body: AsyncIterator[bytes],
        content_length: int | None,
        method: bytes,
    ) -> None:
        conn.begin(method == b"HEAD")
        write = conn.send
        write(head)
        timeout = self._read_timeout
        sent = 0
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if conn.closed or conn.head_done:
                    # The upstream answered (or went away) before taking the whole body,
                    # e.g. a 413. The rest is never sent, so the connection can't be reused;
                    # _receive_head reports the answer or the failure.
                    conn.must_close = True
                    return
                size = len(chunk)
                sent += size
                if content_length is None:
                    write(b"".join((b"%x\r\n" % size, chunk, b"\r\n")))
                elif sent > content_length:
                    raise UpstreamUnavailable(
                        f"request body exceeds its content-length of {content_length}"
                    )
                else:
                    write(chunk)
                # Transport flow control: don't pile the client's upload up in memory.
                while conn.write_paused and not conn.closed and not conn.head_done:
                    if not await conn.wait(timeout):
                        raise UpstreamTimeout(f"upstream took no request body for {timeout}s")
            if content_length is None:
                write(b"0\r\n\r\n")
            elif sent != content_length:
                raise UpstreamUnavailable(
                    f"request body ended after {sent} of {content_length} bytes"
                )
        except BaseException:
            # Whatever broke (our checks, the client's body iterator, a cancellation), a
            # half-sent request leaves the connection useless.
            conn.abort()
            raise

    # -- the pool ------------------------------------------------------------------------------

    async def _connect(self) -> Http11Connection:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Http11Connection(loop), self._host, self._port
                )
        except TimeoutError as exc:
            # Also the kernel's ETIMEDOUT, which is an OSError subclass: caught first.
            raise UpstreamTimeout(
                f"connecting to {self._host}:{self._port} timed out ({self._connect_timeout}s)"
            ) from exc
        except OSError as exc:  # refused, unreachable, DNS failure (socket.gaierror)
            raise UpstreamUnavailable(
                f"cannot connect to {self._host}:{self._port}: {exc}"
            ) from exc
        return conn

    def _checkout(self) -> Http11Connection | None:
        idle = self._idle
        if not idle:
            return None
        cutoff = time.monotonic() - self._idle_timeout
        while idle:
            conn = idle.pop()
            conn.idle_hook = None
            if conn.closed or conn.transport.is_closing():
                continue
            if conn.idle_since < cutoff:
                conn.close()
                continue
            return conn
        return None

    def _release(self, conn: Http11Connection) -> None:
        if (
            self._closed
            or conn.closed
            or conn.must_close
            or not conn.keep_alive
            or self._max_idle <= 0
        ):
            conn.close()
            return
        conn.drop_body()
        idle = self._idle
        if len(idle) >= self._max_idle:
            oldest = idle.pop(0)
            oldest.idle_hook = None
            oldest.close()
        conn.idle_since = time.monotonic()
        conn.idle_hook = self._forget_cb
        idle.append(conn)
        if self._sweeper is None:
            self._schedule_sweep()

    def _forget(self, conn: Http11Connection) -> None:
        # idle_hook: an idle connection saw EOF or was lost.
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def _schedule_sweep(self) -> None:
        # One timer per pool, aimed at the oldest idle connection's expiry, so idle sockets
        # are closed even when no request comes along to notice they're stale.
        idle = self._idle
        if not idle or self._loop is None:
            return
        delay = idle[0].idle_since + self._idle_timeout - time.monotonic()
        self._sweeper = self._loop.call_later(max(delay, 0.0) + 0.01, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = time.monotonic() - self._idle_timeout
        idle = self._idle
        while idle and idle[0].idle_since <= cutoff:
            conn = idle.pop(0)
            conn.idle_hook = None
            conn.close()
        self._schedule_sweep()
