"""The in-process usage state: buckets, quotas, in-flight counts, bytes.

Behind this one object, so the Redis state can replace it whole. Every
check of a request happens before anything is charged: a refused request
consumes nothing.
"""

from __future__ import annotations

import array
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.buckets import BucketTable
from gateway.usage.rules import BandwidthRule

# A counter's slot: [window index, previous window's amount, current amount,
# window]. An array of doubles, not a list: it holds no objects, so the garbage
# collector never tracks it, however many keys are counted (exact for amounts
# up to 2**53: 9 PB of bandwidth per window).
if TYPE_CHECKING:
    Slot = array.array[float]
else:
    Slot = array.array
MAX_COUNTERS = 250_000  # keys a SlidingCounter holds before it sweeps
# A streamed body is charged to the plan's bandwidth each time this many
# bytes have moved: a long download counts while it runs, a small exchange
# costs one charge.
CHARGE_EVERY = 64 * 1024


class SlidingCounter:
    """Amounts per key in a sliding window: two fixed windows, the previous
    one weighted by how much of it still overlaps. The algorithm of
    ``limits``' SlidingWindowCounter, kept in process because its memory
    storage starts a timer thread every 10 ms and walks every key each time.
    Used for quotas (requests per day) and bandwidth (bytes per hour, charged
    as they stream, even past the limit).

    ``slot`` hands out the key's mutable slot, rolled to ``now``: the fair-usage
    step reads it to test a limit and adds to it only once every limit of the
    request has passed, with one lookup per key and no objects per request.
    """

    def __init__(self, clock: Callable[[], float], max_keys: int = MAX_COUNTERS) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._sweep_at = max_keys  # the size at which the next sweep runs
        self._slots: dict[str, Slot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def slot(self, key: str, window: float, now: float) -> Slot:
        index = now // window
        slot = self._slots.get(key)
        if slot is None or slot[3] != window:
            # New, or counted over another window before (a reload changed the
            # rule, or the subject moved to another plan): start over.
            if slot is None and len(self._slots) >= self._sweep_at:
                self._sweep(now)
            slot = self._slots[key] = array.array("d", (index, 0.0, 0.0, window))
        elif slot[0] != index:
            # A new window: the current one becomes the previous, unless a whole
            # window passed with nothing counted.
            slot[1] = slot[2] if slot[0] == index - 1 else 0
            slot[2] = 0
            slot[0] = index
        return slot

    def used(self, key: str, window: float) -> float:
        now = self._clock()
        return weighted(self.slot(key, window, now), now)

    def add(self, key: str, window: float, amount: int) -> None:
        self.slot(key, window, self._clock())[2] += amount

    def retry_after(self, key: str, rule: BandwidthRule) -> float:
        """Seconds until the weighted count drops below the limit."""
        now = self._clock()
        index, previous, current, window = self.slot(key, rule.window, now)
        if current >= rule.limit or previous == 0:
            return (index + 1) * window - now
        # previous * (1 - t/w) + current < limit  =>  t > w * (1 - (limit - current) / previous)
        target = window * (1.0 - (rule.limit - current) / previous)
        return max(0.0, target - (now - index * window))

    def _sweep(self, now: float) -> None:
        """Forget keys whose windows have both passed. Live counts are never
        dropped (that would hand their quotas back); if most keys are live, the
        table grows, and the next sweep waits until it has grown by a quarter,
        so a flood of new keys costs one sweep per quarter, never one per request."""
        self._slots = {k: v for k, v in self._slots.items() if v[0] >= now // v[3] - 1}
        self._sweep_at = max(self._max_keys, len(self._slots) * 5 // 4)


def weighted(slot: Slot, now: float) -> float:
    """The amount counted in the window that ends ``now``."""
    index, previous, current, window = slot
    return previous * (1.0 - (now - index * window) / window) + current


def until_rollover(slot: Slot, now: float) -> float:
    """Seconds until the slot's current window ends."""
    return (slot[0] + 1) * slot[3] - now


class Meter:
    """The usage state. Its attributes are set here once and never replaced:
    the native step reads them once per Meter (ext/_usage_c.pyx)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.time, clock_ns: Callable[[], int] | None = None
    ) -> None:
        self.buckets = BucketTable(clock_ns) if clock_ns else BucketTable()
        # Shadow rules live apart: their refusals must not block real charges.
        self.shadow_buckets = BucketTable(clock_ns) if clock_ns else BucketTable()
        self.inflight: dict[str, int] = {}
        self.bandwidth = SlidingCounter(clock)
        self.quota_counts = SlidingCounter(clock)
        self.clock = clock

    def leave(self, keys: tuple[str, ...]) -> None:
        """Give back the in-flight slots the fair-usage step took."""
        inflight = self.inflight
        for key in keys:
            left = inflight.get(key, 1) - 1
            if left > 0:
                inflight[key] = left
            else:
                inflight.pop(key, None)


def ceil_seconds(value: float) -> int:
    if math.isinf(value):
        return 86400
    return max(1, math.ceil(value))
