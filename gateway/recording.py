"""Step 11: turn a finished request into its audit record.

Exactly one record per request, whatever the outcome: allowed, refused at
any step, shadow decisions, upstream errors, client disconnects. Raw client
addresses never enter a record: only a keyed pseudonym and the network.
Tokens, cookies and bodies are never read here at all.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from functools import lru_cache
from typing import Any

from gateway.audit.config import AuditConfig
from gateway.audit.privacy import pseudonymize
from gateway.audit.writer import AuditWriter
from gateway.context import RequestContext
from gateway.decision import Decision, deny
from gateway.policy.model import AuditPolicy, Policy

# How long ``on_sink_failure: block`` holds a request before refusing it.
HOLD_MAX = 30.0


def instance_name() -> str:
    """This replica's name in audit chains: $FAIRGATE_INSTANCE or the host name."""
    raw = os.environ.get("FAIRGATE_INSTANCE") or socket.gethostname() or "fairgate"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", raw)[:64].strip("-.")
    return name or "fairgate"


@lru_cache(maxsize=65536)
def _pseudonym(ip: str, key: bytes) -> str:
    # An HMAC per request is measurable; clients repeat, so keep the answers.
    return pseudonymize(ip, key)


_second: list[Any] = [None, ""]


def _timestamp(now: float) -> str:
    """ISO 8601 UTC with milliseconds; the part up to the second is reused."""
    whole = int(now)
    if _second[0] != whole:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


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
    """The audit record of a finished request. ``now`` (wall clock) and
    ``finished`` (``perf_counter``) are when it ended: the record may be built
    later, by the writer.

    The keys are in canonical (sorted) order at every level, with ``chain``,
    ``prev`` and ``seq`` as placeholders for the writer, so sealing can skip
    the sort (``Chain.seal(presorted=True)``).
    """
    identity, route, refusal = req.identity, req.route, req.refusal
    rule: str | None = None
    if refusal is not None:
        decision, reason, rule, mode = "deny", refusal.reason, refusal.rule, "enforce"
    elif req.shadow:
        # The request passed; the record says what enforcement would have done.
        first_reason, _, rule = req.shadow[0].partition(":")
        decision, reason, mode = "shadow_deny", first_reason, "shadow"
    else:
        decision, reason, mode = "allow", None, "enforce"
    client = req.client
    signals = [*req.signals, *req.shadow]
    if req.aborted:
        signals.append(req.aborted)
    if finished is None:
        finished = time.perf_counter()
    return {
        "bytes_in": req.bytes_in,
        "bytes_out": req.bytes_out,
        "chain": None,
        "client": {
            "network": client.network if client else None,
            "pseudonym": _pseudonym(client.ip, ip_key) if client else None,
        },
        "decision": decision,
        "degraded": degraded,
        "instance": instance,
        "latency_ms": round((finished - req.started) * 1000, 3),
        "method": req.method,
        "mode": mode,
        # The canonical path when there is one; a refused target is kept as
        # sent (escaped, bounded) so probing shows up in the trail.
        "path": req.path or req.raw_path[:512].decode("latin-1").encode("unicode_escape").decode(),
        "plan": identity.plan if identity else None,
        "policy_rev": policy.revision,
        "prev": None,
        "reason": reason,
        "request_id": req.request_id,
        "roles": list(identity.roles) if identity else [],
        "route": route.id if route else None,
        "rule": rule,
        "seq": None,
        "session": identity.session if identity else None,
        "signals": signals,
        "status": req.status,
        "subject": identity.subject if identity else None,
        "tenant": identity.tenant if identity else None,
        "ts": _timestamp(time.time() if now is None else now),
        "upstream": route.upstream if route else None,
        "upstream_status": req.upstream_status,
    }


class AuditTrail:
    """What the adapters call once per request: build the record, write it."""

    def __init__(
        self,
        writer: AuditWriter,
        *,
        instance: str,
        ip_key: bytes,
        deny_when_unhealthy: bool = False,
    ) -> None:
        self.writer = writer
        self.instance = instance
        self.ip_key = ip_key
        self.deny_when_unhealthy = deny_when_unhealthy

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
            queue_size=audit.queue,
            on_sink_failure=audit.on_sink_failure,  # type: ignore[arg-type]
            checkpoint_interval=audit.checkpoint_interval,
            checkpoint_key=audit.checkpoint_key,
        )
        return cls(
            AuditWriter(config),
            instance=instance,
            ip_key=audit.ip_key,
            deny_when_unhealthy=audit.on_sink_failure == "deny",
        )

    async def admit(self) -> Decision | None:
        """Never serve a request that cannot be recorded. While a sink fails,
        ``on_sink_failure: deny`` refuses at once; ``block`` holds the request
        until the trail recovers (up to ``HOLD_MAX``, then refuses)."""
        if self.writer.healthy:
            return None
        if not self.deny_when_unhealthy:
            deadline = time.monotonic() + HOLD_MAX
            while not self.writer.healthy and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.writer.healthy:
                return None
        return deny(
            "audit_unavailable",
            "The audit trail cannot record requests right now.",
            retry_after=5,
            rule="audit",
        )

    @property
    def healthy(self) -> bool:
        return self.writer.healthy

    async def record(self, req: RequestContext, policy: Policy) -> None:
        """Queue the request's record. The writer builds it a batch at a time,
        off the request's path: ``req`` must not change after this call."""
        source = (req, policy, time.time(), time.perf_counter())
        if not self.writer.offer(source, self._build, presorted=True):
            await self.writer.write_lazy(source, self._build, presorted=True)

    def _build(self, source: tuple[RequestContext, Policy, float, float]) -> dict[str, Any]:
        req, policy, now, finished = source
        return build_record(
            req, policy, instance=self.instance, ip_key=self.ip_key, now=now, finished=finished
        )
