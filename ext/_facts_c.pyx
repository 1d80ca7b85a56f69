# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""A finished request's audit facts, native implementation (``gateway._facts_c``).

Returns, value for value, the tuple that ``gateway/_facts_py.py`` returns,
with Python's own arithmetic on the times (only the clocks are read
natively, to the same double as ``time.time()`` and ``time.perf_counter()``).
The facts are read straight from the request's slots (``_gather.pxi``,
shared with ``_records_c``, which writes a record's body from them).
"""

from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_New

cdef extern from "Python.h":
    void _steal "PyTuple_SET_ITEM"(object, Py_ssize_t, PyObject *)  # takes the reference

__all__ = ["snapshot"]

include "_gather.pxi"

_gather_ready()


def snapshot(req, policy, *, degraded=False, now=None, finished=None):
    cdef PyObject *it[FACTS]
    cdef double latency = 0.0, ts = 0.0
    cdef int k
    if _gather(req, policy, degraded, now, finished, it, &latency, &ts, False):
        return _twin_snapshot(req, policy, degraded=degraded, now=now, finished=finished)
    try:
        if it[F_LATENCY] == NULL:
            _put(it, F_LATENCY, PyFloat_FromDouble(latency))
        if it[F_TS] == NULL:
            _put(it, F_TS, PyFloat_FromDouble(ts))
        facts = PyTuple_New(FACTS)
    except BaseException:
        _release(it)
        raise
    for k in range(FACTS):
        _steal(facts, k, it[k])
    return facts
