"""Small sliding-window sketches for the detectors, bounded in memory.

``Distinct`` counts distinct values per key over a window (objects fetched,
networks seen, SMS recipients); ``Events`` counts events per key over a
window (refusals, offenses, repeated bodies). Each key keeps at most a
bounded number of entries, and keys whose entries all expired are dropped
when the table grows, so a flood of keys cannot exhaust memory.
"""

from __future__ import annotations

from gateway.state import shrink

MAX_KEYS = 200_000


class Distinct:
    def __init__(self) -> None:
        self._seen: dict[str, dict[str, float]] = {}

    def add(self, key: str, value: str, now: float, per: float, cap: int) -> int:
        """Note ``value`` for ``key``; the number of distinct values within ``per``."""
        seen = self._seen.get(key)
        if seen is None:
            if len(self._seen) >= MAX_KEYS:
                self._purge(now, per)
            seen = self._seen[key] = {}
        seen.pop(value, None)  # re-insert: the dict stays ordered oldest first
        seen[value] = now
        horizon = now - per
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] > horizon and len(seen) <= cap:
                break
            del seen[oldest]
        return len(seen)

    def _purge(self, now: float, per: float) -> None:
        horizon = now - per
        self._seen = shrink(self._seen, lambda v: bool(v) and max(v.values()) > horizon)


class Events:
    def __init__(self) -> None:
        self._times: dict[str, list[float]] = {}

    def add(self, key: str, now: float, per: float, cap: int = 10_000) -> int:
        """Count one event for ``key``; the number of events within ``per``."""
        times = self._times.get(key)
        if times is None:
            if len(self._times) >= MAX_KEYS:
                self._purge(now, per)
            times = self._times[key] = []
        times.append(now)
        horizon = now - per
        drop = 0
        while drop < len(times) and times[drop] <= horizon:
            drop += 1
        if drop or len(times) > cap:
            del times[: max(drop, len(times) - cap)]
        return len(times)

    def _purge(self, now: float, per: float) -> None:
        horizon = now - per
        self._times = shrink(self._times, lambda v: bool(v) and v[-1] > horizon)
