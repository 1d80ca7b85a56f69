# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Seal an audit record from a request's snapshot, native implementation
(``gateway._records_c``).

Writes, byte for byte, the line that ``gateway/_records_py.py`` gets from
``record_from`` + ``Chain.seal``: the record's canonical JSON (keys sorted,
no spaces, orjson's escaping and number forms) with ``hash`` appended, and
moves the chain's head the same way. The JSON is written straight from the
snapshot tuple into one reused buffer: no dict, no second pass to serialise
it. SHA-256 stays hashlib's (OpenSSL). Floats whose shortest form has an
exponent, NaN and infinities, and anything else unusual, are left to orjson
itself, so the bytes cannot drift from it. A value orjson refuses (a lone
surrogate, an int beyond 64 bits, a type it does not know) raises
``TypeError`` as orjson does, before the chain moves.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdio cimport snprintf
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

import hashlib
import time

import orjson

from gateway.audit.records import pseudonym

__all__ = ["RecordSealer"]

include "_digits.pxi"

cdef object _sha256 = hashlib.sha256
cdef object _orjson_dumps = orjson.dumps
cdef object _pseudonym = pseudonym
cdef object _strftime = time.strftime
cdef object _gmtime = time.gmtime
cdef const char *_HEX = b"0123456789abcdef"
# Per byte: 0 copy as is, else the letter after the backslash ('u': \u00XX).
cdef char _ESCAPE[256]


cdef void _init_escapes() noexcept:
    cdef int c
    for c in range(256):
        _ESCAPE[c] = 0
    for c in range(0x20):
        _ESCAPE[c] = b"u"
    _ESCAPE[0x08] = b"b"
    _ESCAPE[0x09] = b"t"
    _ESCAPE[0x0a] = b"n"
    _ESCAPE[0x0c] = b"f"
    _ESCAPE[0x0d] = b"r"
    _ESCAPE[0x22] = b'"'
    _ESCAPE[0x5c] = b"\\"


_init_escapes()

# The timestamp's whole second, formatted once per second (records.timestamp).
cdef long long _ts_whole = -1
cdef bint _ts_valid = False
cdef bytes _ts_prefix = b""


cdef inline bint _plain8(unsigned long long x) noexcept:
    """True if none of the 8 bytes of ``x`` needs escaping in a JSON string
    (below 0x20, '"' or a backslash). Each test is exact for the word as a
    whole: a byte can only be flagged falsely above one flagged truly."""
    cdef unsigned long long ones = 0x0101010101010101ULL
    cdef unsigned long long highs = 0x8080808080808080ULL
    cdef unsigned long long quote = x ^ 0x2222222222222222ULL
    cdef unsigned long long slash = x ^ 0x5c5c5c5c5c5c5c5cULL
    cdef unsigned long long control = (x - 0x2020202020202020ULL) & ~x & highs
    return (control | ((quote - ones) & ~quote & highs) | ((slash - ones) & ~slash & highs)) == 0


cdef class _Buffer:
    cdef char *data
    cdef Py_ssize_t size
    cdef Py_ssize_t cap

    def __dealloc__(self):
        free(self.data)

    cdef int reserve(self, Py_ssize_t more) except -1:
        cdef Py_ssize_t need = self.size + more
        cdef Py_ssize_t cap = self.cap if self.cap else 1024
        cdef char *grown
        if need <= self.cap:
            return 0
        while cap < need:
            cap *= 2
        grown = <char *>realloc(self.data, cap)
        if grown == NULL:
            raise MemoryError()
        self.data = grown
        self.cap = cap
        return 0

    cdef inline int add(self, const char *s, Py_ssize_t n) except -1:
        if self.size + n > self.cap:
            self.reserve(n)
        memcpy(self.data + self.size, s, n)
        self.size += n
        return 0

    cdef inline int add_bytes(self, bytes b) except -1:
        return self.add(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))

    cdef int add_str(self, str s) except -1:
        """A JSON string as orjson writes it: UTF-8, with \\" \\\\ \\b \\t \\n \\f \\r
        and \\u00XX for the other control characters; nothing else escaped."""
        cdef Py_ssize_t n, i = 0, start = 0
        cdef const char *p
        cdef unsigned char c
        cdef char e
        cdef unsigned long long word
        try:
            p = PyUnicode_AsUTF8AndSize(s, &n)
        except UnicodeEncodeError:
            raise TypeError("str is not valid UTF-8: surrogates not allowed") from None
        self.reserve(n * 6 + 2)  # every byte escaped at worst
        self.data[self.size] = b'"'
        self.size += 1
        while i < n:
            if i + 8 <= n:
                memcpy(&word, p + i, 8)
                if _plain8(word):  # most text: eight bytes at a time
                    i += 8
                    continue
            c = <unsigned char>p[i]
            e = _ESCAPE[c]
            i += 1
            if e == 0:
                continue
            i -= 1
            if i > start:
                memcpy(self.data + self.size, p + start, i - start)
                self.size += i - start
            start = i + 1
            self.data[self.size] = b'\\'
            self.data[self.size + 1] = e
            if e == b'u':
                self.data[self.size + 2] = b'0'
                self.data[self.size + 3] = b'0'
                self.data[self.size + 4] = _HEX[c >> 4]
                self.data[self.size + 5] = _HEX[c & 15]
                self.size += 4
            self.size += 2
            i += 1
        if n > start:
            memcpy(self.data + self.size, p + start, n - start)
            self.size += n - start
        self.data[self.size] = b'"'
        self.size += 1
        return 0

    cdef int add_int(self, object value) except -1:
        cdef char digits[32]
        cdef int overflow = 0
        cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)
        cdef unsigned long long u
        cdef int n
        if overflow == 0:
            n = _signed_digits(digits, v)
        elif overflow > 0:
            try:
                u = PyLong_AsUnsignedLongLong(value)
            except OverflowError:
                raise TypeError("Integer exceeds 64-bit range") from None
            n = _digits(digits, u, False)
        else:
            raise TypeError("Integer exceeds 64-bit range")
        return self.add(digits, n)

    cdef int add_value(self, object value) except -1:
        cdef bytes text
        if value is None:
            return self.add(b"null", 4)
        if value is True:
            return self.add(b"true", 4)
        if value is False:
            return self.add(b"false", 5)
        if isinstance(value, str):
            return self.add_str(value)
        if isinstance(value, int):
            return self.add_int(value)
        if isinstance(value, float):
            text = repr(value).encode()
            if b"e" in text or b"n" in text:  # an exponent, nan, inf: orjson's own form
                text = _orjson_dumps(value)
            return self.add_bytes(text)
        if isinstance(value, (tuple, list)):
            self.add(b"[", 1)
            first = True
            for item in value:
                if not first:
                    self.add(b",", 1)
                first = False
                self.add_value(item)
            return self.add(b"]", 1)
        raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


cdef str _timestamp(object ts):
    """``gateway.audit.records.timestamp``: ISO 8601 UTC with milliseconds."""
    global _ts_whole, _ts_valid, _ts_prefix
    cdef double now = ts
    cdef long long whole = <long long>now
    cdef char ms[16]
    if not _ts_valid or whole != _ts_whole:
        _ts_prefix = _strftime("%Y-%m-%dT%H:%M:%S", _gmtime(whole)).encode()
        _ts_whole = whole
        _ts_valid = True
    cdef int millis = <int>((now - <double>whole) * 1000)
    cdef int n
    if 0 <= millis < 1000:
        ms[0] = b"."
        ms[1] = <char>(48 + millis // 100)
        ms[2] = <char>(48 + millis // 10 % 10)
        ms[3] = <char>(48 + millis % 10)
        ms[4] = b"Z"
        n = 5
    else:  # a clock before 1970: as f"{millis:03d}" writes it
        n = snprintf(ms, 16, ".%03dZ", millis)
    return (_ts_prefix + PyBytes_FromStringAndSize(ms, n)).decode()


# The record's keys in canonical (sorted) order, each as the bytes before its
# value; ``seal`` pairs them with the values, in the same order, that
# ``records.record_from`` puts in its dict (client: network, pseudonym).
cdef tuple _KEY_HEADS = (
    b'{"bytes_in":', b',"bytes_out":', b',"chain":', b',"client":{"network":',
    b',"pseudonym":', b'},"decision":', b',"degraded":', b',"instance":', b',"latency_ms":',
    b',"method":', b',"mode":', b',"path":', b',"plan":', b',"policy_rev":', b',"prev":',
    b',"reason":', b',"request_id":', b',"roles":', b',"route":', b',"rule":', b',"seq":',
    b',"session":', b',"signals":', b',"status":', b',"subject":', b',"tenant":', b',"ts":',
    b',"upstream":', b',"upstream_status":',
)
cdef Py_ssize_t _NKEYS = len(_KEY_HEADS)


cdef class RecordSealer:
    """``gateway._records_py.RecordSealer``, natively."""

    cdef readonly str instance
    cdef readonly bytes ip_key
    cdef _Buffer buf

    def __init__(self, str instance, bytes ip_key):
        self.instance = instance
        self.ip_key = ip_key
        self.buf = _Buffer()

    def seal(self, tuple facts, chain):
        if len(facts) != 25:
            raise ValueError("an audit snapshot has 25 facts")
        cdef _Buffer b = self.buf
        prev = chain.prev
        seq = chain.seq + 1
        cdef bytes prev_ascii = prev.encode("ascii", "replace")
        cdef Py_ssize_t head = PyBytes_GET_SIZE(prev_ascii), i
        b.size = 0
        b.add_bytes(prev_ascii)  # hashed with the body, not part of it
        ip = facts[3]
        values = (
            facts[0], facts[1], chain.chain_id, facts[2],
            _pseudonym(ip, self.ip_key) if ip is not None else None,
            facts[4], facts[5], self.instance, round(facts[6] * 1000, 3), facts[7], facts[8],
            facts[9],
            facts[10], facts[11], prev, facts[12], facts[13], facts[14], facts[15],
            facts[16], seq, facts[17], facts[18], facts[19], facts[20], facts[21],
            _timestamp(facts[22]), facts[23], facts[24],
        )
        for i in range(_NKEYS):
            b.add_bytes(<bytes>_KEY_HEADS[i])
            b.add_value(values[i])
        b.add(b"}", 1)

        digest = _sha256(PyBytes_FromStringAndSize(b.data, b.size)).hexdigest()
        cdef bytes hex_ = digest.encode()
        # The line: the body without its closing brace, then ,"hash":"<digest>"}
        cdef Py_ssize_t body = b.size - head - 1
        cdef bytes line = PyBytes_FromStringAndSize(NULL, body + 9 + 64 + 3)
        cdef char *out = PyBytes_AS_STRING(line)
        memcpy(out, b.data + head, body)
        memcpy(out + body, b',"hash":"', 9)
        memcpy(out + body + 9, PyBytes_AS_STRING(hex_), 64)
        memcpy(out + body + 73, b'"}\n', 3)
        chain.seq = seq
        chain.prev = digest
        return line
