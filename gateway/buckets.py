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
from gateway.native import native

__all__ = ["IMPLEMENTATION", "BucketTable", "Verdict"]


def _select() -> tuple[type, str]:
    module = native("_buckets_c")
    if module is not None:
        return module.BucketTable, "c"
    from gateway import _buckets_py

    return _buckets_py.BucketTable, "py"


_SELECTED = _select()
IMPLEMENTATION: Final[str] = _SELECTED[1]  # "c" or "py"

if TYPE_CHECKING:
    # Both classes have the same API; type-check callers against the pure one.
    from gateway._buckets_py import BucketTable as BucketTable
else:
    BucketTable = _SELECTED[0]
del _SELECTED
