"""Step 11: turn a finished request into its audit record.

Exactly one record per request, whatever the outcome: allowed, refused at
any step, shadow decisions, upstream errors, client disconnects. Raw client
addresses never enter a record: only a keyed pseudonym and the network.
Tokens, cookies and bodies are never read here at all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.audit.config import AuditConfig
from gateway.audit.inline import InlineWriter
from gateway.audit.records import Snapshot, record_from
from gateway.audit.remote import WriterProcess
from gateway.audit.sealer import SEALER_IMPLEMENTATION as SEALER_IMPLEMENTATION
from gateway.audit.sealer import RecordSealer as RecordSealer
from gateway.audit.writer import AuditWriter
from gateway.context import RequestContext
from gateway.decision import Decision, deny
from gateway.native import select
from gateway.policy.model import AuditPolicy, Policy

# The native snapshot (ext/_facts_c.pyx) unless FAIRGATE_NO_EXTENSIONS is set
# or it is not built; the pure one (gateway/_facts_py.py) returns the same tuple.
_facts, FACTS_IMPLEMENTATION = select("_facts")
if TYPE_CHECKING:
    from gateway._facts_py import snapshot as snapshot
else:
    snapshot = _facts.snapshot

log = logging.getLogger("gateway.audit")


# A request's records go to a writer process of the worker's own (the
# default), or are sealed and written on its event loop (``writer: inline``).
Writer = WriterProcess | InlineWriter | AuditWriter

# How long ``on_sink_failure: block`` holds a request before refusing it.
HOLD_MAX = 30.0


def instance_name() -> str:
    """This replica's name in audit chains: $FAIRGATE_INSTANCE or the host name."""
    raw = os.environ.get("FAIRGATE_INSTANCE") or socket.gethostname() or "fairgate"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", raw)[:64].strip("-.")
    return name or "fairgate"


def build_record(
    req: RequestContext,
    policy: Policy,
    *,
    instance: str,
    ip_key: bytes,
    degraded: bool = False,
    now: float | None = None,
    finished: float | None = None,
) -> dict[str, Any]:
    """The audit record of a finished request, at once (``snapshot`` + ``record_from``)."""
    facts = snapshot(req, policy, degraded=degraded, now=now, finished=finished)
    return record_from(facts, instance=instance, ip_key=ip_key)


def unavailable() -> Decision:
    """The refusal of a request the audit trail cannot record."""
    return deny(
        "audit_unavailable",
        "The audit trail cannot record requests right now.",
        retry_after=5,
        rule="audit",
    )


class AuditTrail:
    """What the adapters call once per request: build the record, write it."""

    def __init__(self, writer: Writer, *, deny_when_unhealthy: bool = False) -> None:
        """``writer`` takes each finished request's record: a writer process's
        worker writes its body straight from the request (natively when
        built) for the process to seal; ``writer: inline`` writes it the same
        way and seals it on this loop; a plain ``AuditWriter`` seals it from
        the request's facts."""
        self.writer = writer
        self.deny_when_unhealthy = deny_when_unhealthy
        self._offer: Callable[[RequestContext, Policy], bool]
        if isinstance(writer, WriterProcess | InlineWriter):
            self._offer = writer.offer_request  # the body straight from the request
        else:
            offer_facts = writer.offer_facts
            self._offer = lambda req, policy: offer_facts(snapshot(req, policy))

    @classmethod
    def from_policy(cls, audit: AuditPolicy, *, instance: str, worker: int) -> AuditTrail:
        config = AuditConfig(
            instance=instance,
            worker=worker,
            sinks=audit.sinks,
            rotate_bytes=audit.rotate_bytes,
            rotate_seconds=audit.rotate_seconds,
            retention_seconds=audit.retention,
            fsync=audit.fsync,  # type: ignore[arg-type]
            batch_size=audit.batch,
            flush_interval=audit.flush,
            queue_size=audit.queue,
            on_sink_failure=audit.on_sink_failure,  # type: ignore[arg-type]
            checkpoint_interval=audit.checkpoint_interval,
            checkpoint_key=audit.checkpoint_key,
        )
        writer: Writer
        if audit.writer == "inline":
            writer = InlineWriter(config, ip_key=audit.ip_key)
        else:
            writer = WriterProcess(config, ip_key=audit.ip_key)
        return cls(writer, deny_when_unhealthy=audit.on_sink_failure == "deny")

    async def admit(self) -> Decision | None:
        """Never serve a request that cannot be recorded. While a sink fails,
        ``on_sink_failure: deny`` refuses at once; ``block`` holds the request
        until the trail recovers (up to ``HOLD_MAX``, then refuses)."""
        if self.writer.healthy:
            return None
        if self.writer.state in ("final", "closed"):
            return unavailable()  # shut down: holding the request would not help
        if not self.deny_when_unhealthy:
            deadline = time.monotonic() + HOLD_MAX
            while not self.writer.healthy and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.writer.healthy:
                return None
        return unavailable()

    @property
    def healthy(self) -> bool:
        return self.writer.healthy

    async def record(self, req: RequestContext, policy: Policy) -> None:
        """Queue the request's record now (waiting only for room), sealed and
        written by the writer a batch at a time, off the request's path."""
        facts = self.offer(req, policy)
        if facts is not None:
            await self.wait_to_queue(facts)

    def offer(self, req: RequestContext, policy: Policy) -> Snapshot | None:
        """``record`` without waiting, the common case: ``None`` once the
        record is queued; else its facts, for ``wait_to_queue`` (the queue is
        full, or a sink fails in block mode)."""
        if self._offer(req, policy):
            return None
        state = self.writer.state
        if state not in ("running", "closing"):
            # Only a request the trail refused (it never started, or had shut
            # down) gets here: say so rather than fail the request's cleanup.
            log.error("request %s not recorded: the audit writer is %s", req.request_id, state)
            return None
        # Its facts, to wait with (taken now: a moment after the response ended).
        return snapshot(req, policy)

    async def wait_to_queue(self, facts: Snapshot) -> None:
        await self.writer.write_facts(facts)
