"""A worker's audit writer in a process of its own: ``WriterProcess``.

Building a record, its canonical JSON, its SHA-256 and its place in the chain,
then writing it, cost a worker about 15 % of a proxied request, three times
the audit trail's budget (issue 5: 5 % of throughput). So a worker only takes
each request's facts (``gateway.recording.snapshot``) and hands them, a batch
at a time, to its writer process (``gateway.audit.sidecar``), which seals and
writes them exactly as ``AuditWriter`` does in process (it runs one), in the
same chain ``<instance>-w<worker>``, the same bytes.

``WriterProcess`` keeps ``AuditWriter``'s contract towards the gateway:

* nothing is dropped: a record counts against ``queue_size`` from the moment
  it is offered until the writer process reports it written by every sink;
  a full queue makes ``write_facts`` wait (backpressure), in arrival order;
* ``on_sink_failure``: the process reports its sinks' health; ``block`` then
  holds new records, ``deny`` makes ``healthy`` False (503 audit_unavailable);
* ``aclose`` hands over what is left, has the process drain it and write the
  final signed checkpoint, and waits for the process to exit;
* if the writer process dies, ``healthy`` stays False: the worker fails
  closed rather than serve requests it cannot record.

What a SIGKILL of the worker can lose is what it had not handed over yet: at
most ``flush_interval`` seconds of records (the time the writer would have
waited to fill a batch anyway), never more than a batch. The process still
writes everything it received, then ends without a final checkpoint, so
``fairgate audit verify`` reports the truncation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from gateway.audit import frames
from gateway.audit.chain import RESERVED
from gateway.audit.config import AuditConfig
from gateway.audit.writer import AuditClosedError, State, failed_record

log = logging.getLogger("gateway.audit")

START_TIMEOUT = 30.0
# After ``aclose``'s own timeout, how long the process gets to say it is done.
EXIT_GRACE = 10.0


class WriterProcessError(RuntimeError):
    """The audit writer process could not start, or said why it would not."""


class WriterProcess:
    def __init__(self, config: AuditConfig, *, ip_key: bytes, python: str | None = None) -> None:
        self.config = config
        self._ip_key = ip_key
        self._python = python or sys.executable
        self._state: State = "new"
        self._chain_id = config.chain_id
        self._seq = 0
        self._buffer: list[Any] = []  # facts (tuples) and records (dicts) not yet handed over
        self._sent = 0  # records handed over
        self._written = 0  # ... and reported written by every sink
        self._checkpoints = 0
        self._failures = 0
        self._sinks_ok = True
        self._crashed = False
        self._waiting = 0
        self._order = asyncio.Lock()
        self._space = asyncio.Event()
        self._send_later: asyncio.TimerHandle | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: asyncio.StreamWriter | None = None
        self._reports: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        # Sizes read on every request, kept as plain attributes.
        self._batch = config.batch_size
        # How long a record may wait in the worker before it is handed over
        # (sooner when a batch is full): the most a SIGKILL of the worker can
        # lose. Each hand-over costs a timer, a frame and a write, so it is
        # the writer's own batching interval, not less.
        self._send_every = config.flush_interval
        self._room = config.queue_size
        self._deny = config.on_sink_failure == "deny"

    # -- what the gateway reads ------------------------------------------------

    @property
    def chain_id(self) -> str:
        return self._chain_id

    @property
    def state(self) -> State:
        return self._state

    @property
    def healthy(self) -> bool:
        return self._state == "running" and self._sinks_ok and not self._crashed

    @property
    def queue_depth(self) -> int:
        """Records offered and not yet written by every sink (checkpoints not counted)."""
        return len(self._buffer) + self._sent - self._written

    @property
    def written(self) -> int:
        return self._written

    @property
    def failures(self) -> int:
        return self._failures

    @property
    def checkpoints(self) -> int:
        return self._checkpoints

    @property
    def seq(self) -> int:
        """The last seq the writer process reported."""
        return self._seq

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # -- starting --------------------------------------------------------------

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError("WriterProcess.start() called twice")
        ours, theirs = socket.socketpair()
        try:
            # stdout and stderr are the gateway's: a stdout sink writes where
            # the operator expects it, and the process's errors are seen.
            self._proc = subprocess.Popen(
                [self._python, "-m", "gateway.audit.sidecar", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            ours.close()
            raise WriterProcessError(f"cannot start the audit writer process: {exc}") from None
        finally:
            theirs.close()
        reader, self._out = await asyncio.open_connection(sock=ours)
        fields = frames.config_fields(self.config)
        self._out.write(frames.encode(("open", fields, self._ip_key.hex())))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                message = await frames.read(reader)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, frames.FrameError):
            await self._stop_process()
            raise WriterProcessError(
                "the audit writer process did not start (see its error above)"
            ) from None
        except BaseException:
            await self._stop_process()
            raise
        if message[0] != "ready":
            await self._stop_process()
            raise WriterProcessError(str(message[1]))
        _, self._chain_id, self._seq = message
        self._state = "running"
        self._reports = asyncio.get_running_loop().create_task(
            self._read_reports(reader), name=f"audit-reports-{self._chain_id}"
        )

    # -- queueing (the request's path) -----------------------------------------

    def offer_facts(self, facts: Any) -> bool:
        """Queue a request's facts without waiting: True if queued; False when
        the caller must await ``write_facts`` (no room, a sink failing in
        block mode, writers already waiting, or not running)."""
        buffer = self._buffer
        if (
            self._waiting == 0
            and (self._state == "running" or self._state == "closing")
            and len(buffer) + self._sent - self._written < self._room
            and (self._sinks_ok or self._deny)
        ):
            # _queue, inlined: this runs once per request.
            buffer.append(facts)
            if len(buffer) >= self._batch:
                self._send()
            elif self._send_later is None:
                loop = asyncio.get_running_loop()
                self._send_later = loop.call_later(self._send_every, self._send)
            return True
        return False

    async def write_facts(self, facts: Any) -> None:
        """Queue a request's facts, waiting for room (never dropped)."""
        if self.offer_facts(facts):
            return
        if self._state not in ("running", "closing"):
            raise AuditClosedError(f"audit writer {self._chain_id} is {self._state}")
        self._waiting += 1
        try:
            async with self._order:
                while True:
                    if self._state in ("final", "closed"):
                        raise AuditClosedError(f"audit writer {self._chain_id} is {self._state}")
                    if self._has_room():
                        break
                    self._space.clear()
                    await self._space.wait()
                self._queue(facts)
        finally:
            self._waiting -= 1

    async def write(self, record: Mapping[str, Any]) -> None:
        """Queue ``record`` (copied) as ``AuditWriter.write`` does."""
        if not RESERVED.isdisjoint(record):
            clash = sorted(RESERVED.intersection(record))
            raise ValueError(f"audit record must not set {clash}: the writer does")
        await self.write_facts(dict(record))

    def _has_room(self) -> bool:
        if len(self._buffer) + self._sent - self._written >= self._room:
            return False
        return self._sinks_ok or self._deny

    def _queue(self, item: Any) -> None:
        buffer = self._buffer
        buffer.append(item)
        if len(buffer) >= self._batch:
            self._send()
        elif self._send_later is None:
            self._send_later = asyncio.get_running_loop().call_later(self._send_every, self._send)

    def _send(self) -> None:
        """Hand the buffered records over to the writer process."""
        if self._send_later is not None:
            self._send_later.cancel()
            self._send_later = None
        batch = self._buffer
        out = self._out
        if not batch or out is None or out.is_closing():
            return  # a dead process: the records stay counted, healthy is False
        self._buffer = []
        try:
            frame = frames.encode(("batch", batch))
        except TypeError:  # rare: a value JSON cannot hold (a big int, an object)
            frame = frames.encode(("batch", [_serializable(item) for item in batch]))
        self._sent += len(batch)
        out.write(frame)

    # -- what the writer process reports ---------------------------------------

    async def _read_reports(self, reader: asyncio.StreamReader) -> None:
        clean = False
        try:
            while True:
                message = await frames.read(reader)
                kind = message[0]
                (
                    self._written,
                    self._checkpoints,
                    self._failures,
                    sinks_ok,
                    self._seq,
                    self._chain_id,
                ) = message[1:]
                if sinks_ok != self._sinks_ok:
                    self._sinks_ok = sinks_ok
                    if sinks_ok:
                        log.warning("audit: %s sinks recovered", self._chain_id)
                    else:
                        log.error("audit: a sink of %s fails; retrying", self._chain_id)
                self._space.set()
                if kind == "closed":
                    clean = True
                    break
        except (asyncio.IncompleteReadError, ConnectionError, frames.FrameError, ValueError):
            pass
        finally:
            if not clean and self._state != "closed":
                self._crashed = True
                log.critical(
                    "audit: the writer process of %s ended unexpectedly (exit %s): "
                    "requests are refused until the gateway restarts",
                    self._chain_id,
                    None if self._proc is None else self._proc.poll(),
                )
            self._state = "closed"
            self._space.set()  # parked writers must not wait for a process that is gone

    # -- closing ---------------------------------------------------------------

    async def aclose(self, timeout: float | None = None, *, final: bool = True) -> None:
        """Hand over what is left, have the writer process drain it and write the
        final signed checkpoint, and wait for it to exit. After ``timeout``
        seconds (None: no limit) the process is told to abandon what is left."""
        if self._state == "new":
            self._state = "closed"
            return
        if self._state == "running":
            self._state = "closing"
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(timeout, final))
        await asyncio.shield(self._closing)

    async def _close(self, timeout: float | None, final: bool) -> None:
        try:
            # Writers parked on a full queue hold answered requests: let them in.
            while self._waiting and self._state == "closing":
                self._send()
                self._space.clear()
                await self._space.wait()
            self._send()
            if self._state == "closing":
                self._state = "final"
            if self._out is not None and not self._out.is_closing():
                self._out.write(frames.encode(("close", timeout, final)))
            if self._reports is not None:
                wait = None if timeout is None else timeout + EXIT_GRACE
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await asyncio.shield(self._reports)
        finally:
            await self._stop_process()
            self._state = "closed"

    async def _stop_process(self) -> None:
        if self._out is not None:
            self._out.close()
        proc = self._proc
        if proc is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), EXIT_GRACE)
        except TimeoutError:
            log.error("audit: the writer process %d did not exit; killing it", proc.pid)
            proc.kill()
            await asyncio.to_thread(proc.wait)


def _serializable(item: Any) -> Any:
    """``item`` if JSON can hold it, else, as ``AuditWriter`` does for a record
    it cannot build, a record saying so, in its place in the chain."""
    try:
        frames.encode(item)
    except TypeError as exc:
        log.error("audit: a record cannot be handed to the writer process", exc_info=exc)
        return failed_record(exc)
    return item
