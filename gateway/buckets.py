"""Token buckets for fair-usage limits: pick the native or the pure-Python table.

``BucketTable().acquire(keys, rates, bursts, cost=1) -> Verdict`` charges
``cost`` tokens to up to 16 GCRA token buckets at once, all or nothing;
``peek``, ``evict``, ``clear`` and ``len()`` complete it.  The semantics, the
bounds and the deterministic eviction rules are documented in
``gateway/_buckets_py.py``.

The native ``gateway._buckets_c`` (one 16-byte C slot per active key) is used
unless ``FAIRGATE_NO_EXTENSIONS`` is set to a non-empty value other than
``"0"``, or it cannot be imported.  Both return the same :class:`Verdict`
class and raise the same exceptions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from gateway._buckets_verdict import Verdict
from gateway.native import select

__all__ = ["IMPLEMENTATION", "BucketTable", "Verdict"]


_module, _implementation = select("_buckets")
IMPLEMENTATION: Final[str] = _implementation  # "c" or "py"

if TYPE_CHECKING:
    # Both classes have the same API; type-check callers against the pure one.
    from gateway._buckets_py import BucketTable as BucketTable
else:
    BucketTable = _module.BucketTable
