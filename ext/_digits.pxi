# Shared by the native modules (``include "_digits.pxi"``): integer formatting
# without printf, the hot part of every RateLimit header and audit line.

cdef inline int _digits(char *out, unsigned long long v, bint negative) noexcept:
    """The decimal digits of ``v`` (after a minus sign if ``negative``) into
    ``out`` (24 bytes at least), as ``str(int)`` writes them; returns the length."""
    cdef char tmp[24]
    cdef int n = 0, i = 0
    while True:
        tmp[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    if negative:
        out[0] = b"-"
        i = 1
    while n > 0:
        n -= 1
        out[i] = tmp[n]
        i += 1
    return i


cdef inline int _signed_digits(char *out, long long value) noexcept:
    if value < 0:
        return _digits(out, <unsigned long long>0 - <unsigned long long>value, True)
    return _digits(out, <unsigned long long>value, False)
