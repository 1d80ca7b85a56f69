"""Step 8, fair usage: every limit of a request is checked together.

Order: quotas, bandwidth and concurrency are *tested*, then the buckets are
acquired all-or-nothing, and only then are quotas charged and in-flight
slots taken. So a refused request consumes nothing. Shadow-mode rules are
evaluated the same way on their own state, and only noted.
"""

from __future__ import annotations

import math
import random

from gateway.context import RequestContext
from gateway.decision import Decision, deny
from gateway.policy.model import Policy
from gateway.usage.meter import Meter, ceil_seconds
from gateway.usage.rules import BucketRule, QuotaRule

Header = tuple[bytes, bytes]


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
    route, identity = req.route, req.identity
    assert route is not None
    plan = policy.plans.get(identity.plan) if identity and identity.plan else None
    rules = plan.rules if plan else None
    cost = route.cost
    subject = _key_value(req, "subject")

    buckets: list[BucketRule] = list(route.limits)
    if rules and rules.bucket:
        buckets.append(rules.bucket)
    quotas: tuple[QuotaRule, ...] = rules.quotas if rules else ()
    if (
        not buckets
        and not quotas
        and not (rules and (rules.concurrent or rules.bandwidth))
        and not route.concurrent
    ):
        return None

    jitter = policy.retry_jitter
    policy_header: list[str] = []
    tightest: tuple[int, str, int, int] | None = None  # (remaining, name, r, t)

    def note(name: str, remaining: int, reset: float) -> None:
        nonlocal tightest
        if tightest is None or remaining < tightest[0]:
            tightest = (remaining, name, remaining, math.ceil(reset))

    # 1. Test quotas, bandwidth and concurrency: nothing is charged yet.
    quota_states = []
    for quota in quotas:
        state = meter.quota_test(quota, subject, cost)
        quota_states.append((quota, state))
        policy_header.append(f'"{quota.name}";q={quota.item.amount};w={quota.item.get_expiry()}')
        if not state.allowed:
            if quota.mode == "enforce":
                return _refuse(
                    req,
                    "quota_exceeded",
                    f"The {quota.item} quota of your plan is used up.",
                    quota.name,
                    state.reset,
                    jitter,
                    policy_header,
                    (quota.name, 0, state.reset),
                )
            req.shadow.append(f"quota_exceeded:{quota.name}")
    if rules and rules.bandwidth:
        bw = rules.bandwidth
        if meter.bandwidth.used(subject, bw.window) >= bw.limit:
            wait = meter.bandwidth.retry_after(subject, bw)
            if bw.mode == "enforce":
                return _refuse(
                    req,
                    "bandwidth_exceeded",
                    f"Your plan allows {bw.limit} bytes per {int(bw.window)} s.",
                    bw.name,
                    wait,
                    jitter,
                    policy_header,
                    None,
                )
            req.shadow.append(f"bandwidth_exceeded:{bw.name}")
    concurrency = []
    if rules and rules.concurrent:
        concurrency.append((f"subject:{subject}", rules.concurrent, rules.mode))
    if route.concurrent:
        concurrency.append((f"route:{route.id}", route.concurrent, "enforce"))
    for key, limit, mode in concurrency:
        if meter.inflight_of(key) >= limit:
            if mode == "enforce":
                return _refuse(
                    req,
                    "concurrency_limited",
                    f"At most {limit} requests may be in flight at once.",
                    key,
                    1.0,
                    jitter,
                    policy_header,
                    None,
                )
            req.shadow.append(f"concurrency_limited:{key}")

    # 2. Buckets, all or nothing.
    enforced = [b for b in buckets if b.mode == "enforce"]
    shadowed = [b for b in buckets if b.mode == "shadow"]
    for bucket in enforced:
        policy_header.append(f'"{bucket.name}";q={bucket.burst};w={bucket.window}')
    if enforced:
        keys = [f"{b.name}\x1f{_key_value(req, b.key)}" for b in enforced]
        verdict = meter.acquire(enforced, keys, cost)
        name = enforced[verdict.tightest].name
        if not verdict.allowed:
            return _refuse(
                req,
                "rate_limited",
                f"Slow down: {name} allows {enforced[verdict.tightest].burst} requests in a burst.",
                name,
                verdict.retry_after,
                jitter,
                policy_header,
                (name, 0, verdict.reset),
            )
        note(name, verdict.remaining, verdict.reset)
    if shadowed:
        keys = [f"{b.name}\x1f{_key_value(req, b.key)}" for b in shadowed]
        verdict = meter.acquire(shadowed, keys, cost, shadow=True)
        if not verdict.allowed:
            req.shadow.append(f"rate_limited:{shadowed[verdict.tightest].name}")

    # 3. Charge quotas, take in-flight slots.
    for quota, state in quota_states:
        # Shadow quotas count too, or they could never report an overrun.
        meter.quota_hit(quota, subject, cost)
        if quota.mode == "enforce":
            note(quota.name, max(0, state.remaining - cost), state.reset)
    for key, _, _ in concurrency:
        req.cleanups.append(meter.enter(key))
    if rules and rules.bandwidth:
        req.bandwidth = (subject, rules.bandwidth.window)
    req.response_headers.extend(_headers(policy_header, tightest))
    return None


def _headers(policy: list[str], tightest: tuple[int, str, int, int] | None) -> list[Header]:
    out: list[Header] = []
    if policy:
        out.append((b"ratelimit-policy", ", ".join(policy).encode()))
    if tightest is not None:
        _, name, remaining, reset = tightest
        out.append((b"ratelimit", f'"{name}";r={remaining};t={reset}'.encode()))
    return out


def _refuse(
    req: RequestContext,
    reason: str,
    detail: str,
    rule: str,
    wait: float,
    jitter: float,
    policy: list[str],
    current: tuple[str, int, float] | None,
) -> Decision:
    headers = _headers(policy, None)
    if current is not None:
        name, remaining, reset = current
        headers.append((b"ratelimit", f'"{name}";r={remaining};t={math.ceil(reset)}'.encode()))
    return deny(reason, detail, retry_after=_retry(wait, jitter), headers=tuple(headers), rule=rule)
