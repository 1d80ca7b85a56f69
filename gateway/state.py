"""Identity state that must agree across replicas: revoked tokens, used
single-use tokens, and authentication-failure lockouts.

This is the in-process store (``state: memory://``). It sits behind the
small ``IdentityState`` interface so the Redis store can take its place
without the pipeline noticing. Every entry expires, so memory stays bounded
by the tokens' own lifetimes.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Protocol, TypeVar

from gateway.policy.model import Lockout


class IdentityState(Protocol):
    def is_revoked(self, jti: str, now: float) -> bool: ...
    def revoke(self, jti: str, until: float) -> None: ...
    def is_used(self, jti: str, now: float) -> bool: ...
    def mark_used(self, jti: str, until: float) -> None: ...
    def blocked_for(self, keys: tuple[str, ...], now: float) -> float: ...
    def record_failure(self, keys: tuple[str, ...], now: float) -> None: ...
    def configure(self, lockout: Lockout) -> None: ...


MAX_COUNTERS = 100_000
V = TypeVar("V")


def shrink(table: dict[str, V], alive: Callable[[V], bool]) -> dict[str, V]:
    """Bound a table under a flood of distinct keys: drop dead entries, and if
    that frees less than a quarter, the oldest half too. Each call then frees
    at least a quarter, so the cost of these rebuilds stays constant per key
    added, however hostile the keys."""
    kept = {k: v for k, v in table.items() if alive(v)}
    if len(kept) > len(table) * 3 // 4:
        kept = dict(list(kept.items())[len(kept) // 2 :])
    return kept


class _Expiring:
    """A set of keys, each with an expiry; expired keys are purged lazily."""

    def __init__(self) -> None:
        self.until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def add(self, key: str, until: float) -> None:
        self.until[key] = max(until, self.until.get(key, 0.0))
        heapq.heappush(self._heap, (until, key))

    def get(self, key: str, now: float) -> float | None:
        self.purge(now)
        until = self.until.get(key)
        return until if until is not None and until > now else None

    def purge(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            if self.until.get(key, 0.0) <= now:
                self.until.pop(key, None)


class MemoryIdentityState:
    def __init__(self, lockout: Lockout) -> None:
        self._revoked = _Expiring()
        self._used = _Expiring()
        self._blocked = _Expiring()
        self._failures: dict[str, list[float]] = {}
        self.configure(lockout)

    def configure(self, lockout: Lockout) -> None:
        self.max_failures = lockout.max_failures
        self.per = lockout.per
        self.block = lockout.block

    def is_revoked(self, jti: str, now: float) -> bool:
        # Hot path (every request): most gateways revoke nothing most of the time.
        return bool(self._revoked.until) and self._revoked.get(jti, now) is not None

    def revoke(self, jti: str, until: float) -> None:
        self._revoked.add(jti, until)

    def is_used(self, jti: str, now: float) -> bool:
        """Has a single-use ``jti`` already been spent?"""
        return self._used.get(jti, now) is not None

    def mark_used(self, jti: str, until: float) -> None:
        """Spend a single-use ``jti``; the mark lasts as long as the token can."""
        self._used.add(jti, until)

    def blocked_for(self, keys: tuple[str, ...], now: float) -> float:
        """Seconds left on the longest active block among ``keys`` (0: none)."""
        longest = 0.0
        for key in keys:
            until = self._blocked.get(key, now)
            if until is not None:
                longest = max(longest, until - now)
        return longest

    def record_failure(self, keys: tuple[str, ...], now: float) -> None:
        """Count a failed authentication; block a key once over the threshold."""
        horizon = now - self.per
        for key in keys:
            times = [t for t in self._failures.get(key, ()) if t > horizon]
            times.append(now)
            if len(times) >= self.max_failures:
                self._blocked.add(key, now + self.block)
                times = []
            if times:
                self._failures[key] = times
            else:
                self._failures.pop(key, None)
        if len(self._failures) > MAX_COUNTERS:
            self._failures = shrink(self._failures, lambda v: v[-1] > horizon)
