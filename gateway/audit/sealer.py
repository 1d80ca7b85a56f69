"""The record sealer: a request's snapshot to its sealed JSON line.

The native sealer (ext/_records_c.pyx) unless FAIRGATE_NO_EXTENSIONS is set
or it is not built; the pure one (gateway/_records_py.py) writes the same
bytes. Its own module so that the audit writer process imports only the
audit package, not the gateway's request pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from gateway.native import select

_sealers, _implementation = select("_records")
SEALER_IMPLEMENTATION: Final[str] = _implementation  # "c" or "py"
if TYPE_CHECKING:
    from gateway._records_py import RecordBatch as RecordBatch
    from gateway._records_py import RecordSealer as RecordSealer
else:
    RecordSealer = _sealers.RecordSealer
    RecordBatch = _sealers.RecordBatch

__all__ = ["SEALER_IMPLEMENTATION", "RecordBatch", "RecordSealer"]
