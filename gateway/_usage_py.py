"""Step 8, fair usage, pure-Python implementation: every limit of a request is
checked together.

Order: quotas, bandwidth and concurrency are *tested*, then the buckets are
acquired all-or-nothing, and only then are quotas charged and in-flight
slots taken. So a refused request consumes nothing. Shadow-mode rules are
evaluated the same way on their own state, and only noted.

The native twin ``gateway._usage_c`` (ext/_usage_c.pyx) behaves identically
on the same state (``gateway.usage.meter.Meter``): same decisions, same
headers, same counts; ``gateway.usage.step`` picks one. What a (route, plan)
pair meters is worked out once (``gateway.usage.metering``): the hot path
builds only the per-request keys.
"""

from __future__ import annotations

from gateway.context import RequestContext
from gateway.decision import Decision
from gateway.policy.model import Policy
from gateway.usage.meter import CHARGE_EVERY, Meter, Slot, until_rollover, weighted
from gateway.usage.metering import (
    bucket_keys,
    metering,
    ratelimit_header,
    refuse_bandwidth,
    refuse_concurrency,
    refuse_quota,
    refuse_rate,
    shadow_buckets,
    subject_of,
)


def fair_usage(req: RequestContext, policy: Policy, meter: Meter) -> Decision | None:
    # The hot path of every metered request: plain loops over rules resolved
    # at load, one clock read, one lookup per counter, no objects per rule.
    route, identity = req.route, req.identity
    assert route is not None
    plan = policy.plans.get(identity.plan) if identity and identity.plan else None
    m = metering(route, plan)
    if m.empty:
        return None
    cost = route.cost
    subject = subject_of(req)
    jitter = policy.retry_jitter
    now = meter.clock()
    tightest: tuple[int, str, float] | None = None  # (remaining, name, reset)

    # 1. Test quotas, bandwidth and concurrency: nothing is charged yet.
    quota_slots: list[Slot] = []
    if m.quotas:
        counts = meter.quota_counts
        for quota in m.quotas:
            slot = counts.slot(quota.prefix + subject, quota.window, now)
            quota_slots.append(slot)
            used = weighted(slot, now)
            if used + cost <= quota.limit:
                if quota.mode == "enforce":
                    left = max(0, int(quota.limit - used) - cost)
                    if tightest is None or left < tightest[0]:
                        tightest = (left, quota.name, until_rollover(slot, now))
            elif quota.mode == "enforce":
                return refuse_quota(m, quota, slot, now, jitter)
            else:
                req.shadow.append(f"quota_exceeded:{quota.name}")
    bw = m.bandwidth
    bw_key = ""
    if bw is not None:
        bw_key = bw.prefix + subject
        if weighted(meter.bandwidth.slot(bw_key, bw.window, now), now) >= bw.limit:
            if bw.mode == "enforce":
                return refuse_bandwidth(m, meter, bw_key, jitter)
            req.shadow.append(f"bandwidth_exceeded:{bw.name}")
    slots: tuple[str, ...] = ()
    if m.concurrency:
        inflight = meter.inflight
        for key, limit, mode in m.concurrency:
            if not key:
                key = "subject:" + subject
            slots += (key,)
            if inflight.get(key, 0) >= limit:
                if mode == "enforce":
                    return refuse_concurrency(m, key, limit, jitter)
                req.shadow.append(f"concurrency_limited:{key}")

    # 2. Buckets, all or nothing.
    if m.enforced:
        enforced = m.enforced
        keys = [enforced[0].prefix + subject] if m.subject_bucket else bucket_keys(req, enforced)
        verdict = meter.buckets.acquire(keys, m.enforced_rates, m.enforced_bursts, cost)
        rule = enforced[verdict.tightest]
        if not verdict.allowed:
            return refuse_rate(m, rule, verdict.retry_after, verdict.reset, jitter)
        if tightest is None or verdict.remaining <= tightest[0]:
            tightest = (verdict.remaining, rule.name, verdict.reset)
    if m.shadowed:
        shadow_buckets(req, m, meter, cost)

    # 3. Everything passed: charge quotas (shadow ones too, or they could
    # never report an overrun), take in-flight slots.
    if cost:
        for slot in quota_slots:
            slot[2] += cost
    if slots:
        inflight = meter.inflight
        for key in slots:
            inflight[key] = inflight.get(key, 0) + 1
        req.inflight = slots
    if bw is not None:
        req.bandwidth = (bw_key, bw.window)
    if m.policy_header is not None:
        req.response_headers.append(m.policy_header)
    if tightest is not None:
        remaining, name, reset = tightest
        req.response_headers.append(ratelimit_header(name, remaining, reset))
    return None


def charge(meter: Meter, req: RequestContext) -> None:
    """Charge the bytes the request moved since its last charge, both ways,
    to its bandwidth counter (``req.bandwidth``, set by ``fair_usage``)."""
    assert req.bandwidth is not None
    moved = req.bytes_in + req.bytes_out
    key, window = req.bandwidth
    meter.bandwidth.add(key, window, moved - req.charged)
    req.charged = moved
    req.charge_at = moved + CHARGE_EVERY


def leave(meter: Meter, keys: tuple[str, ...]) -> None:
    """Give back the in-flight slots ``fair_usage`` took (``req.inflight``)."""
    meter.leave(keys)
