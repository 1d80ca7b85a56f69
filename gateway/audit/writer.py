"""The audit writer: seals records into the chain, queues them, writes them.

One writer per worker process, one chain per writer. ``write`` queues a
record; a single consumer task seals each batch into the chain (seq, prev,
hash) in queue order and writes it to every sink. ``write_lazy`` queues what
a record is built from instead, with the function that seals it (a
``RecordSealer``'s, for a request's snapshot), and the consumer calls it when
it seals the batch: the request pays for a queue entry, and building, serialising and
hashing run a batch at a time, off the request's path (and faster, with the
code hot). Nothing is ever dropped: when the queue is
full ``write`` waits (backpressure), and a failing sink is retried with
backoff until it accepts the batch. What differs by ``on_sink_failure``:

* ``block``: while a sink fails, ``write`` waits until it recovers.
* ``deny``:  ``write`` still queues (up to the bound) and ``healthy`` is
  False, so the gateway refuses new requests (503 ``audit_unavailable``).

A record leaves the queue only once every sink accepted its batch, so
``queue_depth`` counts everything not yet safely written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from gateway.audit.chain import CHECKPOINT, RESERVED, Chain, Record, sign
from gateway.audit.config import AuditConfig
from gateway.audit.sinks import (
    ChainBoundSink,
    ChainBusyError,
    FileSink,
    OpenableSink,
    ResumableSink,
    Sink,
    build_sinks,
)
from gateway.audit.timefmt import format_ts

if TYPE_CHECKING:
    from gateway._records_py import Bodies  # or its native twin: decode_batch's runs

log = logging.getLogger("gateway.audit")

MIN_BACKOFF = 0.05
MAX_BACKOFF = 2.0
CLOSE_TIMEOUT = 5.0
MAX_CHAINS = 64  # <chain>.2 ... <chain>.64 when the chain is held by another writer
LOG_EVERY = 50  # failed rounds between reminders while a sink stays down

# new -> running -> closing (draining; writes still accepted) -> final (the
# final checkpoint is queued; writes refused) -> closed (consumer ended).
State = Literal["new", "running", "closing", "final", "closed"]


class AuditClosedError(RuntimeError):
    """``write`` on a writer that is not started, or already closed."""


@dataclass(slots=True)
class _Item:
    """A queued record or checkpoint; ``line`` is set once it is sealed."""

    source: Any  # what ``seal`` makes the record's line from
    # Makes the line, moving the chain's head, or raises, leaving the head
    # where it was (None for a checkpoint, which the writer makes itself).
    seal: Sealer | None = None
    line: bytes | None = None
    checkpoint: bool = False
    final: bool = False
    recovered: bool = False
    seq: int = 0  # its seq in the chain, once sealed (a run's: its last record's)
    count: int = 1  # records in it: a run of record bodies is sealed as one item


# (source, chain) -> the sealed JSON line: Chain.seal of a record, or a
# RecordSealer's seal of a request's snapshot.
Sealer = Callable[[Any, Chain], bytes]


def sealing(build: Callable[[Any], Record], *, presorted: bool = False) -> Sealer:
    """The sealer of records made by ``build(source)`` (``presorted``: see ``Chain.seal``)."""
    return lambda source, chain: chain.seal(build(source), presorted=presorted)


def _seal_record(record: Record, chain: Chain) -> bytes:
    return chain.seal(record)


def check_record(record: Mapping[str, Any]) -> None:
    """``ValueError`` if ``record`` sets a field the writer sets (its place in the chain)."""
    if not RESERVED.isdisjoint(record):
        clash = sorted(RESERVED.intersection(record))
        raise ValueError(f"audit record must not set {clash}: the writer does")


def failed_record(exc: Exception) -> Record:
    # A record that cannot be built still takes its place in the chain: the
    # trail shows that a decision was made and that its record failed.
    return {"decision": "unknown", "error": f"audit record not built: {type(exc).__name__}"}


class _Parking(Protocol):
    """What ``wait_in_line`` needs of a writer (``AuditWriter``, ``WriterProcess``)."""

    _state: State
    _waiting: int  # writers parked on a full queue (or a failing sink, block mode)
    _order: asyncio.Lock  # parked writers queue in arrival order (FIFO)
    _space: asyncio.Event  # room in the queue, recovery, or closed

    @property
    def chain_id(self) -> str: ...

    def _has_room(self) -> bool: ...


async def wait_in_line(writer: _Parking, enqueue: Callable[[], None]) -> None:
    """Park behind the writers already waiting until ``writer`` has room, then
    ``enqueue()``; ``AuditClosedError`` if it closes first. Never drops."""
    if writer._state not in ("running", "closing"):
        raise AuditClosedError(f"audit writer {writer.chain_id} is {writer._state}")
    writer._waiting += 1
    try:
        async with writer._order:
            while True:
                if writer._state in ("final", "closed"):
                    raise AuditClosedError(f"audit writer {writer.chain_id} is {writer._state}")
                if writer._has_room():
                    break
                writer._space.clear()
                await writer._space.wait()
            enqueue()
    finally:
        writer._waiting -= 1


class AuditWriter:
    def __init__(
        self,
        config: AuditConfig,
        *,
        sinks: Sequence[Sink] | None = None,
        clock: Callable[[], float] = time.time,
        facts_sealer: Sealer | None = None,
        bodies_sealer: Sealer | None = None,
        on_progress: Callable[[], None] | None = None,
        threaded_io: bool = True,
    ) -> None:
        """``sinks`` replaces the sinks of ``config.sinks`` (tests, custom sinks);
        ``clock`` gives wall-clock time for ``ts``, rotation and retention;
        ``facts_sealer`` seals what ``offer_facts`` queues (a request's
        snapshot, or a record body); ``bodies_sealer`` seals what
        ``offer_bodies`` queues (a run of record bodies, in one call);
        ``on_progress`` is called whenever a batch was delivered
        or the sinks' health changed (the writer process reports it);
        ``threaded_io=False``: the file sinks write on the event loop (in a
        writer process, which has nothing else to do meanwhile)."""
        self.config = config
        self._facts_sealer = facts_sealer
        self._bodies_sealer = bodies_sealer
        self._on_progress = on_progress
        self._final = True  # False: aclose(final=False) ends without a final checkpoint
        # The last record of the chain as a previous run left it (start() reads it).
        self.resumed_from: Record | None = None
        # The seq of the last line every sink accepted: records up to it are
        # written (a writer process reports it, so a successor knows the rest).
        self.written_seq = 0
        self._clock = clock
        self._sinks: list[Sink] = list(sinks) if sinks is not None else []
        self._own_sinks = sinks is None
        self._threaded_io = threaded_io
        self._chain = Chain(config.chain_id)
        self._items: deque[_Item] = deque()
        self._queued = 0  # the records (and checkpoints) those items hold
        self._state: State = "new"
        self._sinks_ok = True
        self._written = 0
        self._failures = 0
        self._checkpoints = 0
        self._since_checkpoint = 0  # records queued since the last checkpoint was queued
        self._sealed_since_checkpoint = 0
        self._next_checkpoint_at = 0.0
        self._waiting = 0  # writers parked on a full queue (or a failing sink, block mode)
        self._order = asyncio.Lock()  # parked writers queue in arrival order (FIFO)
        self._space = asyncio.Event()  # room in the queue, recovery, or closed
        self._wakeup = asyncio.Event()  # something was queued, or close was asked
        self._batch_ready = asyncio.Event()  # a full batch is waiting
        self._consumer: asyncio.Task[None] | None = None
        self._crashed = False
        self._sinks_closed = False

    # -- the lead's API ------------------------------------------------------

    @property
    def chain_id(self) -> str:
        return self._chain.chain_id

    @property
    def state(self) -> State:
        """new, running, closing (draining), final, or closed."""
        return self._state

    @property
    def ok(self) -> bool:
        """``healthy`` (``WriterProcess`` keeps it as a plain attribute)."""
        return self.healthy

    @property
    def healthy(self) -> bool:
        """False while a sink fails (and before start / after close)."""
        return self._state == "running" and self._sinks_ok and not self._crashed

    @property
    def sinks_ok(self) -> bool:
        """False while a sink fails, or once the consumer crashed, whatever the state."""
        return self._sinks_ok and not self._crashed

    @property
    def queue_depth(self) -> int:
        """Records and checkpoints queued or in flight, not yet accepted by every sink."""
        return self._queued

    @property
    def written(self) -> int:
        """Records (not checkpoints) accepted by every sink."""
        return self._written

    @property
    def failures(self) -> int:
        """Failed attempts to write a batch (each retry round counts once)."""
        return self._failures

    @property
    def checkpoints(self) -> int:
        """Checkpoints accepted by every sink."""
        return self._checkpoints

    @property
    def seq(self) -> int:
        """The last seq handed out in this chain."""
        return self._chain.seq

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError("AuditWriter.start() called twice")
        if self._own_sinks:
            self._sinks = build_sinks(self.config, self._clock, threaded=self._threaded_io)
        # A start that failed closed its sinks; a retry opens (and must be
        # able to close) new ones.
        self._sinks_closed = False
        try:
            await self._open_sinks()
            await self._resume()
            if self._state != "new":
                # aclose() came while the sinks opened: stay closed.
                raise AuditClosedError(f"audit writer {self.chain_id} closed while starting")
        except BaseException:
            await self._close_sinks()
            raise
        loop = asyncio.get_running_loop()
        self._next_checkpoint_at = loop.time() + self.config.checkpoint_interval
        self._state = "running"
        self._consumer = loop.create_task(self._run(), name=f"audit-{self.chain_id}")
        self._consumer.add_done_callback(self._consumer_done)

    async def records_after(self, seq: int) -> int | None:
        """How many records (not checkpoints) the chain holds after ``seq``, as
        its files say (None without a file sink): what a writer process that
        died wrote after it last reported, so its successor skips them."""
        for sink in self._sinks:
            if isinstance(sink, FileSink):
                return await sink.records_after(seq)
        return None

    async def write(self, record: Mapping[str, Any]) -> None:
        """Queue ``record`` (copied) for sealing into the chain. Waits while the
        queue is full (and, in block mode, while a sink fails); never drops."""
        check_record(record)
        await self.write_lazy(dict(record), _seal_record)

    async def write_lazy(self, source: Any, seal: Sealer) -> None:
        """Queue a record made from ``source``: the consumer calls
        ``seal(source, chain)`` for its line when it seals its batch, in queue
        order (``sealing(build)`` seals the record ``build(source)``). ``source``
        must not change after this call; a record sets no reserved field."""
        if not self.offer(source, seal):
            await wait_in_line(self, lambda: self._queue_record(_Item(source, seal)))

    def offer(self, source: Any, seal: Sealer) -> bool:
        """``write_lazy`` without waiting: True if queued; False when the
        caller must await ``write_lazy`` (queue full, a sink failing in block
        mode, writers already waiting, or the writer not running)."""
        if self._waiting == 0 and self._state in ("running", "closing") and self._has_room():
            self._queue_record(_Item(source, seal))
            return True
        return False

    def offer_facts(self, facts: Any) -> bool:
        """``offer`` of a request's facts, sealed by the writer's ``facts_sealer``."""
        assert self._facts_sealer is not None, "AuditWriter(facts_sealer=...) not given"
        return self.offer(facts, self._facts_sealer)

    def offer_bodies(self, bodies: Bodies | tuple[bytes, ...] | list[bytes], start: int = 0) -> int:
        """Queue the record bodies ``bodies[start:]`` (``RecordSealer.body``,
        written by a worker; a ``frames.Bodies`` run, a tuple or a list)
        without waiting, up to the first that does not fit: how many were
        queued. They are queued as runs, each sealed in one call
        (``bodies_sealer``), with the same seqs, lines, checkpoints and
        wake-ups as one ``offer_facts`` per body."""
        if self._waiting or self._state not in ("running", "closing") or not self._has_room():
            return 0
        return self._queue_bodies(bodies, start, self.config.queue_size)

    def _queue_bodies(
        self, bodies: Bodies | tuple[bytes, ...] | list[bytes], start: int, limit: int
    ) -> int:
        """``offer_bodies`` while fewer than ``limit`` records are queued."""
        seal = self._bodies_sealer
        assert seal is not None, "AuditWriter(bodies_sealer=...) not given"
        every = self.config.checkpoint_every
        end = len(bodies)
        i = start
        while i < end:
            take = min(end - i, limit - self._queued, every - self._since_checkpoint)
            if take <= 0:
                break
            self._items.append(_Item(bodies[i : i + take], seal, count=take))
            self._queued += take
            i += take
            self._since_checkpoint += take
            if self._since_checkpoint >= every:
                self._queue_checkpoint()
        if i > start:
            self._notify()
        return i - start

    async def write_facts(self, facts: Any) -> None:
        """``write_lazy`` of a request's facts, sealed by the writer's ``facts_sealer``."""
        assert self._facts_sealer is not None, "AuditWriter(facts_sealer=...) not given"
        await self.write_lazy(facts, self._facts_sealer)

    async def aclose(self, timeout: float | None = None, *, final: bool = True) -> None:
        """Drain the queue, write a final signed checkpoint, flush, fsync and
        close every sink (SIGTERM). Cancelling ``aclose`` does not stop the
        drain; calling it again waits for it. After ``timeout`` seconds (None:
        no limit) whatever is still queued is abandoned, with an error logged.

        ``final=False`` drains and closes without the final checkpoint: the
        records' source ended uncleanly (a worker killed mid-run), so the
        trail must keep saying that its tail may be missing."""
        if self._state == "new":
            self._state = "closed"
            return
        if not final:
            self._final = False
        if self._state == "running":
            self._state = "closing"
            self._wakeup.set()
            self._batch_ready.set()
        consumer = self._consumer
        assert consumer is not None
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(consumer)
        except TimeoutError:
            log.error(
                "audit: %s closed after %ss with %d record(s) not written",
                self.chain_id,
                timeout,
                self._queued,
            )
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            # A sink that hung the drain may hang its close too: bounded.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._close_sinks()
        except Exception:
            # The consumer crashed (_consumer_done logged it): still close the sinks.
            await self._close_sinks()

    # -- queueing (on the event loop, no awaits: seq order is queue order) ----

    def _has_room(self) -> bool:
        if self._queued >= self.config.queue_size:
            return False
        return self._sinks_ok or self.config.on_sink_failure == "deny"

    def _queue_record(self, item: _Item) -> None:
        self._items.append(item)
        self._queued += 1
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.config.checkpoint_every:
            self._queue_checkpoint()
        self._notify()

    def _queue_checkpoint(self, *, final: bool = False, recovered: bool = False) -> None:
        # Past the queue bound on purpose: a checkpoint must never wait behind
        # the records it covers, and there is at most one per record batch.
        # It is sealed in its place in the queue, so it covers what precedes it.
        self._items.append(_Item(None, checkpoint=True, final=final, recovered=recovered))
        self._queued += 1
        self._since_checkpoint = 0
        self._next_checkpoint_at = asyncio.get_running_loop().time() + (
            self.config.checkpoint_interval
        )
        self._notify()

    def _seal(self, batch: list[_Item]) -> None:
        """Give every unsealed item of ``batch`` its line, in queue order."""
        chain = self._chain
        for item in batch:
            if item.line is not None:
                continue  # sealed for an earlier attempt at this batch
            if item.checkpoint:
                item.line = self._seal_checkpoint(item)
                item.seq = chain.seq
                continue
            assert item.seal is not None
            if item.count == 1:
                item.line = self._seal_or_fail(item.seal, item.source)
            else:
                try:
                    item.line = item.seal(item.source, chain)
                except Exception:  # a run holding a body that is not one: each on its own
                    assert self._facts_sealer is not None, "AuditWriter(facts_sealer=...) not given"
                    seal = self._facts_sealer
                    item.line = b"".join([self._seal_or_fail(seal, body) for body in item.source])
            item.seq = chain.seq
            item.source = None  # the request it was built from can go
            self._sealed_since_checkpoint += item.count

    def _seal_or_fail(self, seal: Sealer, source: Any) -> bytes:
        try:
            return seal(source, self._chain)
        except Exception as exc:  # not built or not serialisable: the chain did not move
            log.error("audit: building or sealing a record failed", exc_info=exc)
            return self._chain.seal(failed_record(exc))

    def _seal_checkpoint(self, item: _Item) -> bytes:
        checkpoint: Record = {
            "type": CHECKPOINT,
            "covers": self._chain.seq,  # the last record this checkpoint vouches for
            "count": self._sealed_since_checkpoint,
            "ts": format_ts(self._clock()),
            "instance": self.config.instance,
            "worker": self.config.worker,
        }
        if item.final:
            checkpoint["final"] = True
        if item.recovered:
            # The previous run ended without a final checkpoint (SIGKILL, crash).
            checkpoint["recovered"] = True
        signer: Callable[[Record], str] | None = None
        if self.config.checkpoint_key is not None:
            checkpoint["alg"] = "hmac-sha256"
            signer = functools.partial(sign, self.config.checkpoint_key)
        self._sealed_since_checkpoint = 0
        return self._chain.seal(checkpoint, signer)

    def _notify(self) -> None:
        self._wakeup.set()
        if self._queued >= self.config.batch_size:
            self._batch_ready.set()

    def _checkpoint_if_due(self) -> None:
        now = asyncio.get_running_loop().time()
        if self._since_checkpoint > 0 and now >= self._next_checkpoint_at:
            self._queue_checkpoint()

    # -- the consumer ----------------------------------------------------------

    async def _open_sinks(self) -> None:
        """Open the sinks on this writer's chain, ``<instance>-w<worker>``. If a
        live writer holds that chain (a second process or Gateway with the same
        instance and worker), continuing it would fork it: take the first free
        ``<instance>-w<worker>.<n>`` instead, and say so."""
        base = self.config.chain_id
        for attempt in range(1, MAX_CHAINS + 1):
            chain_id = base if attempt == 1 else f"{base}.{attempt}"
            for sink in self._sinks:
                if isinstance(sink, ChainBoundSink):
                    sink.bind(chain_id)
            try:
                for sink in self._sinks:
                    if isinstance(sink, OpenableSink):
                        await sink.open()
            except ChainBusyError as exc:
                if attempt == MAX_CHAINS:
                    raise
                log.debug("audit: %s", exc)
                continue
            if attempt > 1:
                log.warning(
                    "audit: chain %s is held by another writer; writing chain %s instead "
                    "(give each process its own FAIRGATE_INSTANCE or worker)",
                    base,
                    chain_id,
                )
            self._chain = Chain(chain_id)
            return

    async def _resume(self) -> None:
        # Files are the authoritative copy; other sinks only when there are none.
        resumable = [s for s in self._sinks if isinstance(s, ResumableSink)]
        files = [s for s in resumable if isinstance(s, FileSink)]
        best: Record | None = None
        for sink in files or resumable:
            found = await sink.last_record()
            if found is not None and (best is None or found["seq"] > best["seq"]):
                best = found
        if best is None:
            return
        self.resumed_from = best
        self._chain = Chain(self.chain_id, int(best["seq"]), str(best["hash"]))
        self.written_seq = self._chain.seq
        if best.get("type") != CHECKPOINT:
            log.warning(
                "audit: %s resumes after seq %d without a final checkpoint: "
                "the previous run stopped uncleanly",
                self.chain_id,
                self._chain.seq,
            )
            self._queue_checkpoint(recovered=True)

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                break
            await self._deliver(batch)
            # Sinks that write without suspending (a writer process's files)
            # would otherwise hold the loop until the queue is empty: let the
            # frames being read and the timeouts of aclose in between.
            await asyncio.sleep(0)
        # Drained: nothing may follow the final checkpoint in this run.
        self._state = "final"
        if self._final:
            self._queue_checkpoint(final=True)
        while self._items:
            await self._deliver(self._take())
        await self._close_sinks()

    async def _next_batch(self) -> list[_Item] | None:
        loop = asyncio.get_running_loop()
        while not self._items:
            if self._state == "closing" and self._waiting == 0:
                return None
            self._checkpoint_if_due()
            if self._items:
                break
            self._wakeup.clear()
            timeout = None
            if self._since_checkpoint > 0:
                timeout = max(0.0, self._next_checkpoint_at - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
        flush_wait = self.config.flush_interval > 0 and self._state == "running"
        if flush_wait and self._queued < self.config.batch_size:
            # Gather a fuller batch (fewer writes and fsyncs) for at most flush_interval.
            self._batch_ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.flush_interval):
                    await self._batch_ready.wait()
        self._checkpoint_if_due()
        return self._take()

    def _take(self) -> list[_Item]:
        # Items stay queued until delivered: cancelled mid-batch, nothing is lost.
        batch = []
        records = 0
        for item in self._items:  # batch_size records (a run may take it past)
            batch.append(item)
            records += item.count
            if records >= self.config.batch_size:
                break
        self._seal(batch)
        return batch

    async def _deliver(self, batch: list[_Item]) -> None:
        lines = [item.line for item in batch if item.line is not None]
        pending = list(self._sinks)
        delay = MIN_BACKOFF
        while pending:
            failed: list[Sink] = []
            for sink in pending:
                try:
                    await sink.write_batch(lines)
                except Exception as exc:
                    failed.append(sink)
                    if self._sinks_ok:
                        log.error("audit: %r failed, retrying: %s", sink, exc, exc_info=exc)
                    elif self._failures % LOG_EVERY == 0:
                        log.error(
                            "audit: %r still failing (%d records queued): %s",
                            sink,
                            self._queued,
                            exc,
                        )
            if not failed:
                break
            # Retry only the sinks that failed: the others already hold the batch.
            pending = failed
            self._failures += 1
            if self._sinks_ok:
                self._sinks_ok = False
                self._progress()
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)
        if not self._sinks_ok:
            log.warning("audit: %s sinks recovered", self.chain_id)
            self._sinks_ok = True
        records = checkpoints = 0
        for item in batch:
            self._items.popleft()
            if item.checkpoint:
                checkpoints += 1
            else:
                records += item.count
        if batch:
            self.written_seq = batch[-1].seq
        self._queued -= records + checkpoints
        self._checkpoints += checkpoints
        self._written += records
        self._space.set()
        self._progress()

    def _progress(self) -> None:
        if self._on_progress is not None:
            try:
                self._on_progress()
            except Exception:  # a report that fails must not stop the writing
                log.exception("audit: reporting progress failed")

    async def _close_sinks(self) -> None:
        if self._sinks_closed:
            return
        self._sinks_closed = True
        for sink in self._sinks:
            try:
                await sink.flush()
                await sink.aclose()
            except Exception as exc:
                log.error("audit: closing %r failed: %s", sink, exc)

    def _consumer_done(self, task: asyncio.Task[None]) -> None:
        self._state = "closed"
        self._space.set()  # parked writers must not wait for a consumer that is gone
        if not task.cancelled() and task.exception() is not None:
            self._crashed = True
            log.critical("audit: writer %s crashed", self.chain_id, exc_info=task.exception())
