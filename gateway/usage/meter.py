"""The in-process usage state: buckets, quotas, in-flight counts, bytes.

Behind this one object, so the Redis state can replace it whole. Every
check of a request happens before anything is charged: a refused request
consumes nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from gateway.buckets import BucketTable, Verdict
from gateway.usage.rules import BandwidthRule, BucketRule, QuotaRule


@dataclass(frozen=True, slots=True)
class QuotaState:
    allowed: bool
    remaining: int
    reset: float  # seconds


class Bandwidth:
    """Bytes per key in a sliding window (two fixed windows, weighted), the
    same approximation as ``limits``' sliding window counter, but counting
    every byte: a stream is charged as it flows, even past the limit."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._windows: dict[str, tuple[int, int, int]] = {}  # key -> (index, previous, current)

    def _roll(self, key: str, window: float, now: float) -> tuple[int, int, int]:
        index = int(now // window)
        found = self._windows.get(key)
        if found is None:
            return index, 0, 0
        old, _, current = found
        if old == index:
            return found
        if old == index - 1:
            return index, current, 0
        return index, 0, 0

    def used(self, key: str, window: float) -> float:
        now = self._clock()
        index, previous, current = self._roll(key, window, now)
        elapsed = (now - index * window) / window
        return previous * (1.0 - elapsed) + current

    def add(self, key: str, window: float, amount: int) -> None:
        index, previous, current = self._roll(key, window, self._clock())
        self._windows[key] = (index, previous, current + amount)
        if len(self._windows) > 100_000:
            self._forget(window)

    def retry_after(self, key: str, rule: BandwidthRule) -> float:
        """Seconds until the weighted count drops below the limit."""
        now = self._clock()
        index, previous, current = self._roll(key, rule.window, now)
        if current >= rule.limit or previous == 0:
            return (index + 1) * rule.window - now
        # previous * (1 - t/w) + current < limit  =>  t > w * (1 - (limit - current) / previous)
        target = rule.window * (1.0 - (rule.limit - current) / previous)
        return max(0.0, target - (now - index * rule.window))

    def _forget(self, window: float) -> None:
        index = int(self._clock() // window)
        self._windows = {k: v for k, v in self._windows.items() if v[0] >= index - 1}


class Meter:
    def __init__(
        self, *, clock: Callable[[], float] = time.time, clock_ns: Callable[[], int] | None = None
    ) -> None:
        self.buckets = BucketTable(clock_ns) if clock_ns else BucketTable()
        # Shadow rules live apart: their refusals must not block real charges.
        self.shadow_buckets = BucketTable(clock_ns) if clock_ns else BucketTable()
        self._quota_storage = MemoryStorage()
        self.quotas = SlidingWindowCounterRateLimiter(self._quota_storage)
        self.inflight: dict[str, int] = {}
        self.bandwidth = Bandwidth(clock)
        self._clock = clock

    # -- buckets -------------------------------------------------------------------------------

    def acquire(
        self, rules: list[BucketRule], keys: list[str], cost: int, shadow: bool = False
    ) -> Verdict:
        table = self.shadow_buckets if shadow else self.buckets
        return table.acquire(keys, [r.rate for r in rules], [r.burst for r in rules], cost)

    # -- quotas --------------------------------------------------------------------------------

    def quota_test(self, rule: QuotaRule, key: str, cost: int) -> QuotaState:
        stats = self.quotas.get_window_stats(rule.item, rule.name, key)
        reset = max(0.0, stats.reset_time - self._clock())
        allowed = self.quotas.test(rule.item, rule.name, key, cost=cost) if cost else True
        return QuotaState(allowed, stats.remaining, reset)

    def quota_hit(self, rule: QuotaRule, key: str, cost: int) -> None:
        if cost:
            self.quotas.hit(rule.item, rule.name, key, cost=cost)

    # -- concurrency ---------------------------------------------------------------------------

    def inflight_of(self, key: str) -> int:
        return self.inflight.get(key, 0)

    def enter(self, key: str) -> Callable[[], None]:
        """Take an in-flight slot; the returned callable gives it back, once."""
        self.inflight[key] = self.inflight.get(key, 0) + 1
        released = False

        def leave() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.inflight.get(key, 1) - 1
            if left > 0:
                self.inflight[key] = left
            else:
                self.inflight.pop(key, None)

        return leave


def ceil_seconds(value: float) -> int:
    if math.isinf(value):
        return 86400
    return max(1, math.ceil(value))
