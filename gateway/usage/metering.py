"""What a (route, plan) pair meters, resolved once, and what both fair-usage
steps share: key values, refusals and the rare paths.

The per-request step has two implementations with identical behaviour, the
pure ``gateway/_usage_py.py`` and the native ``gateway._usage_c``
(ext/_usage_c.pyx); ``gateway.usage.step`` picks one. Everything here runs
once per (route, plan), on a refusal, or for rules beyond the common case
(shadow buckets, buckets keyed by more than the subject), so both call the
same code for it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from gateway.context import RequestContext
from gateway.decision import Decision, deny
from gateway.policy.model import Plan, Route
from gateway.usage.meter import Meter, Slot, ceil_seconds, until_rollover
from gateway.usage.rules import BandwidthRule, BucketRule, QuotaRule

Header = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Metering:
    """Everything a (route, plan) pair meters, resolved once."""

    route: Route  # held so the id() used as cache key stays this route's
    enforced: tuple[BucketRule, ...]
    enforced_rates: list[float]
    enforced_bursts: list[int]
    # The common case: the plan's bucket alone, keyed by subject.
    subject_bucket: bool
    shadowed: tuple[BucketRule, ...]
    shadowed_rates: list[float]
    shadowed_bursts: list[int]
    quotas: tuple[QuotaRule, ...]
    bandwidth: BandwidthRule | None
    # (key, limit, mode): the key is "route:<id>", or "" for the subject's
    concurrency: tuple[tuple[str, int, str], ...]
    policy_header: Header | None
    empty: bool


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
    bandwidth = rules.bandwidth if rules else None
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
        len(enforced) == 1 and enforced[0].key == "subject",
        shadowed,
        [b.rate for b in shadowed],
        [b.burst for b in shadowed],
        quotas,
        bandwidth,
        tuple(concurrency),
        (b"ratelimit-policy", ", ".join(items).encode()) if items else None,
        not (enforced or shadowed or quotas or bandwidth or concurrency),
    )
    if len(_meterings) > 10_000:
        _meterings.clear()  # reloads leave old routes behind; start over
    _meterings[key] = found
    return found


def subject_of(req: RequestContext) -> str:
    # Anonymous traffic (public routes) is metered per client address.
    identity, client = req.identity, req.client
    return identity.key if identity else f"ip:{client.ip if client else '?'}"


def key_value(req: RequestContext, key: str) -> str:
    identity, client = req.identity, req.client
    if key == "subject":
        return subject_of(req)
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


def bucket_keys(req: RequestContext, rules: tuple[BucketRule, ...]) -> list[str]:
    return [b.prefix + key_value(req, b.key) for b in rules]


def shadow_buckets(req: RequestContext, m: Metering, meter: Meter, cost: int) -> None:
    """Shadow-mode buckets: charged on their own table, a refusal only noted."""
    keys = bucket_keys(req, m.shadowed)
    verdict = meter.shadow_buckets.acquire(keys, m.shadowed_rates, m.shadowed_bursts, cost)
    if not verdict.allowed:
        req.shadow.append(f"rate_limited:{m.shadowed[verdict.tightest].name}")


def ratelimit_header(name: str, remaining: int, reset: float) -> Header:
    """The draft's ``RateLimit`` field for the tightest limit."""
    return (b"ratelimit", f'"{name}";r={remaining};t={math.ceil(reset)}'.encode())


# -- refusals (each the 429 of one limit kind) ---------------------------------------------------


def refuse_quota(m: Metering, quota: QuotaRule, slot: Slot, now: float, jitter: float) -> Decision:
    reset = until_rollover(slot, now)
    return _refuse(
        m,
        "quota_exceeded",
        f"The {quota.limit} per {int(quota.window)} s quota of your plan is used up.",
        quota.name,
        reset,
        jitter,
        (quota.name, 0, reset),
    )


def refuse_bandwidth(m: Metering, meter: Meter, key: str, jitter: float) -> Decision:
    bw = m.bandwidth
    assert bw is not None
    return _refuse(
        m,
        "bandwidth_exceeded",
        f"Your plan allows {bw.limit} bytes per {int(bw.window)} s.",
        bw.name,
        meter.bandwidth.retry_after(key, bw),
        jitter,
        None,
    )


def refuse_concurrency(m: Metering, key: str, limit: int, jitter: float) -> Decision:
    return _refuse(
        m,
        "concurrency_limited",
        f"At most {limit} requests may be in flight at once.",
        key,
        1.0,
        jitter,
        None,
    )


def refuse_rate(
    m: Metering, rule: BucketRule, retry_after: float, reset: float, jitter: float
) -> Decision:
    return _refuse(
        m,
        "rate_limited",
        f"Slow down: {rule.name} allows {rule.burst} requests in a burst.",
        rule.name,
        retry_after,
        jitter,
        (rule.name, 0, reset),
    )


def _retry(seconds: float, jitter: float) -> int:
    if jitter and not math.isinf(seconds):
        # Spread refused clients out so they do not all return at once.
        seconds *= 1.0 + random.random() * jitter
    return ceil_seconds(seconds)


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
        headers.append(ratelimit_header(*current))
    return deny(reason, detail, retry_after=_retry(wait, jitter), headers=tuple(headers), rule=rule)
