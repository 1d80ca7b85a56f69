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
from functools import lru_cache
from typing import Any

from gateway.audit.config import AuditConfig
from gateway.audit.privacy import pseudonymize
from gateway.audit.writer import AuditWriter
from gateway.context import RequestContext
from gateway.decision import Decision, deny
from gateway.policy.model import AuditPolicy, Policy

log = logging.getLogger("gateway.audit")

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


# What a record is built from: strings, numbers, None and tuples of them only.
# Such a tuple is untracked by the garbage collector once it survives a
# collection, so records waiting in the writer's queue add nothing to the
# collector's work (holding the request itself would: ~8 µs per request).
Snapshot = tuple[Any, ...]


def snapshot(
    req: RequestContext,
    policy: Policy,
    *,
    degraded: bool = False,
    now: float | None = None,
    finished: float | None = None,
) -> Snapshot:
    """The facts of a finished request that its audit record holds. ``now``
    (wall clock) and ``finished`` (``perf_counter``) are when it ended."""
    identity, route, refusal, client = req.identity, req.route, req.refusal, req.client
    rule: str | None = None
    if refusal is not None:
        decision, reason, rule, mode = "deny", refusal.reason, refusal.rule, "enforce"
    elif req.shadow:
        # The request passed; the record says what enforcement would have done.
        first_reason, _, rule = req.shadow[0].partition(":")
        decision, reason, mode = "shadow_deny", first_reason, "shadow"
    else:
        decision, reason, mode = "allow", None, "enforce"
    signals = (*req.signals, *req.shadow)
    if req.aborted:
        signals += (req.aborted,)
    if finished is None:
        finished = time.perf_counter()
    return (
        req.bytes_in,
        req.bytes_out,
        client.network if client else None,
        client.ip if client else None,
        decision,
        degraded,
        round((finished - req.started) * 1000, 3),
        req.method,
        mode,
        # The canonical path when there is one; a refused target is kept as
        # sent (escaped, bounded) so probing shows up in the trail.
        req.path or req.raw_path[:512].decode("latin-1").encode("unicode_escape").decode(),
        identity.plan if identity else None,
        policy.revision,
        reason,
        req.request_id,
        identity.roles if identity else (),
        route.id if route else None,
        rule,
        identity.session if identity else None,
        signals,
        req.status,
        identity.subject if identity else None,
        identity.tenant if identity else None,
        time.time() if now is None else now,
        route.upstream if route else None,
        req.upstream_status,
    )


def record_from(facts: Snapshot, *, instance: str, ip_key: bytes) -> dict[str, Any]:
    """The audit record of a snapshot.

    The keys are in canonical (sorted) order at every level, with ``chain``,
    ``prev`` and ``seq`` as placeholders for the writer, so sealing can skip
    the sort (``Chain.seal(presorted=True)``).
    """
    (
        bytes_in,
        bytes_out,
        network,
        ip,
        decision,
        degraded,
        latency_ms,
        method,
        mode,
        path,
        plan,
        policy_rev,
        reason,
        request_id,
        roles,
        route,
        rule,
        session,
        signals,
        status,
        subject,
        tenant,
        ts,
        upstream,
        upstream_status,
    ) = facts
    return {
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "chain": None,
        "client": {
            "network": network,
            "pseudonym": _pseudonym(ip, ip_key) if ip is not None else None,
        },
        "decision": decision,
        "degraded": degraded,
        "instance": instance,
        "latency_ms": latency_ms,
        "method": method,
        "mode": mode,
        "path": path,
        "plan": plan,
        "policy_rev": policy_rev,
        "prev": None,
        "reason": reason,
        "request_id": request_id,
        "roles": roles,  # tuples: orjson writes them as arrays
        "route": route,
        "rule": rule,
        "seq": None,
        "session": session,
        "signals": signals,
        "status": status,
        "subject": subject,
        "tenant": tenant,
        "ts": _timestamp(ts),
        "upstream": upstream,
        "upstream_status": upstream_status,
    }


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
        """Queue the request's record: its facts now, the record itself built
        by the writer a batch at a time, off the request's path."""
        writer = self.writer
        if writer.state not in ("running", "closing"):
            # Only a request the trail refused (it never started, or had shut
            # down) gets here: say so rather than fail the request's cleanup.
            log.error(
                "request %s not recorded: the audit writer is %s", req.request_id, writer.state
            )
            return
        facts = snapshot(req, policy)
        if not writer.offer(facts, self._build, presorted=True):
            await writer.write_lazy(facts, self._build, presorted=True)

    def _build(self, facts: Snapshot) -> dict[str, Any]:
        return record_from(facts, instance=self.instance, ip_key=self.ip_key)
