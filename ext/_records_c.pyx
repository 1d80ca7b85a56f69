# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Write and seal audit records, native implementation (``gateway._records_c``).

Writes, byte for byte, the line that ``gateway/_records_py.py`` gets from
``record_from`` + ``Chain.seal``: the record's canonical JSON (keys sorted,
no spaces, orjson's escaping and number forms) with ``hash`` appended, and
moves the chain's head the same way. The JSON is written straight from the
snapshot tuple (or, for ``RecordBatch``, from the request's slots) into one
reused buffer: no dict, no second pass to serialise it. SHA-256 is OpenSSL's.
Floats whose shortest form has an exponent, NaN and infinities, and anything
else unusual, are left to orjson itself, so the bytes cannot drift from it. A value orjson refuses (a lone
surrogate, an int beyond 64 bits, a type it does not know) raises
``TypeError`` as orjson does, before the chain moves.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.ref cimport PyObject
from libc.math cimport floor
from libc.stdio cimport snprintf
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

import hashlib
import operator
import time

import orjson

from gateway.audit.records import pseudonym

__all__ = ["Bodies", "RecordBatch", "RecordSealer", "decode_batch"]


cdef extern from "openssl/sha.h":
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX *c) nogil
    int SHA256_Update(SHA256_CTX *c, const void *data, size_t n) nogil
    int SHA256_Final(unsigned char *md, SHA256_CTX *c) nogil


cdef extern from "Python.h":
    PyObject **PySequence_Fast_ITEMS(object)
    bint PyUnicode_IS_COMPACT_ASCII(object)
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    void *PyUnicode_DATA(object)
    bint PyUnicode_IS_ASCII(object)
    object PyUnicode_FromKindAndData(int kind, const void *buffer, Py_ssize_t size)
    int PyUnicode_1BYTE_KIND

PSEUDONYM_CACHE = 65536  # as records.pseudonym's lru_cache

include "_digits.pxi"
include "_gather.pxi"

cdef object _sha256 = hashlib.sha256
cdef object _orjson_dumps = orjson.dumps
cdef object _orjson_loads = orjson.loads
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


@cython.final
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
        cdef char *out
        cdef unsigned char c
        cdef char e
        cdef unsigned long long word
        if PyUnicode_IS_COMPACT_ASCII(s):  # most strings: their bytes are the UTF-8
            n = PyUnicode_GET_LENGTH(s)
            p = <const char *>PyUnicode_DATA(s)
        else:
            try:
                p = PyUnicode_AsUTF8AndSize(s, &n)
            except UnicodeEncodeError:
                raise TypeError("str is not valid UTF-8: surrogates not allowed") from None
        if self.size + n * 6 + 2 > self.cap:
            self.reserve(n * 6 + 2)  # every byte escaped at worst
        self.data[self.size] = b'"'
        self.size += 1
        out = self.data + self.size
        # Most strings need no escape: find out a word at a time, storing each
        # plain word as it is read (no copy afterwards, no call to memcpy), the
        # last word overlapping the one before it (no byte-by-byte tail).
        # Otherwise go on from the first word that needs one: everything
        # before it is already out.
        if n >= 8:
            while i + 8 <= n:
                memcpy(&word, p + i, 8)
                if not _plain8(word):
                    break
                memcpy(out + i, &word, 8)
                i += 8
            if i + 8 > n:  # every whole word plain: the last one, overlapping
                memcpy(&word, p + n - 8, 8)
                if _plain8(word):
                    memcpy(out + n - 8, &word, 8)
                    i = n
        else:
            while i < n and _ESCAPE[<unsigned char>p[i]] == 0:
                out[i] = p[i]
                i += 1
        self.size += i
        start = i
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
        if overflow == 0:  # the digits straight into the buffer: no copy
            if self.size + 24 > self.cap:
                self.reserve(24)
            self.size += _signed_digits(self.data + self.size, v)
            return 0
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


cdef int _add_latency(_Buffer b, object latency) except -1:
    """``add_value(round(latency * 1000, 3))``, for a float latency without
    round()'s and repr()'s decimal conversions (``_add_latency_of``)."""
    if type(latency) is float:
        return _add_latency_of(b, PyFloat_AS_DOUBLE(latency))
    return b.add_value(round(latency * 1000, 3))


cdef int _add_latency_of(_Buffer b, double seconds) except -1:
    """``_add_latency`` of the float ``seconds``: x * 1000 rounded to the
    nearest integer m, when x * 1000 is clearly not near a tie, is what
    round(x, 3) rounds to (m / 1000 is then the double round() returns, and
    its shortest repr is m / 1000 written out, as 0 < m < 1e12). Otherwise
    Python's own round and repr."""
    cdef double x, y, f
    cdef unsigned long long m, q, r
    cdef char digits[40]
    cdef int n
    x = seconds * 1000.0
    y = x * 1000.0
    if 0.0 < y < 1e12:
        f = y - floor(y)
        if f < 0.499 or f > 0.501:
            m = <unsigned long long>floor(y) + (1 if f > 0.5 else 0)
            q = m // 1000
            r = m % 1000
            n = _digits(digits, q, False)
            digits[n] = b"."
            n += 1
            if r == 0:
                digits[n] = b"0"
                n += 1
            else:
                digits[n] = <char>(48 + r // 100)
                digits[n + 1] = <char>(48 + r // 10 % 10)
                digits[n + 2] = <char>(48 + r % 10)
                n += 3
                while digits[n - 1] == b"0":
                    n -= 1
            return b.add(digits, n)
    return b.add_value(round(PyFloat_FromDouble(seconds) * 1000, 3))


cdef int _add_timestamp(_Buffer b, object ts) except -1:
    """``gateway.audit.records.timestamp`` as a JSON string: ISO 8601 UTC with
    milliseconds, written straight into the line (it needs no escaping)."""
    cdef double now = ts
    if not (-9.2e18 < now < 9.2e18):  # NaN, infinities, past time_t: raise as the twin does
        _gmtime(int(ts))
    return _add_timestamp_of(b, now)


cdef int _add_timestamp_of(_Buffer b, double now) except -1:
    """``_add_timestamp`` of a time within time_t's range."""
    global _ts_whole, _ts_valid, _ts_prefix
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
    b.add(b'"', 1)
    b.add_bytes(_ts_prefix)
    b.add(ms, n)
    return b.add(b'"', 1)


cdef inline int _value_or_gap(_Buffer b, Py_ssize_t *gaps, int k, object value) except -1:
    """``value`` into ``b``; with ``gaps``, only where it would go, in ``gaps[k]``."""
    if gaps is NULL:
        return b.add_value(value)
    gaps[k] = b.size
    return 0


@cython.final
cdef class RecordSealer:
    """``gateway._records_py.RecordSealer``, natively."""

    cdef readonly str instance
    cdef readonly bytes ip_key
    cdef _Buffer buf
    cdef _Buffer lines  # seal_many's lines
    cdef dict _pseudonyms  # ip -> pseudonym: records.pseudonym's answers, without its call

    def __init__(self, str instance, bytes ip_key):
        self.instance = instance
        self.ip_key = ip_key
        self.buf = _Buffer()
        self.lines = _Buffer()
        self._pseudonyms = {}

    def seal(self, facts, chain):
        """The line of ``facts`` (a snapshot: a tuple, or the list JSON gives
        the writer process), or of a record body from ``body``, sealed into
        ``chain``, whose head moves to it."""
        if type(facts) is bytes:
            return self.seal_many((facts,), chain)  # a body: a run of one
        cdef PyObject **it = self._items(facts)
        cdef _Buffer b = self.buf
        cdef Py_ssize_t head
        prev = chain.prev
        seq = chain.seq + 1
        b.size = 0
        head = _add_prev(b, prev)  # hashed with the body, not part of it
        self._add_fields(b, it, chain.chain_id, prev, seq, NULL, 0.0, 0.0)
        return _finish(b, head, chain, seq)

    def body(self, facts):
        """The record of ``facts`` without its place in a chain, for a writer
        process to seal (``seal``): the canonical JSON with no value for
        ``chain``, ``prev`` and ``seq``, after a 16-byte header (big-endian
        u32s: the length of what follows it, then where each of the three
        values goes in the JSON). Raises as ``seal`` does."""
        cdef PyObject **it = self._items(facts)
        cdef _Buffer b = self.buf
        b.size = 0
        _add_body(self, b, it, 0.0, 0.0)
        return PyBytes_FromStringAndSize(b.data, b.size)

    cdef PyObject **_items(self, facts) except NULL:
        if type(facts) is not tuple and type(facts) is not list:
            raise TypeError(f"an audit snapshot is a tuple, not {type(facts).__name__}")
        if len(facts) != 25:
            raise ValueError("an audit snapshot has 25 facts")
        return PySequence_Fast_ITEMS(facts)

    cdef object _pseudonym_of(self, object ip):
        cdef PyObject *cached
        if ip is None:
            return None
        if type(ip) is not str:
            return _pseudonym(ip, self.ip_key)
        cached = PyDict_GetItem(self._pseudonyms, ip)
        if cached is not NULL:
            return <object>cached
        pseudo = _pseudonym(ip, self.ip_key)
        if len(self._pseudonyms) >= PSEUDONYM_CACHE:
            self._pseudonyms.clear()
        self._pseudonyms[ip] = pseudo
        return pseudo

    cdef int _add_fields(
        self, _Buffer b, PyObject **it, object chain_id, object prev, object seq,
        Py_ssize_t *gaps, double latency, double ts,
    ) except -1:
        """The record's JSON into ``b``; with ``gaps``, the values of chain,
        prev and seq are left out and where each goes is put in ``gaps``.
        The keys in canonical (sorted) order, each written as the C literal
        before its value (copied inline, no call), paired with the values in
        the order ``records.record_from`` puts them in its dict (client:
        network, pseudonym). ``latency`` and ``ts`` stand for the facts'
        latency and timestamp where their slots in ``it`` are NULL
        (``_gather``'s clocks, with no float object made)."""
        pseudo = self._pseudonym_of(<object>it[3])
        b.add(b'{"bytes_in":', 12); b.add_value(<object>it[0])
        b.add(b',"bytes_out":', 13); b.add_value(<object>it[1])
        b.add(b',"chain":', 9)
        _value_or_gap(b, gaps, 0, chain_id)
        b.add(b',"client":{"network":', 21); b.add_value(<object>it[2])
        b.add(b',"pseudonym":', 13); b.add_value(pseudo)
        b.add(b'},"decision":', 13); b.add_value(<object>it[4])
        b.add(b',"degraded":', 12); b.add_value(<object>it[5])
        b.add(b',"instance":', 12); b.add_value(self.instance)
        b.add(b',"latency_ms":', 14); (
            _add_latency_of(b, latency) if it[6] == NULL else _add_latency(b, <object>it[6])
        )
        b.add(b',"method":', 10); b.add_value(<object>it[7])
        b.add(b',"mode":', 8); b.add_value(<object>it[8])
        b.add(b',"path":', 8); b.add_value(<object>it[9])
        b.add(b',"plan":', 8); b.add_value(<object>it[10])
        b.add(b',"policy_rev":', 14); b.add_value(<object>it[11])
        b.add(b',"prev":', 8)
        _value_or_gap(b, gaps, 1, prev)
        b.add(b',"reason":', 10); b.add_value(<object>it[12])
        b.add(b',"request_id":', 14); b.add_value(<object>it[13])
        b.add(b',"roles":', 9); b.add_value(<object>it[14])
        b.add(b',"route":', 9); b.add_value(<object>it[15])
        b.add(b',"rule":', 8); b.add_value(<object>it[16])
        b.add(b',"seq":', 7)
        _value_or_gap(b, gaps, 2, seq)
        b.add(b',"session":', 11); b.add_value(<object>it[17])
        b.add(b',"signals":', 11); b.add_value(<object>it[18])
        b.add(b',"status":', 10); b.add_value(<object>it[19])
        b.add(b',"subject":', 11); b.add_value(<object>it[20])
        b.add(b',"tenant":', 10); b.add_value(<object>it[21])
        b.add(b',"ts":', 6); (
            _add_timestamp_of(b, ts) if it[22] == NULL else _add_timestamp(b, <object>it[22])
        )
        b.add(b',"upstream":', 12); b.add_value(<object>it[23])
        b.add(b',"upstream_status":', 19); b.add_value(<object>it[24])
        return b.add(b"}", 1)

    def seal_many(self, bodies, chain):
        """``seal`` of each record body of ``bodies`` (``Bodies``, or a tuple
        or list of ``body``'s bytes) in turn, in one call: their lines,
        joined. All are checked first: if one is not a body, ``ValueError``
        (``TypeError`` if not bytes) before the chain moves."""
        cdef Bodies run = None
        cdef PyObject **items = NULL
        cdef Py_ssize_t count, k, head, n, size, pos = 0
        cdef const char *p
        cdef Py_ssize_t gaps[3]
        if type(bodies) is Bodies:
            run = <Bodies>bodies
            count = run.size
            pos = run.start
            for k in range(count):
                n = _entry_size(run.data, pos, run.end)
                _check_entry(run.data + pos, n, gaps)
                pos += n
            pos = run.start
        elif type(bodies) is tuple or type(bodies) is list:
            count = len(bodies)
            items = PySequence_Fast_ITEMS(bodies)
            for k in range(count):
                if type(<object>items[k]) is not bytes:
                    raise TypeError(
                        f"a record body is bytes, not {type(<object>items[k]).__name__}"
                    )
                _check_body(<bytes>items[k], gaps)
        else:
            raise TypeError(
                f"record bodies come as Bodies, a tuple or a list, not {type(bodies).__name__}"
            )
        if count == 0:
            return b""
        cdef _Buffer b = self.buf
        cdef _Buffer out = self.lines
        cdef char digest[64]
        cdef char number[24]
        cdef const char *text
        cdef Py_ssize_t tn
        cdef unsigned long long seq = chain.seq  # OverflowError before the chain moves
        chain_id = chain.chain_id
        prev = chain.prev
        out.size = 0
        for k in range(count):
            if run is not None:
                n = _entry_size(run.data, pos, run.end)
                p = run.data + pos
                pos += n
            else:
                p = PyBytes_AS_STRING(<bytes>items[k])
                n = PyBytes_GET_SIZE(<bytes>items[k])
            _check_entry(p, n, gaps)
            text = p + 16
            tn = n - 16
            b.size = 0
            if k == 0:
                head = _add_prev(b, prev)
            else:  # the previous line's hash, still in hand
                b.add(digest, 64)
                head = 64
            b.add(text, gaps[0])
            b.add_value(chain_id)
            b.add(text + gaps[0], gaps[1] - gaps[0])
            if k == 0:
                b.add_value(prev)
            else:
                b.add(b'"', 1)
                b.add(digest, 64)
                b.add(b'"', 1)
            b.add(text + gaps[1], gaps[2] - gaps[1])
            seq += 1
            b.add(number, _digits(number, seq, False))
            b.add(text + gaps[2], tn - gaps[2])
            size = b.size - head + 75
            out.reserve(size)
            _seal_line(b, head, out.data + out.size)
            memcpy(digest, out.data + out.size + size - 67, 64)
            out.size += size
        chain.seq = seq
        chain.prev = PyUnicode_FromKindAndData(PyUnicode_1BYTE_KIND, digest, 64)
        return PyBytes_FromStringAndSize(out.data, out.size)


@cython.final
cdef class Bodies:
    """``gateway._records_py.Bodies``: a run of record bodies where a batch
    frame holds them, without a copy of each. The frame's buffer is held (so
    a bytearray cannot be resized while a run of it lives), and every step
    through it is bounded: a frame written to in place meanwhile is a
    ``ValueError``, never a read past its end."""

    cdef Py_buffer buf
    cdef bint held
    cdef const char *data
    cdef Py_ssize_t start  # where its first entry begins in the buffer
    cdef Py_ssize_t end  # where its last ends
    cdef Py_ssize_t size  # how many entries

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.buf)

    def __len__(self):
        return self.size

    def __iter__(self):
        cdef Py_ssize_t pos = self.start, n
        while pos < self.end:
            n = _entry_size(self.data, pos, self.end)
            yield PyBytes_FromStringAndSize(self.data + pos, n)
            pos += n

    def __getitem__(self, index):
        cdef Py_ssize_t first, last, step, pos
        if isinstance(index, slice):
            first, last, step = index.indices(self.size)
            if step != 1:
                raise ValueError("a run of record bodies is sliced in order")
            if first == 0 and last >= self.size:
                return self
            last = max(last, first)
            pos = self._at(self.start, first)
            return _bodies(self.buf.obj, pos, self._at(pos, last - first), last - first)
        i = _operator_index(index)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError("record body index out of range")
        pos = self._at(self.start, i)
        return PyBytes_FromStringAndSize(self.data + pos, _entry_size(self.data, pos, self.end))

    def __eq__(self, other):
        if type(other) is Bodies or type(other) is tuple:
            return tuple(self) == tuple(other)
        return NotImplemented

    def __repr__(self):
        return f"<Bodies: {self.size} record bodies>"

    cdef Py_ssize_t _at(self, Py_ssize_t pos, Py_ssize_t skip) except -1:
        """Where the entry ``skip`` entries after the one at ``pos`` begins."""
        cdef Py_ssize_t i
        for i in range(skip):
            pos += _entry_size(self.data, pos, self.end)
        return pos


cdef object _operator_index = operator.index


cdef inline Py_ssize_t _entry_size(const char *data, Py_ssize_t pos, Py_ssize_t end) except -1:
    """The size (with its length word) of the entry at ``pos``, within ``end``."""
    cdef Py_ssize_t n
    if end - pos < 4:
        raise ValueError("audit batch frame changed under its record bodies")
    n = (_get_u32(data + pos) & 0x7FFFFFFF) + 4
    if n > end - pos:
        raise ValueError("audit batch frame changed under its record bodies")
    return n


cdef Bodies _bodies(object owner, Py_ssize_t start, Py_ssize_t end, Py_ssize_t size):
    """The run of the ``size`` entries of ``owner``'s buffer from ``start`` to
    ``end``, as ``decode_batch`` (or a slice of a run) found them."""
    cdef Bodies run = Bodies.__new__(Bodies)
    PyObject_GetBuffer(owner, &run.buf, PyBUF_SIMPLE)
    run.held = True
    if end > run.buf.len:
        raise ValueError("audit batch frame changed under its record bodies")
    run.data = <const char *>run.buf.buf
    run.start = start
    run.end = end
    run.size = size
    return run


@cython.final
cdef class RecordBatch:
    """``gateway._records_py.RecordBatch``, natively: each finished request's
    record body written straight from its slots (``_gather.pxi``) into the
    batch frame, with no snapshot tuple, float or bytes object per record."""

    cdef RecordSealer sealer
    cdef _Buffer buf  # the frame: its 4-byte header, then the entries
    cdef readonly Py_ssize_t count

    def __init__(self, RecordSealer sealer not None):
        try:
            _gather_ready()
        except ImportError:  # a request class changed: every request goes to the twin
            pass
        self.sealer = sealer
        self.buf = _Buffer()
        self.buf.reserve(4)
        self.buf.size = 4
        self.count = 0

    def add(self, req, policy, now=None, finished=None):
        """The record body of the finished request ``req`` (as
        ``sealer.body(snapshot(req, policy, now=now, finished=finished))``)
        into the batch: the number of records in it. Raises as ``body``
        does, the batch as it was."""
        cdef PyObject *it[FACTS]
        cdef double latency = 0.0, ts = 0.0
        if _gather(req, policy, False, now, finished, it, &latency, &ts, True):
            return self.add_facts(_twin_snapshot(req, policy, now=now, finished=finished))
        try:
            self._write(it, latency, ts)
        finally:
            _release(it)
        self.count += 1
        return self.count

    def add_facts(self, facts):
        """``sealer.body(facts)`` into the batch: the number of records in it."""
        self._write(self.sealer._items(facts), 0.0, 0.0)
        self.count += 1
        return self.count

    def add_json(self, bytes data not None):
        """A JSON entry (facts or a record, for the writer process to decode)."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        if n > 0x7FFFFFFF:
            raise ValueError("audit batch entry too large")
        cdef _Buffer b = self.buf
        b.reserve(4 + n)
        _put_u32(b.data + b.size, <unsigned int>n | 0x80000000U)
        b.size += 4
        b.add(PyBytes_AS_STRING(data), n)
        self.count += 1
        return self.count

    def take(self):
        """The batch frame of what was added since the last ``take``, and a
        new, empty batch."""
        cdef _Buffer b = self.buf
        _put_u32(b.data, <unsigned int>(b.size - 4) | 0x80000000U)
        frame = PyBytes_FromStringAndSize(b.data, b.size)
        b.size = 4
        self.count = 0
        return frame

    cdef int _write(self, PyObject **it, double latency, double ts) except -1:
        return _add_body(self.sealer, self.buf, it, latency, ts)


cdef inline int _add_body(
    RecordSealer sealer, _Buffer b, PyObject **it, double latency, double ts
) except -1:
    """``RecordSealer.body``'s entry appended to ``b``: a 16-byte header (big-endian
    u32s: the length of what follows the first, then where chain, prev and
    seq go in the JSON after the header), then the JSON. On an error ``b`` is
    as it was."""
    cdef Py_ssize_t start = b.size, base = start + 16
    cdef Py_ssize_t gaps[3]
    cdef char *out
    b.reserve(16)
    b.size = base
    try:
        sealer._add_fields(b, it, None, None, None, gaps, latency, ts)
    except BaseException:
        b.size = start
        raise
    out = b.data + start
    _put_u32(out, <unsigned int>(b.size - start - 4))
    _put_u32(out + 4, <unsigned int>(gaps[0] - base))
    _put_u32(out + 8, <unsigned int>(gaps[1] - base))
    _put_u32(out + 12, <unsigned int>(gaps[2] - base))
    return 0


def decode_batch(payload):
    """``gateway._records_py.decode_batch``: the entries of a batch frame
    (bytes, or a buffer such as the bytearray it was read into), each run of
    bodies as ``Bodies`` over ``payload`` itself."""
    cdef Py_buffer view
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    cdef Py_ssize_t n = view.len, pos = 0, stop, word, run_start = -1, run_size = 0
    cdef const char *p = <const char *>view.buf
    cdef list items = []
    try:
        while pos < n:
            if pos + 4 > n:
                raise ValueError("audit batch frame cut short")
            word = _get_u32(p + pos)
            stop = pos + 4 + (word & 0x7FFFFFFF)
            if stop > n:
                raise ValueError("audit batch frame cut short")
            if word & 0x80000000:
                if run_size:
                    items.append(_bodies(payload, run_start, pos, run_size))
                    run_size = 0
                items.append(_orjson_loads(PyBytes_FromStringAndSize(p + pos + 4, stop - pos - 4)))
            else:
                if not run_size:
                    run_start = pos
                run_size += 1
            pos = stop
        if run_size:
            items.append(_bodies(payload, run_start, pos, run_size))
    finally:
        PyBuffer_Release(&view)
    return items


cdef inline void _put_u32(char *out, unsigned int v) noexcept:
    out[0] = <char>((v >> 24) & 255)
    out[1] = <char>((v >> 16) & 255)
    out[2] = <char>((v >> 8) & 255)
    out[3] = <char>(v & 255)


cdef inline Py_ssize_t _get_u32(const char *p) noexcept:
    cdef const unsigned char *u = <const unsigned char *>p
    return (<Py_ssize_t>u[0] << 24) | (<Py_ssize_t>u[1] << 16) | (<Py_ssize_t>u[2] << 8) | u[3]


cdef Py_ssize_t _add_prev(_Buffer b, object prev) except -1:
    """``prev`` as the hash's prefix (ASCII, '?' for anything else): its length."""
    cdef const char *p
    cdef Py_ssize_t head
    if type(prev) is str and PyUnicode_IS_ASCII(prev):
        p = PyUnicode_AsUTF8AndSize(prev, &head)
        b.add(p, head)
        return head
    prev_ascii = prev.encode("ascii", "replace")
    b.add_bytes(prev_ascii)
    return PyBytes_GET_SIZE(prev_ascii)


cdef int _check_body(bytes entry, Py_ssize_t *gaps) except -1:
    """Whether ``entry`` is what ``body`` writes: its gaps into ``gaps``."""
    return _check_entry(PyBytes_AS_STRING(entry), PyBytes_GET_SIZE(entry), gaps)


cdef int _check_entry(const char *p, Py_ssize_t n, Py_ssize_t *gaps) except -1:
    """``_check_body`` of the ``n`` bytes at ``p``."""
    cdef Py_ssize_t tn = n - 16
    if n < 17:
        raise ValueError("not an audit record body")
    gaps[0] = _get_u32(p + 4)
    gaps[1] = _get_u32(p + 8)
    gaps[2] = _get_u32(p + 12)
    if (
        _get_u32(p) != n - 4
        or not (gaps[0] <= gaps[1] <= gaps[2] <= tn)
        or p[n - 1] != b"}"
    ):
        raise ValueError("not an audit record body")
    return 0


cdef void _seal_line(_Buffer b, Py_ssize_t head, char *out) noexcept:
    """Hash ``b`` (prev, then the body) and write the line into ``out``
    (``b.size - head + 75`` bytes): the body without its closing brace, then
    ,"hash":"<digest>"}, then a newline."""
    cdef unsigned char md[32]
    cdef SHA256_CTX ctx
    cdef unsigned char c
    cdef Py_ssize_t i
    # SHA-256 straight from OpenSSL's low-level API (the block function hashlib's
    # EVP path ends in, no per-call algorithm fetch),
    # without hashlib's objects, the copy of the buffer and hexdigest's str.
    SHA256_Init(&ctx)
    SHA256_Update(&ctx, b.data, b.size)
    SHA256_Final(md, &ctx)
    cdef Py_ssize_t body = b.size - head - 1
    memcpy(out, b.data + head, body)
    memcpy(out + body, b',"hash":"', 9)
    for i in range(32):
        c = md[i]
        out[body + 9 + 2 * i] = _HEX[c >> 4]
        out[body + 10 + 2 * i] = _HEX[c & 15]
    memcpy(out + body + 73, b'"}\n', 3)


cdef bytes _finish(_Buffer b, Py_ssize_t head, object chain, object seq):
    """Hash ``b``, make the line and move the chain's head."""
    cdef Py_ssize_t size = b.size - head + 75
    cdef bytes line = PyBytes_FromStringAndSize(NULL, size)
    cdef char *out = PyBytes_AS_STRING(line)
    _seal_line(b, head, out)
    digest = PyUnicode_FromKindAndData(PyUnicode_1BYTE_KIND, out + size - 67, 64)
    chain.seq = seq
    chain.prev = digest
    return line
