# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, infer_types=True
"""Token buckets for fair-usage limits, native implementation (``gateway._buckets_c``).

Behaviour is identical to ``gateway/_buckets_py.py`` -- same verdicts, same
``len()`` and ``capacity`` after every call, same exceptions and messages, in
the same order of checks -- see that module for the algorithm (GCRA in int64
nanoseconds) and the eviction rules.

The state lives in C memory: an open-addressing table of 16-byte slots
``{uint64 key hash, int64 tat_ns}`` (``tat_ns == 0`` marks an empty slot:
a stored tat is always > now >= 0), a power of two of them, load factor at
most 1/2, linear probing and backward-shift deletion (no tombstones).  The
key is Python's ``hash(key)``; two keys with the same 64-bit hash share one
bucket.  Between argument conversion (which may run Python code) and the
verdict, ``acquire`` runs no Python code, so it is atomic under the GIL.  (If
growing the table fails with MemoryError, the keys of that call charged
before the failure stay charged.)
"""

from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_SET_ITEM
from cpython.object cimport PyTypeObject
from libc.math cimport rint
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t, uint64_t
from libc.stdlib cimport calloc, free
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import math

cdef extern from "Python.h":
    object PyType_GenericAlloc(PyTypeObject *type, Py_ssize_t nitems)

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
    SLOT_BYTES,
    Verdict,
    as_int,
    as_rate,
    initial_capacity,
    shrunk_capacity,
)

__all__ = ["SLOT_BYTES", "BucketTable", "Verdict"]

cdef enum:
    C_MAX_KEYS = 16

cdef int64_t C_MAX_SPAN = (<int64_t>1) << 61
cdef int64_t C_MAX_NOW = (<int64_t>1) << 61
cdef int64_t C_MAX_HINT = (<int64_t>1) << 28
cdef int64_t C_SMALL = (<int64_t>1) << 30  # C_SMALL * C_SMALL < C_MAX_SPAN
cdef double C_MAX_RATE = 1e9
cdef int64_t NEVER = -1

cdef object _Verdict = Verdict
cdef object _inf = math.inf
cdef object _zero = 0.0


cdef inline object _set(object tup, Py_ssize_t i, object item):
    Py_INCREF(item)
    PyTuple_SET_ITEM(tup, i, item)


cdef object _verdict(bint allowed, int64_t remaining, double reset, object retry_after,
                     Py_ssize_t tightest):
    """A Verdict, built like ``tuple.__new__(Verdict, ...)`` without the argument tuples."""
    # A named tuple adds no state to tuple: allocate it as tuple.__new__ does and fill it.
    cdef object verdict = PyType_GenericAlloc(<PyTypeObject *>_Verdict, 5)
    _set(verdict, 0, True if allowed else False)
    _set(verdict, 1, remaining)
    _set(verdict, 2, reset)
    _set(verdict, 3, retry_after)
    _set(verdict, 4, tightest)
    return verdict

ctypedef struct Slot:
    uint64_t h
    int64_t tat  # 0: empty


cdef inline Py_ssize_t _home(uint64_t h, Py_ssize_t mask) noexcept nogil:
    # A murmur3-style finalizer: str hashes are good already, other hashes may not be.
    h ^= h >> 33
    h *= <uint64_t>0xff51afd7ed558ccd
    h ^= h >> 33
    return <Py_ssize_t>(h & <uint64_t>mask)


cdef int64_t _as_i64(object value) except? -1:
    """An int argument saturated to int64 (the range checks then match the twin's)."""
    cdef int overflow = 0
    if type(value) is not int:
        value = as_int(value)
    cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow > 0:
        return INT64_MAX
    if overflow < 0:
        return INT64_MIN
    return v


cdef int _bucket(object rate, object burst, int64_t *interval, int64_t *tolerance,
                 int64_t *burst_out) except -1:
    cdef double r
    if type(rate) is float:
        r = PyFloat_AS_DOUBLE(rate)
    else:
        r = as_rate(rate)
    if not (0.0 < r <= C_MAX_RATE):
        raise ValueError(E_RATE)
    cdef int64_t b = _as_i64(burst)
    if b < 1:
        raise ValueError(E_BURST)
    cdef double interval_f = 1e9 / r
    if interval_f > <double>C_MAX_SPAN:
        raise ValueError(E_SPAN)
    cdef int64_t iv = <int64_t>rint(interval_f)
    # b * iv <= 2**61, i.e. b <= 2**61 // iv (no division when both are small).
    if (b > C_SMALL or iv > C_SMALL) and b > C_MAX_SPAN // iv:
        raise ValueError(E_SPAN)
    interval[0] = iv
    tolerance[0] = b * iv
    burst_out[0] = b
    return 0


cdef inline int64_t _remaining(int64_t tolerance, int64_t interval, int64_t ahead) noexcept nogil:
    cdef int64_t left = tolerance - ahead
    return left // interval if left > 0 else 0


cdef class BucketTable:
    """GCRA token buckets keyed by ``hash(key)``; see ``gateway/_buckets_py.py``."""

    cdef Slot *_slots
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _mask
    cdef Py_ssize_t _count
    cdef Py_ssize_t _min_cap
    cdef object _clock  # None: clock_gettime(CLOCK_MONOTONIC), like time.monotonic_ns

    def __cinit__(self, clock=None, capacity_hint=1024):
        self._slots = NULL
        self._cap = 0
        self._count = 0

    def __init__(self, clock=None, capacity_hint=1024):
        if clock is not None and not callable(clock):
            raise TypeError(E_CLOCK_TYPE)
        cdef int64_t hint = _as_i64(capacity_hint)
        if not (0 <= hint <= C_MAX_HINT):
            raise ValueError(E_CAPACITY)
        self._clock = clock
        self._min_cap = initial_capacity(hint)
        self._reset(self._min_cap)

    def __dealloc__(self):
        free(self._slots)
        self._slots = NULL

    @property
    def capacity(self):
        """Slots of the table: a power of two, load <= 1/2."""
        return self._cap

    cdef int _reset(self, Py_ssize_t cap) except -1:
        cdef Slot *slots = <Slot *>calloc(cap, sizeof(Slot))
        if slots == NULL:
            raise MemoryError()
        free(self._slots)
        self._slots = slots
        self._cap = cap
        self._mask = cap - 1
        self._count = 0
        return 0

    cdef int _resize(self, Py_ssize_t cap) except -1:
        cdef Slot *old = self._slots
        cdef Py_ssize_t old_cap = self._cap, i, j, mask = cap - 1
        cdef Slot *slots = <Slot *>calloc(cap, sizeof(Slot))
        if slots == NULL:
            raise MemoryError()
        for i in range(old_cap):
            if old[i].tat != 0:
                j = _home(old[i].h, mask)
                while slots[j].tat != 0:
                    j = (j + 1) & mask
                slots[j] = old[i]
        free(old)
        self._slots = slots
        self._cap = cap
        self._mask = mask
        return 0

    cdef inline int64_t _now(self) except -1:
        cdef timespec ts
        cdef int64_t now
        if self._clock is None:
            clock_gettime(CLOCK_MONOTONIC, &ts)
            now = <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec
        else:
            now = _as_i64(self._clock())
        if not (0 <= now < C_MAX_NOW):
            raise ValueError(E_CLOCK)
        return now

    cdef inline Py_ssize_t _find(self, uint64_t h) noexcept nogil:
        """The slot holding ``h``, or ``-1 - slot`` of the empty slot ending its probe."""
        cdef Py_ssize_t mask = self._mask
        cdef Py_ssize_t i = _home(h, mask)
        cdef Slot *slots = self._slots
        while True:
            if slots[i].tat == 0:
                return -1 - i
            if slots[i].h == h:
                return i
            i = (i + 1) & mask

    cdef void _delete_at(self, Py_ssize_t i) noexcept nogil:
        """Backward-shift deletion: later members of the cluster move up; no tombstones."""
        cdef Slot *slots = self._slots
        cdef Py_ssize_t mask = self._mask, j = i, k
        cdef bint stays
        while True:
            j = (j + 1) & mask
            if slots[j].tat == 0:
                break
            k = _home(slots[j].h, mask)
            # The entry at j may move to the hole at i unless its home is in (i, j].
            if i <= j:
                stays = i < k and k <= j
            else:
                stays = i < k or k <= j
            if not stays:
                slots[i] = slots[j]
                i = j
        slots[i].h = 0
        slots[i].tat = 0
        self._count -= 1

    cdef Py_ssize_t _evict_full(self, int64_t now) noexcept nogil:
        """Delete every slot with tat <= now, in one pass from an empty slot."""
        cdef Slot *slots = self._slots
        cdef Py_ssize_t mask = self._mask, cap = self._cap, start = 0, i, seen = 1
        cdef Py_ssize_t removed = 0
        while slots[start].tat != 0:  # load <= 1/2: there is an empty slot
            start += 1
        # A deletion only moves entries from later in the same cluster into the
        # hole at i; clusters never span the empty start, so the scanned slots
        # (between start and i) are never touched again.
        i = (start + 1) & mask
        while seen < cap:
            if slots[i].tat != 0 and slots[i].tat <= now:
                self._delete_at(i)
                removed += 1
            else:
                i = (i + 1) & mask
                seen += 1
        return removed

    cdef int _insert(self, uint64_t h, int64_t tat, int64_t now) except -1:
        cdef Py_ssize_t pos
        if self._count + 1 > self._cap // 2:
            self._evict_full(now)
            if self._count + 1 > self._cap * 3 // 8:
                self._resize(self._cap * 2)
        pos = -1 - self._find(h)
        self._slots[pos].h = h
        self._slots[pos].tat = tat
        self._count += 1
        return 0

    def acquire(self, keys, rates, bursts, cost=1):
        """Charge ``cost`` tokens to every bucket, or to none."""
        cdef Py_ssize_t n = len(keys), i, j, pos, tightest = 0, worst_i = -1
        cdef uint64_t hashes[C_MAX_KEYS]
        cdef int64_t intervals[C_MAX_KEYS]
        cdef int64_t tolerances[C_MAX_KEYS]
        cdef int64_t burst_of[C_MAX_KEYS]
        cdef int64_t new_tats[C_MAX_KEYS]
        cdef int64_t c, now, tat, base, new_tat, retry, worst = 0, left, least = -1, ahead
        cdef bint allowed = True
        if not (1 <= n <= C_MAX_KEYS):
            raise ValueError(E_NKEYS)
        if len(rates) != n or len(bursts) != n:
            raise ValueError(E_LENGTHS)
        c = _as_i64(cost)
        if not (0 <= c <= C_MAX_SPAN):
            raise ValueError(E_COST)
        for i in range(n):
            key = keys[i]
            if not isinstance(key, str):
                raise TypeError(E_KEY)
            hashes[i] = <uint64_t>hash(key)
            _bucket(rates[i], bursts[i], &intervals[i], &tolerances[i], &burst_of[i])
            for j in range(i):
                if hashes[j] == hashes[i]:
                    raise ValueError(E_DUPLICATE)
        now = self._now()

        # No Python code from here on: the decision and the charge are atomic.
        for i in range(n):
            pos = self._find(hashes[i])
            tat = self._slots[pos].tat if pos >= 0 else 0
            base = tat if tat > now else now
            if c > burst_of[i]:
                retry = NEVER
                new_tats[i] = base
            else:
                new_tat = base + c * intervals[i]
                new_tats[i] = new_tat
                if new_tat - now <= tolerances[i]:
                    continue
                retry = new_tat - now - tolerances[i]
            allowed = False
            if worst != NEVER and (retry == NEVER or retry > worst):
                worst = retry
                worst_i = i

        if allowed:
            for i in range(n):
                left = _remaining(tolerances[i], intervals[i], new_tats[i] - now)
                if least < 0 or left < least:
                    least = left
                    tightest = i
            if c > 0:
                for i in range(n):
                    pos = self._find(hashes[i])
                    if pos >= 0:
                        self._slots[pos].tat = new_tats[i]
                    else:
                        self._insert(hashes[i], new_tats[i], now)
            ahead = new_tats[tightest] - now
            return _verdict(True, least, ahead / 1e9, _zero, tightest)

        pos = self._find(hashes[worst_i])
        tat = self._slots[pos].tat if pos >= 0 else 0
        ahead = tat - now if tat > now else 0
        return _verdict(
            False,
            _remaining(tolerances[worst_i], intervals[worst_i], ahead),
            ahead / 1e9,
            _inf if worst == NEVER else worst / 1e9,
            worst_i,
        )

    def peek(self, key, rate, burst):
        """``(remaining, reset)`` of one bucket, without charging it."""
        cdef int64_t interval, tolerance, b, now, tat, ahead
        cdef Py_ssize_t pos
        if not isinstance(key, str):
            raise TypeError(E_KEY)
        cdef uint64_t h = <uint64_t>hash(key)
        _bucket(rate, burst, &interval, &tolerance, &b)
        now = self._now()
        pos = self._find(h)
        tat = self._slots[pos].tat if pos >= 0 else 0
        ahead = tat - now if tat > now else 0
        return _remaining(tolerance, interval, ahead), ahead / 1e9

    def __len__(self):
        return self._count

    def evict(self):
        """Drop every full bucket; returns how many.  May shrink the capacity."""
        cdef int64_t now = self._now()
        cdef Py_ssize_t removed = self._evict_full(now)
        cdef Py_ssize_t cap = shrunk_capacity(self._count, self._min_cap)
        if cap < self._cap:
            self._resize(cap)
        return removed

    def clear(self):
        """Drop every bucket and restore the initial capacity."""
        self._reset(self._min_cap)
