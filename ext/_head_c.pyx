# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The response head, native implementation (``gateway._head_c``).

Behaviour is identical to ``gateway/_head_py.py``, which is uvicorn's own
loop: the same bytes, the same refusals in the same order, the same framing
state. The two validation patterns become two 256-entry tables built from
the twin's regular expressions themselves, a byte at a time, so the sets
cannot drift apart; the head is sized, then written once. The rare headers
that change the framing (Content-Length, Transfer-Encoding, Connection) run
the twin's very expressions, and anything but a list or tuple of
``(bytes, bytes)`` tuples is handed to the twin whole.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_AsTuple
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

from gateway._head_py import HEADER_RE, HEADER_VALUE_RE
from gateway._head_py import response_head as _pure_head

__all__ = ["response_head"]

cdef uint64_t ONES = 0x0101010101010101
cdef uint64_t HIGHS = 0x8080808080808080

cdef unsigned char BAD_NAME[256]
cdef unsigned char BAD_VALUE[256]
cdef unsigned char LOWER[256]
cdef int _b
for _b in range(256):
    BAD_NAME[_b] = HEADER_RE.search(bytes([_b])) is not None
    BAD_VALUE[_b] = HEADER_VALUE_RE.search(bytes([_b])) is not None
    LOWER[_b] = _b + 32 if 65 <= _b <= 90 else _b  # bytes.lower(): ASCII only

cdef enum Special:
    OTHER = 0
    CONTENT_LENGTH = 1
    TRANSFER_ENCODING = 2
    CONNECTION = 3


cdef inline bint _valid(const unsigned char *p, Py_ssize_t n, const unsigned char *bad) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        if bad[p[i]]:
            return False
    return True


cdef inline bint _valid_value(const unsigned char *p, Py_ssize_t n) noexcept:
    """``_valid(p, n, BAD_VALUE)``, eight bytes at a time: a word with no byte
    below 0x20 and none equal to 0x7f is clean (most are); any other word, a
    tab say, is looked at a byte at a time."""
    cdef Py_ssize_t i = 0
    cdef uint64_t w
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        # Bytes below 0x20 (the classic has-less-than test, exact for n <= 0x80),
        # then bytes equal to 0x7f (a zero byte in w ^ 0x7f7f...).
        if ((w - ONES * 0x20) & ~w & HIGHS) or (((w ^ (ONES * 0x7f)) - ONES) & ~(w ^ (ONES * 0x7f)) & HIGHS):
            if not _valid(p + i, 8, BAD_VALUE):
                return False
        i += 8
    return _valid(p + i, n - i, BAD_VALUE)


cdef inline bint _is(const unsigned char *p, Py_ssize_t n, const char *lower, Py_ssize_t size) noexcept:
    """``p[:n].lower() == lower``."""
    cdef Py_ssize_t i
    if n != size:
        return False
    for i in range(n):
        if LOWER[p[i]] != <unsigned char>lower[i]:
            return False
    return True


cdef inline Special _special(const unsigned char *p, Py_ssize_t n) noexcept:
    if n == 14 and _is(p, n, b"content-length", 14):
        return CONTENT_LENGTH
    if n == 17 and _is(p, n, b"transfer-encoding", 17):
        return TRANSFER_ENCODING
    if n == 10 and _is(p, n, b"connection", 10):
        return CONNECTION
    return OTHER


cdef bint _plain(tuple headers):
    """Every item a 2-tuple of exact bytes: the shape the fast path handles."""
    for item in headers:
        if type(item) is not tuple or len(<tuple>item) != 2:
            return False
        if type((<tuple>item)[0]) is not bytes or type((<tuple>item)[1]) is not bytes:
            return False
    return True


def response_head(status_line, status, headers, head_request,
                  chunked_encoding, expected_content_length, keep_alive):
    """``gateway._head_py.response_head``, natively."""
    # The head is sized in one pass and written in another, with Python code
    # (int(), bytes methods) in between: work on a tuple of our own, which
    # holds its items, not on a list anyone could change meanwhile.
    cdef tuple pairs = None
    if type(headers) is list:
        pairs = PyList_AsTuple(headers)
    elif type(headers) is tuple:
        pairs = headers
    if (
        pairs is None
        or type(status_line) is not bytes
        or type(status) is not int
        or type(keep_alive) is not bool
        or type(head_request) is not bool
        or not _plain(pairs)
    ):
        # Anything unusual is the twin's: no argument can run Python code below.
        return _pure_head(status_line, status, headers, head_request, chunked_encoding,
                          expected_content_length, keep_alive)
    cdef bint no_body_status = status == 204 or status == 304  # an exact int: no Python code
    cdef bint head_only = head_request is True
    cdef Py_ssize_t i, n = len(pairs)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(status_line) + 2
    cdef bint has_connection_close = False
    cdef tuple pair
    cdef bytes name, value
    cdef const unsigned char *p
    cdef Py_ssize_t length
    cdef Special kind
    for i in range(n):
        pair = <tuple>pairs[i]
        name = <bytes>pair[0]
        value = <bytes>pair[1]
        p = <const unsigned char *>PyBytes_AS_STRING(name)
        length = PyBytes_GET_SIZE(name)
        if not _valid(p, length, BAD_NAME):
            raise RuntimeError("Invalid HTTP header name.")
        if not _valid_value(<const unsigned char *>PyBytes_AS_STRING(value),
                            PyBytes_GET_SIZE(value)):
            raise RuntimeError("Invalid HTTP header value.")
        kind = _special(p, length)
        if kind == CONTENT_LENGTH:
            if chunked_encoding is None:
                expected_content_length = int(value.decode())
                chunked_encoding = False
        elif kind == TRANSFER_ENCODING:
            if value.lower() == b"chunked":
                expected_content_length = 0
                chunked_encoding = True
        elif kind == CONNECTION:
            connection = [token.lower().strip() for token in value.split(b",")]
            if b"close" in connection:
                keep_alive = False
                has_connection_close = True
        size += length + PyBytes_GET_SIZE(value) + 4

    cdef bint add_close = keep_alive is False and not has_connection_close
    if add_close:
        size += 19  # connection: close\r\n
    cdef bint add_chunked = chunked_encoding is None and not head_only and not no_body_status
    if add_chunked:
        chunked_encoding = True
        size += 28  # transfer-encoding: chunked\r\n

    cdef bytes head = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char *out = <unsigned char *>PyBytes_AS_STRING(head)
    cdef Py_ssize_t j
    length = PyBytes_GET_SIZE(status_line)
    memcpy(out, PyBytes_AS_STRING(status_line), length)
    out += length
    for i in range(n):
        pair = <tuple>pairs[i]
        name = <bytes>pair[0]
        value = <bytes>pair[1]
        p = <const unsigned char *>PyBytes_AS_STRING(name)
        length = PyBytes_GET_SIZE(name)
        for j in range(length):
            out[j] = LOWER[p[j]]
        out += length
        out[0] = 58  # ':'
        out[1] = 32  # ' '
        out += 2
        length = PyBytes_GET_SIZE(value)
        memcpy(out, PyBytes_AS_STRING(value), length)
        out += length
        out[0] = 13
        out[1] = 10
        out += 2
    if add_close:
        memcpy(out, b"connection: close\r\n", 19)
        out += 19
    if add_chunked:
        memcpy(out, b"transfer-encoding: chunked\r\n", 28)
        out += 28
    out[0] = 13
    out[1] = 10
    assert out + 2 == <unsigned char *>PyBytes_AS_STRING(head) + size
    return head, chunked_encoding, expected_content_length, keep_alive
