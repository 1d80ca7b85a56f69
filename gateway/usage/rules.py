"""Fair-usage rules, compiled from plans and route limits at policy load.

A rate string (``5/second``, ``2000/day``) is parsed once with
``limits.parse``, the same syntax everywhere. Buckets are GCRA token buckets
(rate + burst); quotas are ``limits`` items counted with a sliding window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from limits import RateLimitItem, parse

from gateway.units import parse_size


@dataclass(frozen=True, slots=True)
class BucketRule:
    name: str  # the name clients see in RateLimit-Policy
    key: str  # subject, tenant, client, client_network, route or header:NAME
    rate: float  # tokens per second
    burst: int
    window: int  # seconds for an empty bucket to refill: the policy's w
    mode: str
    prefix: str  # its keys are prefix + the key value (subject, tenant, ...)


@dataclass(frozen=True, slots=True)
class QuotaRule:
    name: str
    key: str
    limit: int
    window: float  # seconds
    mode: str
    policy: str  # its RateLimit-Policy item, formatted once
    prefix: str  # its counters' keys are prefix + subject


@dataclass(frozen=True, slots=True)
class BandwidthRule:
    name: str
    limit: int  # bytes per window
    window: float  # seconds
    mode: str
    prefix: str  # its counters' keys are prefix + subject (one counter per rule)


@dataclass(frozen=True, slots=True)
class PlanRules:
    bucket: BucketRule | None
    quotas: tuple[QuotaRule, ...]
    bandwidth: BandwidthRule | None
    concurrent: int | None
    mode: str


def bucket_rule(name: str, rate: str, burst: int | None, key: str, mode: str) -> BucketRule:
    """``rate`` like ``5/second``; raises ``ValueError`` with the expected form."""
    item = _parse(rate)
    per_second = item.amount / item.get_expiry()
    capacity = burst if burst is not None else item.amount
    return BucketRule(
        name,
        key,
        per_second,
        capacity,
        max(1, math.ceil(capacity / per_second)),
        mode,
        f"{name}\x1f",
    )


def quota_rule(name: str, quota: str, key: str, mode: str) -> QuotaRule:
    item = _parse(quota)
    window = item.get_expiry()
    return QuotaRule(
        name,
        key,
        item.amount,
        float(window),
        mode,
        f'"{name}";q={item.amount};w={window}',
        f"{name}\x1f",
    )


def bandwidth_rule(name: str, value: str, mode: str) -> BandwidthRule:
    """``50MB/hour``: a size per window."""
    amount, sep, window = value.partition("/")
    if not sep:
        raise ValueError("a bandwidth such as 50MB/hour")
    try:
        size = parse_size(amount.strip())
        expiry = _parse("1/" + window.strip()).get_expiry()
    except ValueError:
        raise ValueError("a bandwidth such as 50MB/hour") from None
    return BandwidthRule(name, size, float(expiry), mode, f"{name}\x1f")


def _parse(rate: str) -> RateLimitItem:
    try:
        item = parse(rate)
    except ValueError:
        raise ValueError("a rate such as 100/minute, 5/second or 2000/day") from None
    if item.amount <= 0:
        raise ValueError("a rate with a positive amount")
    return item
