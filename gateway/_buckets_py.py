"""Token buckets for fair-usage limits, pure-Python implementation.

The native twin ``gateway._buckets_c`` (ext/_buckets_c.pyx) behaves
identically: same verdicts, same ``len()`` and ``capacity`` after every call,
same exceptions with the same messages.  ``gateway.buckets`` picks one.

Algorithm: GCRA
---------------
The generic cell rate algorithm is a token bucket with continuous refill that
keeps ONE number per key: the theoretical arrival time ``tat`` (int64
nanoseconds).  For ``rate`` tokens per second and a capacity of ``burst``:

* ``interval = round(1e9 / rate)`` ns per token (``round`` is Python's:
  half to even) and ``tolerance = burst * interval``;
* a request of ``cost`` tokens at ``now``: ``base = max(tat, now)``,
  ``new_tat = base + cost * interval``; the bucket allows it iff
  ``new_tat - now <= tolerance``;
* tokens left: ``floor((tolerance - (tat - now)) / interval)``, at least 0;
  the bucket is full again ``max(0, tat - now)`` ns from now;
* a key whose ``tat <= now`` is a full bucket: exactly like an absent key.

All arithmetic is on integers, so both implementations agree bit for bit.
Bounds keep the native int64 arithmetic exact: ``rate <= 1e9`` (so
``interval >= 1``), ``burst * interval <= 2**61``, ``0 <= cost <= 2**61`` and
the clock in ``[0, 2**61)``.

``acquire`` is all-or-nothing over up to 16 buckets: every bucket is judged
against the state before the call; if one refuses, none is charged.  A cost
of 0 charges nothing (a peek over several buckets).  Two keys of one acquire
with the same ``hash()`` are refused (``ValueError``); across calls, two keys
with the same 64-bit ``hash()`` share one bucket (negligible for ``str`` keys).

State and eviction (deterministic, so ``len()`` is identical in both)
---------------------------------------------------------------------
A key holds state (counts in ``len()``) from the first time it is charged
until it is evicted; a full bucket may linger until then, harmlessly.  The
table emulates the native open-addressing table's ``capacity`` (a power of two
of slots, at least ``initial_capacity(capacity_hint)``):

* inserting a new key when ``len + 1 > capacity // 2`` first evicts every
  full bucket (``tat <= now``); if still ``len + 1 > capacity * 3 // 8`` the
  capacity doubles (so an eviction always frees at least 1/8 of the slots,
  and eviction scans cost O(1) amortized per insert);
* ``evict()`` drops every full bucket, then shrinks the capacity to
  ``shrunk_capacity(len, minimum)`` if that is smaller (load <= 1/4);
* ``clear()`` drops everything and restores the initial capacity;
* nothing else (``peek``, refusals, cost 0) changes the state.

Hence the keys holding state are those charged since the last eviction that
covered them, never more than ``capacity // 2``; and the capacity only
doubles when more than 3/8 of it holds buckets that are not full, so under
key churn it stays below about 16/3 times the peak number of buckets that are
not full at once (or the initial capacity).  Call ``evict()`` now and then to
give memory back after a burst of keys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Final, SupportsFloat, SupportsIndex

from gateway._buckets_verdict import (
    E_BURST,
    E_CAPACITY,
    E_CLOCK,
    E_CLOCK_TYPE,
    E_COST,
    E_DUPLICATE,
    E_KEY,
    E_LENGTHS,
    E_NKEYS,
    E_RATE,
    E_SPAN,
    MAX_CAPACITY_HINT,
    MAX_KEYS,
    MAX_NOW_NS,
    MAX_RATE,
    MAX_SPAN_NS,
    SLOT_BYTES,
    Verdict,
    as_int,
    as_rate,
    initial_capacity,
    shrunk_capacity,
)

__all__ = ["SLOT_BYTES", "BucketTable", "Verdict"]

_NEVER: Final = -1  # retry sentinel: the cost exceeds the burst
_tuple_new = tuple.__new__


def _bucket(rate: SupportsFloat | SupportsIndex, burst: SupportsIndex) -> tuple[int, int, int]:
    """Validated ``(interval_ns, tolerance_ns, burst)``."""
    r = rate if type(rate) is float else as_rate(rate)
    if not 0.0 < r <= MAX_RATE:
        raise ValueError(E_RATE)
    b = as_int(burst)
    if b < 1:
        raise ValueError(E_BURST)
    interval_f = 1e9 / r
    if interval_f > MAX_SPAN_NS:
        raise ValueError(E_SPAN)
    interval = round(interval_f)
    if b > MAX_SPAN_NS // interval:
        raise ValueError(E_SPAN)
    return interval, b * interval, b


def _remaining(tolerance: int, interval: int, ahead: int) -> int:
    """Whole tokens left when the bucket's tat is ``ahead`` ns past now."""
    left = tolerance - ahead
    return left // interval if left > 0 else 0


class BucketTable:
    """GCRA token buckets keyed by ``hash(key)``; see the module docstring."""

    __slots__ = ("_cap", "_clock", "_min_cap", "_tat")

    def __init__(self, clock: Callable[[], int] | None = None, capacity_hint: int = 1024) -> None:
        if clock is not None and not callable(clock):
            raise TypeError(E_CLOCK_TYPE)
        hint = as_int(capacity_hint)
        if not 0 <= hint <= MAX_CAPACITY_HINT:
            raise ValueError(E_CAPACITY)
        self._clock: Callable[[], int] = time.monotonic_ns if clock is None else clock
        self._min_cap = initial_capacity(hint)
        self._cap = self._min_cap
        self._tat: dict[int, int] = {}

    @property
    def capacity(self) -> int:
        """Slots of the (emulated) native table: a power of two, load <= 1/2."""
        return self._cap

    def _now(self) -> int:
        now = as_int(self._clock())
        if not 0 <= now < MAX_NOW_NS:
            raise ValueError(E_CLOCK)
        return now

    def _evict_full(self, now: int) -> int:
        before = len(self._tat)
        self._tat = {h: t for h, t in self._tat.items() if t > now}
        return before - len(self._tat)

    def _insert(self, h: int, tat: int, now: int) -> None:
        table = self._tat
        if len(table) + 1 > self._cap // 2:
            self._evict_full(now)
            table = self._tat
            if len(table) + 1 > self._cap * 3 // 8:
                self._cap *= 2
        table[h] = tat

    def acquire(
        self,
        keys: Sequence[str],
        rates: Sequence[float],
        bursts: Sequence[int],
        cost: int = 1,
    ) -> Verdict:
        """Charge ``cost`` tokens to every bucket, or to none; see the module docstring."""
        n = len(keys)
        if not 1 <= n <= MAX_KEYS:
            raise ValueError(E_NKEYS)
        if len(rates) != n or len(bursts) != n:
            raise ValueError(E_LENGTHS)
        c = as_int(cost)
        if not 0 <= c <= MAX_SPAN_NS:
            raise ValueError(E_COST)
        hashes: list[int] = []
        params: list[tuple[int, int, int]] = []
        for i in range(n):
            key = keys[i]
            if not isinstance(key, str):
                raise TypeError(E_KEY)
            h = hash(key)
            params.append(_bucket(rates[i], bursts[i]))
            if h in hashes:
                raise ValueError(E_DUPLICATE)
            hashes.append(h)
        now = self._now()

        table = self._tat
        allowed = True
        worst = 0  # the largest retry (ns) so far, or _NEVER
        worst_i = -1
        new_tats: list[int] = []
        for i in range(n):
            interval, tolerance, burst = params[i]
            tat = table.get(hashes[i], 0)
            base = tat if tat > now else now
            if c > burst:
                retry = _NEVER
                new_tats.append(base)
            else:
                new_tat = base + c * interval
                new_tats.append(new_tat)
                if new_tat - now <= tolerance:
                    continue
                retry = new_tat - now - tolerance
            allowed = False
            if worst != _NEVER and (retry == _NEVER or retry > worst):
                worst = retry
                worst_i = i

        if allowed:
            tightest = 0
            least = -1
            for i in range(n):
                interval, tolerance, _ = params[i]
                left = _remaining(tolerance, interval, new_tats[i] - now)
                if least < 0 or left < least:
                    least = left
                    tightest = i
            if c > 0:
                for i in range(n):
                    h = hashes[i]
                    if h in table:
                        table[h] = new_tats[i]
                    else:
                        self._insert(h, new_tats[i], now)
                        table = self._tat
            ahead = new_tats[tightest] - now
            return _tuple_new(Verdict, (True, least, ahead / 1e9, 0.0, tightest))

        interval, tolerance, _ = params[worst_i]
        tat = table.get(hashes[worst_i], 0)
        ahead = tat - now if tat > now else 0
        retry_after = math.inf if worst == _NEVER else worst / 1e9
        return _tuple_new(
            Verdict,
            (False, _remaining(tolerance, interval, ahead), ahead / 1e9, retry_after, worst_i),
        )

    def peek(self, key: str, rate: float, burst: int) -> tuple[int, float]:
        """``(remaining, reset)`` of one bucket, without charging it."""
        if not isinstance(key, str):
            raise TypeError(E_KEY)
        h = hash(key)
        interval, tolerance, _ = _bucket(rate, burst)
        now = self._now()
        tat = self._tat.get(h, 0)
        ahead = tat - now if tat > now else 0
        return _remaining(tolerance, interval, ahead), ahead / 1e9

    def __len__(self) -> int:
        return len(self._tat)

    def evict(self) -> int:
        """Drop every full bucket; returns how many.  May shrink the capacity."""
        now = self._now()
        removed = self._evict_full(now)
        cap = shrunk_capacity(len(self._tat), self._min_cap)
        if cap < self._cap:
            self._cap = cap
        return removed

    def clear(self) -> None:
        """Drop every bucket and restore the initial capacity."""
        self._tat = {}
        self._cap = self._min_cap
