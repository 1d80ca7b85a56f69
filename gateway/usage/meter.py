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

from gateway.buckets import BucketTable
from gateway.usage.rules import BandwidthRule, QuotaRule


@dataclass(frozen=True, slots=True)
class QuotaState:
    allowed: bool
    remaining: int
    reset: float  # seconds
    counter: str  # the key it is counted under, for the charge that follows


class SlidingCounter:
    """Amounts per key in a sliding window: two fixed windows, the previous
    one weighted by how much of it still overlaps. The algorithm of
    ``limits``' SlidingWindowCounter, kept in process because its memory
    storage starts a timer thread every 10 ms and walks every key each time.
    Used for quotas (requests per day) and bandwidth (bytes per hour, charged
    as they stream, even past the limit)."""

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
        return self.measure(key, window)[0]

    def measure(self, key: str, window: float) -> tuple[float, float]:
        """The weighted amount within the window, and seconds until it rolls."""
        now = self._clock()
        index, previous, current = self._roll(key, window, now)
        elapsed = now - index * window
        return previous * (1.0 - elapsed / window) + current, window - elapsed

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
        self.inflight: dict[str, int] = {}
        self.bandwidth = SlidingCounter(clock)
        self.quota_counts = SlidingCounter(clock)
        self._clock = clock

    # -- quotas --------------------------------------------------------------------------------

    def quota_test(self, rule: QuotaRule, key: str, cost: int) -> QuotaState:
        counter = f"{rule.name}\x1f{key}"
        used, reset = self.quota_counts.measure(counter, rule.window)
        remaining = max(0, int(rule.limit - used))
        return QuotaState(used + cost <= rule.limit, remaining, max(0.0, reset), counter)

    def quota_hit(self, rule: QuotaRule, state: QuotaState, cost: int) -> None:
        if cost:
            self.quota_counts.add(state.counter, rule.window, cost)

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
