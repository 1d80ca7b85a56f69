"""What both token-bucket tables share: the :class:`Verdict`, the limits and the messages.

``gateway/_buckets_py.py`` and the native ``gateway._buckets_c`` import this
module, so a verdict from either is the same class and a refused argument
raises the same exception with the same message.  The argument converters
below are the slow path of both implementations (the native one converts a
plain ``float`` rate and a plain ``int`` itself, with the same results).
"""

from __future__ import annotations

import operator
from typing import Final, NamedTuple, SupportsFloat, SupportsIndex

__all__ = [
    "E_BURST",
    "E_CAPACITY",
    "E_CLOCK",
    "E_CLOCK_TYPE",
    "E_COST",
    "E_DUPLICATE",
    "E_KEY",
    "E_LENGTHS",
    "E_NKEYS",
    "E_RATE",
    "E_RATE_TYPE",
    "E_SPAN",
    "MAX_CAPACITY_HINT",
    "MAX_KEYS",
    "MAX_NOW_NS",
    "MAX_RATE",
    "MAX_SPAN_NS",
    "MIN_CAPACITY",
    "SLOT_BYTES",
    "Verdict",
    "as_int",
    "as_rate",
    "initial_capacity",
    "shrunk_capacity",
]


class Verdict(NamedTuple):
    """The outcome of ``BucketTable.acquire``.

    ``remaining``/``reset`` describe the *tightest* bucket after the decision:
    when allowed, the one with the fewest tokens left (the first on ties); when
    refused, the refusing bucket with the largest ``retry_after`` (the first on
    ties).  ``retry_after`` is ``0.0`` when allowed, ``math.inf`` when the cost
    exceeds some bucket's burst (it can never be allowed), else the seconds
    until the very same request would be allowed by every bucket.
    """

    allowed: bool
    remaining: int
    reset: float
    retry_after: float
    tightest: int


MAX_KEYS: Final = 16
MAX_RATE: Final = 1e9  # tokens per second: the interval is at least 1 ns
MAX_SPAN_NS: Final = 2**61  # burst * interval and cost ceiling (~73 years)
MAX_NOW_NS: Final = 2**61  # the clock must stay in [0, MAX_NOW_NS)
MIN_CAPACITY: Final = 16  # slots
MAX_CAPACITY_HINT: Final = 2**28
SLOT_BYTES: Final = 16  # one native slot: uint64 key hash + int64 tat

E_NKEYS: Final = f"acquire takes 1 to {MAX_KEYS} keys"
E_LENGTHS: Final = "keys, rates and bursts must have the same length"
E_COST: Final = "cost must be between 0 and 2**61"
E_KEY: Final = "keys must be str"
E_DUPLICATE: Final = "duplicate key in one acquire"
E_RATE_TYPE: Final = "rate must be a real number"
E_RATE: Final = "rate must be > 0 and <= 1e9 tokens per second"
E_BURST: Final = "burst must be >= 1"
E_SPAN: Final = "burst / rate must be at most 2**61 ns"
E_CLOCK: Final = "clock must return nanoseconds in [0, 2**61)"
E_CLOCK_TYPE: Final = "clock must be callable"
E_CAPACITY: Final = f"capacity_hint must be between 0 and {MAX_CAPACITY_HINT}"


def as_rate(value: SupportsFloat | SupportsIndex) -> float:
    """A rate as a float: any real number, but never a string."""
    if isinstance(value, str | bytes | bytearray):
        raise TypeError(E_RATE_TYPE)
    return float(value)


def as_int(value: SupportsIndex) -> int:
    """An integer argument (``operator.index``: no floats, no strings)."""
    return operator.index(value)


def initial_capacity(hint: int) -> int:
    """Slots for ``hint`` active keys at a load factor of at most 1/2 (a power of two)."""
    cap = MIN_CAPACITY
    while cap < 2 * hint:
        cap *= 2
    return cap


def shrunk_capacity(count: int, minimum: int) -> int:
    """The smallest ``minimum * 2**k`` slots holding ``count`` keys at a load of at most 1/4."""
    cap = minimum
    while count * 4 > cap:
        cap *= 2
    return cap
