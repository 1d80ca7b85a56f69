# Shared by the native modules (``include "_clock.pxi"``): CPython 3.11's
# clocks, read without a call into the time module, to the same double.

from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec


cdef inline double _seconds(int clock) noexcept:
    """``_PyTime_AsSecondsDouble`` of ``clock`` in int64 nanoseconds: what
    ``time.time()`` (CLOCK_REALTIME) and ``time.perf_counter()``
    (CLOCK_MONOTONIC) return on Linux."""
    cdef timespec ts
    clock_gettime(clock, &ts)
    cdef long long t = <long long>ts.tv_sec * 1000000000 + ts.tv_nsec
    cdef volatile double d
    if t % 1000000000 == 0:
        d = <double>(t // 1000000000)
    else:
        d = <double>t
        d /= 1e9
    return d


cdef inline double _time_time() noexcept:
    return _seconds(CLOCK_REALTIME)


cdef inline double _perf_counter() noexcept:
    return _seconds(CLOCK_MONOTONIC)
