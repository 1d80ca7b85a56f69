"""A worker's audit writer in its own process: ``InlineWriter`` (``writer: inline``).

The request's path is the writer process's: each finished request's record
body is written once, natively, straight from the request into a batch
(``RecordBatch.add``), and the batch is handed over when ``batch_size``
records wait or after ``flush_interval``. Handed over here means queued on
this process's ``AuditWriter``, which splices each record's place in the
chain into its body, hashes a run of them in one native call, and writes
them on its file sinks' thread (fsync included), so the event loop never
waits for the disk. The same records, chain and bytes as a writer process
writes, without a socket, a second process or its wake-ups, for about the
CPU of the two processes together (docs/PERFORMANCE.md).

What a SIGKILL of the worker loses is what was not yet written and fsynced:
the batch being gathered (at most ``flush_interval`` seconds of records) and
the hand-overs not yet on disk; ``fairgate audit verify`` reports the
truncation. A writer process would also keep what was handed over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway._facts_py import snapshot
from gateway.audit import frames
from gateway.audit.config import AuditConfig
from gateway.audit.remote import batch_put
from gateway.audit.sealer import RecordBatch, RecordSealer
from gateway.audit.writer import (
    AuditWriter,
    Sealer,
    _Item,
    _seal_record,
    check_record,
    wait_in_line,
)

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.policy.model import Policy


class InlineWriter(AuditWriter):
    def __init__(self, config: AuditConfig, *, ip_key: bytes) -> None:
        sealer = RecordSealer(config.instance, ip_key)
        # The batch is gathered on the request's path (below): the writer
        # seals and writes each hand-over as it comes.
        super().__init__(
            dataclasses.replace(config, flush_interval=0.0),
            facts_sealer=sealer.seal,
            bodies_sealer=sealer.seal_many,
        )
        self._batch = RecordBatch(sealer)
        self._add = self._batch.add
        # Read on every request: plain attributes, not the config's.
        self._batch_size = config.batch_size
        self._room = config.queue_size
        self._deny = config.on_sink_failure == "deny"
        self._send_every = config.flush_interval
        self._send_later: asyncio.TimerHandle | None = None

    @property
    def queue_depth(self) -> int:
        """Records and checkpoints offered, not yet accepted by every sink."""
        return self._queued + self._batch.count

    # -- queueing (the request's path) -----------------------------------------

    def offer_request(self, req: RequestContext, policy: Policy) -> bool:
        """Queue the record of the finished request ``req`` without waiting:
        True if queued; False when the caller must await ``write_facts`` with
        its snapshot (no room, a sink failing in block mode, writers already
        waiting, or not running). This runs once per request."""
        if self._waiting or self._queued + self._batch.count >= self._room:
            return False
        state = self._state
        if (state != "running" and state != "closing") or not (self._sinks_ok or self._deny):
            return False
        try:
            count = self._add(req, policy)
        except Exception:  # never the request's problem: its facts, read again, go as JSON
            count = batch_put(self._batch, snapshot(req, policy))
        self._added(count)
        return True

    def offer_facts(self, facts: Any) -> bool:
        """``offer_request`` for a request's facts (a snapshot), or a record."""
        if self._waiting == 0 and self._state in ("running", "closing") and self._has_room():
            self._queue_facts(facts)
            return True
        return False

    async def write_facts(self, facts: Any) -> None:
        """Queue a request's facts, waiting for room (never dropped)."""
        if not self.offer_facts(facts):
            await wait_in_line(self, lambda: self._queue_facts(facts))

    async def write(self, record: Mapping[str, Any]) -> None:
        """``AuditWriter.write``, in the batch, after the records offered before it."""
        check_record(record)
        await self.write_facts(dict(record))

    def offer(self, source: Any, seal: Sealer) -> bool:
        """``AuditWriter.offer``, after the records offered before it."""
        self._send()
        return super().offer(source, seal)

    async def write_lazy(self, source: Any, seal: Sealer) -> None:
        """``AuditWriter.write_lazy``, after the records offered before it."""
        if not self.offer(source, seal):

            def enqueue() -> None:
                self._send()
                self._queue_record(_Item(source, seal))

            await wait_in_line(self, enqueue)

    def offer_bodies(self, bodies: Any, start: int = 0) -> int:
        """``AuditWriter.offer_bodies``, after the records offered before it."""
        self._send()
        return super().offer_bodies(bodies, start)

    def _has_room(self) -> bool:
        if self._queued + self._batch.count >= self._room:
            return False
        return self._sinks_ok or self._deny

    def _queue_facts(self, item: Any) -> None:
        self._added(batch_put(self._batch, item))

    def _added(self, count: int) -> None:
        # At once: a full batch, a full queue (writers wait for it), or closing.
        if (
            count >= self._batch_size
            or self._queued + count >= self._room
            or self._state != "running"
        ):
            self._send()
        elif self._send_later is None:
            self._send_later = asyncio.get_running_loop().call_later(self._send_every, self._send)

    def _send(self) -> None:
        """Queue the batch on the writer, a run of bodies at a time. Its room
        was taken when each record was offered, so all of it is queued now."""
        if self._send_later is not None:
            self._send_later.cancel()
            self._send_later = None
        if not self._batch.count:
            return
        frame = self._batch.take()
        for item in frames.decode_batch(frame[frames.HEADER.size :]):
            kind = type(item)
            if kind is frames.Bodies:
                self._queue_bodies(item, 0, sys.maxsize)
            elif kind is dict:
                self._queue_record(_Item(item, _seal_record))
            else:  # facts whose body could not be written, as a list
                self._queue_record(_Item(tuple(item), self._facts_sealer))

    # -- closing ---------------------------------------------------------------

    async def aclose(self, timeout: float | None = None, *, final: bool = True) -> None:
        """``AuditWriter.aclose``, after handing over the batch being gathered."""
        self._send()
        await super().aclose(timeout, final=final)
