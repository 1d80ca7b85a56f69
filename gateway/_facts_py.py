"""A finished request's audit facts, pure-Python implementation.

``snapshot(req, policy)`` gathers what the request's audit record holds, as
the tuple ``gateway.audit.records.record_from`` and the sealers take. Its
native twin ``gateway._facts_c`` (ext/_facts_c.pyx) returns the very same
tuple; ``gateway.recording`` picks one. It runs on every request's path, so
it only gathers: the record's latency is rounded, its address pseudonymised
and its JSON written by the sealer, in the audit writer process.
"""

from __future__ import annotations

import time

from gateway.audit.records import Snapshot
from gateway.context import RequestContext
from gateway.policy.model import Policy

_perf_counter = time.perf_counter
_wall_clock = time.time


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
    identity, route, refusal, client, shadow = (
        req.identity,
        req.route,
        req.refusal,
        req.client,
        req.shadow,
    )
    rule: str | None = None
    if refusal is not None:
        decision, reason, rule, mode = "deny", refusal.reason, refusal.rule, "enforce"
    elif shadow:
        # The request passed; the record says what enforcement would have done.
        first_reason, _, rule = shadow[0].partition(":")
        decision, reason, mode = "shadow_deny", first_reason, "shadow"
    else:
        decision, reason, mode = "allow", None, "enforce"
    signals = (*req.signals, *shadow)
    if req.aborted:
        signals += (req.aborted,)
    latency = (_perf_counter() if finished is None else finished) - req.started
    # The canonical path when there is one; a refused target is kept as sent
    # (escaped, bounded) so probing shows up in the trail.
    path = req.path or req.raw_path[:512].decode("latin-1").encode("unicode_escape").decode()
    ts = _wall_clock() if now is None else now
    if identity is None:
        plan = session = subject = tenant = None
        roles: tuple[str, ...] = ()
    else:
        plan, roles, session = identity.plan, identity.roles, identity.session
        subject, tenant = identity.subject, identity.tenant
    network = ip = route_id = upstream = None
    if client is not None:
        network, ip = client.network, client.ip
    if route is not None:
        route_id, upstream = route.id, route.upstream
    return (
        req.bytes_in,
        req.bytes_out,
        network,
        ip,
        decision,
        degraded,
        latency,
        req.method,
        mode,
        path,
        plan,
        policy.revision,
        reason,
        req.request_id,
        roles,
        route_id,
        rule,
        session,
        signals,
        req.status,
        subject,
        tenant,
        ts,
        upstream,
        req.upstream_status,
    )
