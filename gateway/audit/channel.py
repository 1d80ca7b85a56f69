"""The writer process's end of its socket to the worker (``FrameChannel``).

A ``BufferedProtocol``: the socket reads each frame straight into a buffer of
the frame's own size, and (natively) a batch's record bodies are sealed where
that buffer holds them (``frames.Bodies``). A stream reader would copy each
byte three more times (into its buffer, out of it, into bytes) and pause and
resume reading around a large frame; a batch of 1024 records is ~0.7 MB.

The worker's end stays a stream (``frames.read``): it only reads short
reports.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Any

from gateway.audit import frames

# Frames read ahead of the writer before the socket is left unread, and the
# bytes they may hold: the worker bounds what it hands over (its queue), so
# this only spares memory.
READ_AHEAD = 16
READ_AHEAD_BYTES = 16 * 1024 * 1024


class FrameChannel(asyncio.BufferedProtocol):
    """Messages in (``read``), frames out (``write``, ``drain``)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._head = bytearray(frames.HEADER.size)
        self._frame: bytearray | None = None  # None: reading a header
        self._batch = False
        self._got = 0
        self._frames: deque[tuple[bool, bytearray]] = deque()
        self._bytes = 0  # in self._frames
        self._end: BaseException | None = None  # why no more frames will come
        self._reading: asyncio.Future[None] | None = None
        # Set while the transport holds more than it wants to; done when it
        # can take more (or the connection is gone).
        self._writable: asyncio.Future[None] | None = None
        self._paused = False

    # -- the transport's side ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._frame is None:
            return memoryview(self._head)[self._got :]
        return memoryview(self._frame)[self._got :]

    def buffer_updated(self, nbytes: int) -> None:
        self._got += nbytes
        if self._frame is None:
            if self._got < len(self._head):
                return
            try:
                self._batch, size = frames.frame_size(self._head)
            except frames.FrameError as exc:
                self._stop(exc)
                return
            self._frame = bytearray(size)
            self._got = 0
        if self._got < len(self._frame):
            return
        self._frames.append((self._batch, self._frame))
        self._bytes += len(self._frame)
        self._frame = None
        self._got = 0
        self._wake_reader()
        if len(self._frames) >= READ_AHEAD or self._bytes >= READ_AHEAD_BYTES:
            self._pause()

    def eof_received(self) -> bool:
        self._ended(asyncio.IncompleteReadError(b"", None))
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc or asyncio.IncompleteReadError(b"", None))
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- the writer process's side -------------------------------------------

    @property
    def paused(self) -> bool:
        """Whether the socket is left unread: enough frames wait to be read."""
        return self._paused

    @property
    def waiting(self) -> int:
        """Frames read from the socket, not yet by ``read``."""
        return len(self._frames)

    async def read(self) -> Any:
        """The next message, as ``frames.read`` gives it:
        ``asyncio.IncompleteReadError`` (or the connection's error) at the
        end, ``frames.FrameError`` for a frame that does not decode (and,
        for one whose header is corrupt, after the frames before it)."""
        while not self._frames:
            if self._end is not None:
                raise self._end.with_traceback(None)  # raised again: no old frames kept
            self._reading = asyncio.get_running_loop().create_future()
            try:
                await self._reading
            finally:
                self._reading = None
        batch, payload = self._frames.popleft()
        self._bytes -= len(payload)
        if self._paused and self._end is None and len(self._frames) < READ_AHEAD // 2:
            self._paused = False
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()
        return frames.message(batch, payload)

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport holds more than it wants to; then
        ``ConnectionResetError`` if the connection is gone."""
        if self._writable is not None and not self._writable.done():
            # Shielded: a caller cancelled must not cancel it for the others.
            await asyncio.shield(self._writable)
        if self.is_closing():
            raise ConnectionResetError("the socket to the worker is closed")

    def is_closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _ended(self, exc: BaseException) -> None:
        if self._end is None:  # as a stream ends: mid-frame or between frames
            self._end = exc
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self._reading is not None and not self._reading.done():
            self._reading.set_result(None)

    def _stop(self, exc: BaseException) -> None:
        # Nothing after a corrupt header can be framed: stop reading, but
        # keep the socket, so the writer can still drain and report.
        self._ended(exc)
        self._pause()


async def connect(sock: socket.socket) -> FrameChannel:
    """The channel over the connected socket ``sock``."""
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_connection(FrameChannel, sock=sock)
    return channel
