"""A worker's audit writer in a process of its own: ``WriterProcess``.

Building a record, its canonical JSON, its SHA-256 and its place in the chain,
then writing it, cost a worker about 17 % of a proxied request, three times
the audit trail's budget (issue 5: 5 % of throughput). So a worker only
writes each finished request's record JSON once, natively, straight from the
request and without its place in the chain, into the batch frame it will
hand over (``RecordBatch.add``), and hands the frame, when ``batch_size``
records wait or after ``flush_interval``, to its writer process
(``gateway.audit.sidecar``), which splices in their places, hashes and
writes them as ``AuditWriter`` does in process (it runs one), in the same
chain ``<instance>-w<worker>``, the same bytes.

``WriterProcess`` keeps ``AuditWriter``'s contract towards the gateway:

* nothing is dropped: a record counts against ``queue_size`` from the moment
  it is offered until the writer process reports it written by every sink;
  a full queue makes ``write_facts`` wait (backpressure), in arrival order;
* ``on_sink_failure``: the process reports its sinks' health; ``block`` then
  holds new records, ``deny`` makes ``healthy`` False (503 audit_unavailable);
* ``aclose`` hands over what is left, has the process drain it and write the
  final signed checkpoint, and waits for the process to exit.

If the writer process dies (or stops itself on an error), the worker starts
another, as a failing sink is retried: meanwhile ``healthy`` is False and
records wait, as ``on_sink_failure`` says. The new process continues the
chain (with a ``recovered`` checkpoint) and is handed again every record its
predecessor had not reported written, less those the chain already holds
(the records its files hold after the seq the dead process last reported
written), so none is lost or repeated.

What a SIGKILL of the worker can lose is what it had not handed over yet: at
most ``flush_interval`` seconds of records, never more than a batch (the
worker gathers a batch that long at most; its writer process then writes
each hand-over as it comes). The process still
writes everything it received, then ends without a final checkpoint, so
``fairgate audit verify`` reports the truncation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from gateway._facts_py import snapshot
from gateway.audit import frames
from gateway.audit.config import AuditConfig
from gateway.audit.sealer import RecordBatch, RecordSealer
from gateway.audit.writer import (
    AuditClosedError,
    State,
    check_record,
    failed_record,
    wait_in_line,
)

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.policy.model import Policy

log = logging.getLogger("gateway.audit")

START_TIMEOUT = 30.0
# After ``aclose``'s own timeout, how long the process gets to say it is done.
EXIT_GRACE = 10.0
RESTART_MIN = 0.1
RESTART_MAX = 5.0
# The socket's send buffer (a Unix socket's only limit) up to a whole batch
# frame (1024 records of ~0.7 kB), where net.core.wmem_max allows it: a
# frame written at once reaches the writer process at once, which then wakes
# once per hand-over rather than per 200 kB piece (on a VM a wake-up costs
# ~0.1 ms of CPU).
SOCKET_BUFFER = 4 * 1024 * 1024
# What the writer process may see of the worker's environment: never its
# secrets (the keys it needs come in the open message).
ENV_KEEP = ("PATH", "HOME", "LANG", "TZ", "TMPDIR", "SSL_CERT_FILE", "SSL_CERT_DIR")
ENV_KEEP_PREFIXES = ("LC_", "PYTHON", "FAIRGATE_NO_EXTENSIONS")


class WriterProcessError(RuntimeError):
    """The audit writer process could not start, or said why it would not."""


class _Process:
    """One running writer process and its end of the socket."""

    def __init__(
        self, proc: subprocess.Popen[bytes], reader: asyncio.StreamReader, out: Any
    ) -> None:
        self.proc = proc
        self.reader = reader
        self.out: asyncio.StreamWriter = out
        self.written = 0  # what this process reported written so far
        self.started = time.monotonic()


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ENV_KEEP or k.startswith(ENV_KEEP_PREFIXES)}
    # The child imports exactly what this process imports (and, run with -P,
    # nothing from its working directory, where the audit files may live).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


class WriterProcess:
    def __init__(self, config: AuditConfig, *, ip_key: bytes, python: str | None = None) -> None:
        # What every request reads, kept as plain attributes (a property read
        # per request is measurable): ``ok`` is ``healthy``; ``_accepting``:
        # offer_request and offer_facts may queue, room aside. _refresh() keeps
        # both up to date whenever the state, the sinks' health or the parked
        # writers change.
        self.ok = False
        self._accepting = False
        self._deny = config.on_sink_failure == "deny"
        self._state_now: State = "new"
        self._sinks_ok_now = True
        self._waiting_now = 0
        self.config = config
        self._ip_key = ip_key
        self._python = python or sys.executable
        self._chain_id = config.chain_id
        self._seq = 0
        # The batch not yet handed over: each request's record body, written
        # here, on the request's path, natively and straight from the request
        # (``RecordBatch.add``): once, with no object per record. Facts whose
        # body cannot be written, and ``write``'s records, go in it as JSON.
        self._batch = RecordBatch(RecordSealer(config.instance, ip_key))
        self._add = self._batch.add
        # Batch frames handed over, each with its count of records, until the
        # writer process reports every record of it written: what a process
        # that dies is replaced with. The first ``_first_done`` records of the
        # first frame are reported written already.
        self._handed: deque[list[Any]] = deque()
        self._first_done = 0
        self._handed_count = 0  # records handed over, not yet reported written
        self._pending = 0  # records offered, not yet reported written
        self._written = 0  # records written by every sink, by every process so far
        self._checkpoints = 0
        self._failures = 0
        self._counted = (0, 0)  # checkpoints and failures of the processes before this one
        self._child: _Process | None = None
        self._restarting: asyncio.Task[None] | None = None
        self._restart_delay = 0.0  # grows while processes die young
        self._closing_asked = False  # the close message went out: an exit is expected
        self._order = asyncio.Lock()
        self._space = asyncio.Event()
        self._send_later: asyncio.TimerHandle | None = None
        self._reports: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        # Sizes read on every request, kept as plain attributes.
        self._batch_size = config.batch_size
        self._room = config.queue_size
        # How long a record may wait in the worker before it is handed over
        # (sooner when a batch is full): the most a SIGKILL of the worker can
        # lose. Each hand-over costs a timer, a frame, a write, and in the
        # writer process a write, an fsync and a report: so not less.
        self._send_every = config.flush_interval

    def _refresh(self) -> None:
        state, sinks_ok = self._state_now, self._sinks_ok_now
        self.ok = state == "running" and sinks_ok
        self._accepting = (
            self._waiting_now == 0
            and (state == "running" or state == "closing")
            and (sinks_ok or self._deny)
        )

    @property
    def _state(self) -> State:
        return self._state_now

    @_state.setter
    def _state(self, value: State) -> None:
        self._state_now = value
        self._refresh()

    @property
    def _sinks_ok(self) -> bool:
        return self._sinks_ok_now

    @_sinks_ok.setter
    def _sinks_ok(self, value: bool) -> None:
        self._sinks_ok_now = value
        self._refresh()

    @property
    def _waiting(self) -> int:
        return self._waiting_now

    @_waiting.setter
    def _waiting(self, value: int) -> None:
        self._waiting_now = value
        self._refresh()

    # -- what the gateway reads ------------------------------------------------

    @property
    def chain_id(self) -> str:
        return self._chain_id

    @property
    def state(self) -> State:
        return self._state

    @property
    def healthy(self) -> bool:
        """False while a sink fails, or while the writer process is restarted."""
        return self.ok

    @property
    def queue_depth(self) -> int:
        """Records offered and not yet written by every sink (checkpoints not counted)."""
        return self._pending

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
        return None if self._child is None else self._child.proc.pid

    @property
    def exit_code(self) -> int | None:
        """The writer process's exit status (None while it runs, or before it started)."""
        return None if self._child is None else self._child.proc.returncode

    # -- starting --------------------------------------------------------------

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError("WriterProcess.start() called twice")
        self._state = "running"
        self._sinks_ok = False  # not healthy until the process is ready
        try:
            child, ready = await self._spawn(None)
        except BaseException:
            self._state = "closed"
            raise
        if self._state != "running":  # aclose() came while it started
            await _stop(child)
            raise AuditClosedError(f"audit writer {self._chain_id} closed while starting")
        self._adopt(child, ready)

    async def _spawn(self, after: tuple[str, int] | None) -> tuple[_Process, list[Any]]:
        """A new writer process, ready: it and its ready message. ``after``: the
        chain and seq its predecessor last reported written (None at start)."""
        try:
            ours, theirs = socket.socketpair()
        except OSError as exc:  # out of descriptors, say: retried like a failed start
            raise WriterProcessError(f"cannot start the audit writer process: {exc}") from None
        with contextlib.suppress(OSError):  # only slower with the default buffer
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        try:
            # stdout and stderr are the gateway's: a stdout sink writes where
            # the operator expects it, and the process's errors are seen.
            proc = subprocess.Popen(
                [self._python, "-P", "-m", "gateway.audit.sidecar", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=child_env(),
            )
        except OSError as exc:
            ours.close()
            raise WriterProcessError(f"cannot start the audit writer process: {exc}") from None
        finally:
            theirs.close()
        try:
            reader, out = await asyncio.open_connection(sock=ours)
        except BaseException as exc:
            ours.close()
            proc.kill()
            await _reap(proc)
            if isinstance(exc, OSError):
                raise WriterProcessError(f"cannot reach the audit writer process: {exc}") from None
            raise
        child = _Process(proc, reader, out)
        fields = frames.config_fields(self.config)
        out.write(frames.encode(("open", fields, self._ip_key.hex(), after)))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                message = await frames.read(reader)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, frames.FrameError):
            await _stop(child)
            raise WriterProcessError(
                "the audit writer process did not start (see its error above)"
            ) from None
        except BaseException:
            await _stop(child)
            raise
        if message[0] != "ready":
            await _stop(child)
            raise WriterProcessError(str(message[1]))
        return child, message

    def _adopt(self, child: _Process, ready: list[Any]) -> None:
        """Make ``child`` the writer process; hand it what its predecessor left."""
        _, self._chain_id, self._seq, skip = ready
        self._child = child
        self._closing_asked = False
        self._skip_written(skip)
        if self._first_done:  # the first frame, without what was written of it
            frame, count = self._handed[0]
            self._handed[0] = [
                frames.drop_entries(frame, self._first_done),
                count - self._first_done,
            ]
            self._first_done = 0
        for frame, _ in self._handed:
            child.out.write(frame)
        self._reports = asyncio.get_running_loop().create_task(
            self._read_reports(child), name=f"audit-reports-{self._chain_id}"
        )
        self._sinks_ok = True
        self._space.set()

    def _skip_written(self, skip: int | None) -> int:
        """Drop the first ``skip`` records handed over and not reported written:
        the chain holds them (a process wrote them, then died before it
        reported). None: the chain could not tell (no file sink), so every one
        is handed over again, and some may be written twice. Returns how many."""
        if skip is None:
            if self._handed_count:
                log.warning(
                    "audit: %s: no file sink tells which of %d record(s) the last writer "
                    "process wrote; handing them all over again",
                    self._chain_id,
                    self._handed_count,
                )
            return 0
        skip = self._done(skip)
        self._written += skip
        return skip

    def _done(self, count: int) -> int:
        """Forget the first ``count`` records handed over (written by every
        sink): the number forgotten, at most those handed over."""
        count = min(count, self._handed_count)
        self._handed_count -= count
        self._pending -= count
        handed = self._handed
        left = count
        while left:
            entry = handed[0]
            rest = entry[1] - self._first_done
            if left < rest:
                self._first_done += left
                break
            handed.popleft()
            self._first_done = 0
            left -= rest
        return count

    # -- queueing (the request's path) -----------------------------------------

    def offer_request(self, req: RequestContext, policy: Policy) -> bool:
        """Queue the record of the finished request ``req`` without waiting:
        True if queued; False when the caller must await ``write_facts`` with
        its snapshot (no room, a sink failing in block mode, writers already
        waiting, or not running). This runs once per request."""
        if self._accepting and self._pending < self._room:
            # _queue, inlined, with the body written from the request itself.
            try:
                count = self._add(req, policy)
            except Exception:  # never the request's problem: its facts, read again, go as JSON
                count = self._put(snapshot(req, policy))
            self._pending += 1
            if count >= self._batch_size or self._pending >= self._room:
                self._send()  # a full batch, or a full queue: writers wait for it
            elif self._send_later is None:
                loop = asyncio.get_running_loop()
                self._send_later = loop.call_later(self._send_every, self._send)
            return True
        return False

    def offer_facts(self, facts: Any) -> bool:
        """``offer_request`` for a request's facts (a snapshot), or a record."""
        if self._accepting and self._pending < self._room:
            self._queue(facts)
            return True
        return False

    async def write_facts(self, facts: Any) -> None:
        """Queue a request's facts, waiting for room (never dropped)."""
        if not self.offer_facts(facts):
            await wait_in_line(self, lambda: self._queue(facts))

    async def write(self, record: Mapping[str, Any]) -> None:
        """Queue ``record`` (copied) as ``AuditWriter.write`` does."""
        check_record(record)
        await self.write_facts(dict(record))

    def _has_room(self) -> bool:
        if self._pending >= self._room:
            return False
        return self._sinks_ok or self._deny

    def _queue(self, item: Any) -> None:
        count = self._put(item)
        self._pending += 1
        if count >= self._batch_size or self._pending >= self._room:
            self._send()
        elif self._send_later is None:
            self._send_later = asyncio.get_running_loop().call_later(self._send_every, self._send)

    def _put(self, item: Any) -> int:
        return batch_put(self._batch, item)

    def _send(self) -> None:
        """Hand the batch over to the writer process."""
        if self._send_later is not None:
            self._send_later.cancel()
            self._send_later = None
        batch = self._batch
        child = self._child
        count = batch.count
        if not count or child is None or child.out.is_closing():
            return  # between processes: the next one gets them
        frame = batch.take()
        self._handed.append([frame, count])
        self._handed_count += count
        child.out.write(frame)

    # -- what the writer process reports ---------------------------------------

    async def _read_reports(self, child: _Process) -> None:
        clean = False
        try:
            while True:
                message = await frames.read(child.reader)
                kind = message[0]
                written, checkpoints, failures, sinks_ok, self._seq, self._chain_id = message[1:]
                self._done(written - child.written)
                self._written += written - child.written
                child.written = written
                self._checkpoints = self._counted[0] + checkpoints
                self._failures = self._counted[1] + failures
                if sinks_ok != self._sinks_ok:
                    self._sinks_ok = sinks_ok
                    if sinks_ok:
                        log.warning("audit: %s sinks recovered", self._chain_id)
                    else:
                        log.error("audit: a sink of %s fails; retrying", self._chain_id)
                self._space.set()
                if kind == "closed":
                    clean = self._closing_asked
                    break
        except (asyncio.IncompleteReadError, ConnectionError, frames.FrameError, ValueError):
            pass
        self._counted = (self._checkpoints, self._failures)
        if clean:
            return
        code = await _stop(child)
        if self._state == "closed":
            return
        if self._closing_asked and not self.queue_depth:
            log.error("audit: the writer process of %s ended with %s", self._chain_id, code)
            return
        # It died, or stopped itself on an error: start another (closing too,
        # while records are left). Processes that die young get a growing delay.
        log.critical(
            "audit: the writer process of %s ended unexpectedly (exit %s) with %d record(s) "
            "not yet written; starting another",
            self._chain_id,
            code,
            self.queue_depth,
        )
        young = time.monotonic() - child.started < RESTART_MAX
        grown = min(self._restart_delay * 2 or RESTART_MIN, RESTART_MAX)
        self._restart_delay = grown if young else 0.0
        self._child = None
        self._sinks_ok = False  # records wait (block) or are refused (deny) meanwhile
        self._restarting = asyncio.get_running_loop().create_task(
            self._restart(self._restart_delay)
        )

    async def _restart(self, delay: float) -> None:
        after = (self._chain_id, self._seq)  # where the process that died last reported
        while self._state != "closed":
            if delay:
                await asyncio.sleep(delay)
            try:
                self._adopt(*await self._spawn(after))
                self._send()
                return
            except Exception as exc:  # never give up on the trail: retry, as for a sink
                self._counted = (self._counted[0], self._counted[1] + 1)
                self._failures = self._counted[1]
                log.error("audit: restarting the writer process of %s: %s", self._chain_id, exc)
            delay = min(max(delay * 2, RESTART_MIN), RESTART_MAX)

    # -- closing ---------------------------------------------------------------

    async def aclose(self, timeout: float | None = None, *, final: bool = True) -> None:
        """Hand over what is left, have the writer process drain it and write the
        final signed checkpoint, and wait for it to exit. After ``timeout``
        seconds (None: no limit) what is still queued is abandoned, with an
        error logged, and parked writers get ``AuditClosedError``."""
        if self._state == "new":
            self._state = "closed"
            return
        if self._state == "running":
            self._state = "closing"
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(timeout, final))
        await asyncio.shield(self._closing)

    async def _close(self, timeout: float | None, final: bool) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(_loop_time(deadline)):
                    # Writers parked on a full queue (answered requests), and a
                    # writer process being restarted for them: let them finish.
                    while self._waiting and self._state == "closing":
                        if await self._settle():
                            continue
                        self._send()
                        self._space.clear()
                        await self._space.wait()
            self._state = "final"
            self._space.set()  # parked writers still waiting: they raise now
            # A process that dies while it drains is replaced, and the close
            # said again to its successor (a few times at most).
            for _ in range(3):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(_loop_time(deadline)):
                        while await self._settle():
                            pass
                self._send()
                child = self._child
                if child is None or child.out.is_closing():
                    break
                self._closing_asked = True
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                child.out.write(frames.encode(("close", left, final)))
                if self._reports is not None:
                    wait = None if left is None else left + EXIT_GRACE
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await asyncio.shield(self._reports)
                if not self._restart_pending():
                    break
            if self.queue_depth:
                log.error(
                    "audit: %s closed with %d record(s) not written",
                    self._chain_id,
                    self.queue_depth,
                )
        finally:
            # Closed first: a death noticed while the process is stopped here
            # is the end asked for, not one to restart from.
            self._state = "closed"
            if self._restarting is not None:
                self._restarting.cancel()
            if self._child is not None:
                await _stop(self._child)
            self._space.set()

    def _restart_pending(self) -> bool:
        return self._restarting is not None and not self._restarting.done()

    async def _settle(self) -> bool:
        """Wait for a process that is dying to be seen dead (its reports end),
        then for its successor to start. True if there was anything to wait for."""
        child = self._child
        reports = self._reports
        dying = child is not None and child.out.is_closing()
        if dying and reports is not None and not reports.done():
            await asyncio.shield(reports)
            return True
        if self._restart_pending():
            assert self._restarting is not None
            await asyncio.shield(self._restarting)
            return True
        return False


def batch_put(batch: RecordBatch, item: Any) -> int:
    """``item`` into ``batch``: its record body when it is facts whose body can
    be written; else as JSON, for the writer to seal or to record why it
    cannot; if JSON cannot hold it either (a big int, an object), as
    ``AuditWriter`` does for a record it cannot build, a record saying so, in
    its place in the chain. The batch's count."""
    if type(item) is tuple:
        with contextlib.suppress(Exception):
            return batch.add_facts(item)
    try:
        data = orjson.dumps(item)
    except TypeError as exc:
        log.error("audit: a record cannot be handed to the writer", exc_info=exc)
        data = orjson.dumps(failed_record(exc))
    return batch.add_json(data)


def _loop_time(deadline: float | None) -> float | None:
    """``deadline`` (time.monotonic) on the running loop's clock."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


async def _stop(child: _Process) -> int | None:
    """Close our end and wait for the process to exit (killing it if it will not)."""
    child.out.close()
    return await _reap(child.proc)


async def _reap(proc: subprocess.Popen[bytes]) -> int | None:
    try:
        return await asyncio.wait_for(asyncio.to_thread(proc.wait), EXIT_GRACE)
    except TimeoutError:
        log.error("audit: the writer process %d did not exit; killing it", proc.pid)
        proc.kill()
        return await asyncio.to_thread(proc.wait)
