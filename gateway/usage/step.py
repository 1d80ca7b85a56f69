"""Step 8, fair usage: every limit of a request is checked together.

Order: quotas, bandwidth and concurrency are *tested*, then the buckets are
acquired all-or-nothing, and only then are quotas charged and in-flight
slots taken. So a refused request consumes nothing. Shadow-mode rules are
evaluated the same way on their own state, and only noted.

What a (route, plan) pair meters is worked out once and kept: the hot path
builds only the per-request keys.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from gateway.context import RequestContext
from gateway.decision import Decision, deny
from gateway.policy.model import Plan, Policy, Route
from gateway.usage.meter import Meter, Slot, ceil_seconds, until_rollover, weighted
from gateway.usage.rules import BandwidthRule, BucketRule, QuotaRule

Header = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Metering:
    """Everything a (route, plan) pair meters, resolved once."""

    route: Route  # held so the id() used as cache key stays this route's
    enforced: tuple[BucketRule, ...]
    enforced_rates: list[float]
    enforced_bursts: list[int]
    shadowed: tuple[BucketRule, ...]
    shadowed_rates: list[float]
    shadowed_bursts: list[int]
    quotas: tuple[QuotaRule, ...]
    bandwidth: BandwidthRule | None
    # (key, limit, mode): the key is "route:<id>", or "" for the subject's
    concurrency: tuple[tuple[str, int, str], ...]
    policy_header: Header | None

    @property
    def empty(self) -> bool:
        return not (
            self.enforced or self.shadowed or self.quotas or self.bandwidth or self.concurrency
        )


_meterings: dict[tuple[int, str | None], Metering] = {}


def metering(route: Route, plan: Plan | None) -> Metering:
    key = (id(route), plan.name if plan else None)
    found = _meterings.get(key)
    if found is not None and found.route is route:
        return found
    rules = plan.rules if plan else None
    buckets = list(route.limits)
    if rules and rules.bucket:
        buckets.append(rules.bucket)
    enforced = tuple(b for b in buckets if b.mode == "enforce")
    shadowed = tuple(b for b in buckets if b.mode == "shadow")
    quotas = rules.quotas if rules else ()
    concurrency: list[tuple[str, int, str]] = []
    if rules and rules.concurrent:
        concurrency.append(("", rules.concurrent, rules.mode))
    if route.concurrent:
        concurrency.append((f"route:{route.id}", route.concurrent, "enforce"))
    items = [q.policy for q in quotas] + [f'"{b.name}";q={b.burst};w={b.window}' for b in enforced]
    found = Metering(
        route,
        enforced,
        [b.rate for b in enforced],
        [b.burst for b in enforced],
        shadowed,
        [b.rate for b in shadowed],
        [b.burst for b in shadowed],
        quotas,
        rules.bandwidth if rules else None,
        tuple(concurrency),
        (b"ratelimit-policy", ", ".join(items).encode()) if items else None,
    )
    if len(_meterings) > 10_000:
        _meterings.clear()  # reloads leave old routes behind; start over
    _meterings[key] = found
    return found


def _key_value(req: RequestContext, key: str) -> str:
    identity, client = req.identity, req.client
    if key == "subject":
        # Anonymous traffic (public routes) is metered per client address.
        return identity.key if identity else f"ip:{client.ip if client else '?'}"
    if key == "tenant":
        return identity.tenant if identity else req.params.get("tenant", "")
    if key == "client":
        return client.ip if client else "?"
    if key == "client_network":
        return client.network if client else "?"
    if key == "route":
        return req.route.id if req.route else ""
    name = key[7:].lower().encode()  # header:NAME
    return next((v.decode("latin-1") for k, v in req.headers if k == name), "")


def _retry(seconds: float, jitter: float) -> int:
    if jitter and not math.isinf(seconds):
        # Spread refused clients out so they do not all return at once.
        seconds *= 1.0 + random.random() * jitter
    return ceil_seconds(seconds)


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
    subject = _key_value(req, "subject")
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
                return _refuse(
                    m,
                    "quota_exceeded",
                    f"The {quota.limit} per {int(quota.window)} s quota of your plan is used up.",
                    quota.name,
                    until_rollover(slot, now),
                    jitter,
                    (quota.name, 0, until_rollover(slot, now)),
                )
            else:
                req.shadow.append(f"quota_exceeded:{quota.name}")
    bw = m.bandwidth
    bw_key = bw.prefix + subject if bw is not None else ""
    if bw is not None and weighted(meter.bandwidth.slot(bw_key, bw.window, now), now) >= bw.limit:
        if bw.mode == "enforce":
            return _refuse(
                m,
                "bandwidth_exceeded",
                f"Your plan allows {bw.limit} bytes per {int(bw.window)} s.",
                bw.name,
                meter.bandwidth.retry_after(bw_key, bw),
                jitter,
                None,
            )
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
                    return _refuse(
                        m,
                        "concurrency_limited",
                        f"At most {limit} requests may be in flight at once.",
                        key,
                        1.0,
                        jitter,
                        None,
                    )
                req.shadow.append(f"concurrency_limited:{key}")

    # 2. Buckets, all or nothing.
    if m.enforced:
        enforced = m.enforced
        if len(enforced) == 1 and enforced[0].key == "subject":
            keys = [enforced[0].prefix + subject]  # the plan's bucket alone: the common case
        else:
            keys = [b.prefix + _key_value(req, b.key) for b in enforced]
        verdict = meter.buckets.acquire(keys, m.enforced_rates, m.enforced_bursts, cost)
        rule = m.enforced[verdict.tightest]
        if not verdict.allowed:
            return _refuse(
                m,
                "rate_limited",
                f"Slow down: {rule.name} allows {rule.burst} requests in a burst.",
                rule.name,
                verdict.retry_after,
                jitter,
                (rule.name, 0, verdict.reset),
            )
        if tightest is None or verdict.remaining <= tightest[0]:
            tightest = (verdict.remaining, rule.name, verdict.reset)
    if m.shadowed:
        keys = [b.prefix + _key_value(req, b.key) for b in m.shadowed]
        verdict = meter.shadow_buckets.acquire(keys, m.shadowed_rates, m.shadowed_bursts, cost)
        if not verdict.allowed:
            req.shadow.append(f"rate_limited:{m.shadowed[verdict.tightest].name}")

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
        req.response_headers.append(
            (b"ratelimit", f'"{name}";r={remaining};t={math.ceil(reset)}'.encode())
        )
    return None


def _refuse(
    m: Metering,
    reason: str,
    detail: str,
    rule: str,
    wait: float,
    jitter: float,
    current: tuple[str, int, float] | None,
) -> Decision:
    headers = [m.policy_header] if m.policy_header is not None else []
    if current is not None:
        name, remaining, reset = current
        headers.append((b"ratelimit", f'"{name}";r={remaining};t={math.ceil(reset)}'.encode()))
    return deny(reason, detail, retry_after=_retry(wait, jitter), headers=tuple(headers), rule=rule)
