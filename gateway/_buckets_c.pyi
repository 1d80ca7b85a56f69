"""Stub for the native ``gateway._buckets_c`` (built from ext/_buckets_c.pyx)."""

from collections.abc import Callable, Sequence

from gateway._buckets_verdict import SLOT_BYTES as SLOT_BYTES
from gateway._buckets_verdict import Verdict as Verdict

__all__ = ["SLOT_BYTES", "BucketTable", "Verdict"]

class BucketTable:
    def __init__(
        self, clock: Callable[[], int] | None = None, capacity_hint: int = 1024
    ) -> None: ...
    @property
    def capacity(self) -> int: ...
    def acquire(
        self,
        keys: Sequence[str],
        rates: Sequence[float],
        bursts: Sequence[int],
        cost: int = 1,
    ) -> Verdict: ...
    def peek(self, key: str, rate: float, burst: int) -> tuple[int, float]: ...
    def __len__(self) -> int: ...
    def evict(self) -> int: ...
    def clear(self) -> None: ...
