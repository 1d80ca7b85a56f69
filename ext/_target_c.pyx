# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True, infer_types=True
"""Canonical request target, native implementation (built as ``gateway._target_c``).

Behaviour is identical to ``gateway/_target_py.py`` -- same results, same
exception class (``gateway._target_errors.BadTarget``), same ``detail``
strings and the same order of checks -- see that module for the rules.  This
one scans the raw bytes with C loops over lookup tables, decodes into a stack
buffer and writes ``forward_path`` straight into a preallocated ``bytes``.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.string cimport memcpy

from gateway._target_errors import BadTarget

__all__ = ["AMBIGUOUS_CODEPOINTS", "MAX_TARGET", "BadTarget", "canonical_target"]

cdef enum:
    C_MAX_TARGET = 8192

MAX_TARGET = C_MAX_TARGET

# Error codes; _DETAILS[code] is the BadTarget detail.  0 means "no error".
cdef enum:
    E_OK = 0
    E_TOO_LONG
    E_EMPTY_AUTHORITY
    E_BAD_AUTHORITY
    E_EMPTY_PATH
    E_NO_SLASH
    E_BAD_ESCAPE
    E_ENC_SLASH
    E_ENC_BACKSLASH
    E_ENC_PERCENT
    E_ENC_SEMICOLON
    E_ENC_FRAGMENT
    E_ENC_QMARK
    E_ENC_CONTROL
    E_FRAGMENT
    E_BACKSLASH
    E_SEMICOLON
    E_QMARK
    E_SPACE
    E_CONTROL
    E_NON_ASCII
    E_DISALLOWED
    E_BAD_UTF8
    E_AMBIGUOUS
    E_EMPTY_SEGMENT
    E_DOT_SEGMENT
    E_Q_BAD_ESCAPE
    E_Q_FRAGMENT
    E_Q_SPACE
    E_Q_CONTROL
    E_Q_NON_ASCII

_DETAILS = (
    "",
    "request target too long",
    "empty authority in absolute-form target",
    "invalid authority in absolute-form target",
    "empty path",
    "path must start with /",
    "malformed percent escape in path",
    "encoded slash in path",
    "encoded backslash in path",
    "double percent encoding in path",
    "encoded semicolon in path",
    "encoded fragment marker in path",
    "encoded question mark in path",
    "encoded control character in path",
    "fragment in path",
    "backslash in path",
    "semicolon in path",
    "question mark in path",
    "space in path",
    "control character in path",
    "non-ASCII byte in path",
    "disallowed character in path",
    "invalid UTF-8 in path",
    "ambiguous unicode character in path",
    "empty path segment",
    "dot segment in path",
    "malformed percent escape in query",
    "fragment in query",
    "space in query",
    "control character in query",
    "non-ASCII byte in query",
)

# Raw path byte classes (values >= C_ERR_BASE are error codes).
cdef enum:
    K_SAFE = 0      # its own normal form in forward_path
    K_PCT = 1       # "%"
    K_ENCODE = 2    # allowed raw, percent-encoded in forward_path ("[", "]")

cdef unsigned char PATH_CLASS[256]   # K_* or an E_* code (E_* codes are all > 2)
cdef unsigned char DECODED_ERR[256]  # E_* code for a refused percent escape, else 0
cdef unsigned char FORWARD_SAFE[256] # 1 if the decoded byte is forwarded as is
cdef unsigned char QUERY_CLASS[256]  # 0 plain, 1 "%", else an E_Q_* code
cdef unsigned char HEXVAL[256]       # 0..15, or 0xFF for a non-hex byte
cdef const char *HEXDIGITS = b"0123456789ABCDEF"

# See AMBIGUOUS_CODEPOINTS in gateway/_target_py.py (NFKC forms holding / \ . ; # ? %).
cdef Py_UCS4 AMBIGUOUS[52]
_AMBIGUOUS_LIST = (
    0x037E, 0x2024, 0x2025, 0x2026, 0x2047, 0x2048, 0x2049,
    0x2100, 0x2101, 0x2105, 0x2106,
    0x2488, 0x2489, 0x248A, 0x248B, 0x248C, 0x248D, 0x248E, 0x248F,
    0x2490, 0x2491, 0x2492, 0x2493, 0x2494, 0x2495, 0x2496, 0x2497,
    0x2498, 0x2499, 0x249A, 0x249B,
    0x33C2, 0x33C7, 0x33D8,
    0xFE14, 0xFE16, 0xFE19, 0xFE30, 0xFE52, 0xFE54, 0xFE56, 0xFE5F, 0xFE68, 0xFE6A,
    0xFF03, 0xFF05, 0xFF0E, 0xFF0F, 0xFF1B, 0xFF1F, 0xFF3C,
    0x1F100,
)
AMBIGUOUS_CODEPOINTS = frozenset(_AMBIGUOUS_LIST)


cdef void _init_tables():
    cdef int b
    cdef bytes unencoded = (
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/!$&'()*+,=:@"
    )
    for b in range(256):
        FORWARD_SAFE[b] = 0
        HEXVAL[b] = 0xFF
        DECODED_ERR[b] = E_OK
        if b < 0x20 or b == 0x7F:
            PATH_CLASS[b] = E_CONTROL
            QUERY_CLASS[b] = E_Q_CONTROL
            DECODED_ERR[b] = E_ENC_CONTROL
        elif b >= 0x80:
            PATH_CLASS[b] = E_NON_ASCII
            QUERY_CLASS[b] = E_Q_NON_ASCII
        else:
            PATH_CLASS[b] = E_DISALLOWED
            QUERY_CLASS[b] = 0
    for b in unencoded:
        FORWARD_SAFE[b] = 1
        PATH_CLASS[b] = K_SAFE
    for b in b"0123456789":
        HEXVAL[b] = b - 48
    for b in b"abcdef":
        HEXVAL[b] = b - 87
    for b in b"ABCDEF":
        HEXVAL[b] = b - 55
    PATH_CLASS[ord("%")] = K_PCT
    PATH_CLASS[ord("[")] = K_ENCODE
    PATH_CLASS[ord("]")] = K_ENCODE
    PATH_CLASS[0x20] = E_SPACE
    PATH_CLASS[ord("#")] = E_FRAGMENT
    PATH_CLASS[ord("\\")] = E_BACKSLASH
    PATH_CLASS[ord(";")] = E_SEMICOLON
    PATH_CLASS[ord("?")] = E_QMARK
    DECODED_ERR[ord("/")] = E_ENC_SLASH
    DECODED_ERR[ord("\\")] = E_ENC_BACKSLASH
    DECODED_ERR[ord("%")] = E_ENC_PERCENT
    DECODED_ERR[ord(";")] = E_ENC_SEMICOLON
    DECODED_ERR[ord("#")] = E_ENC_FRAGMENT
    DECODED_ERR[ord("?")] = E_ENC_QMARK
    QUERY_CLASS[0x20] = E_Q_SPACE
    QUERY_CLASS[ord("#")] = E_Q_FRAGMENT
    QUERY_CLASS[ord("%")] = 1
    cdef int i = 0
    for cp in _AMBIGUOUS_LIST:
        AMBIGUOUS[i] = cp
        i += 1


_init_tables()


cdef inline bint _lower_eq(const unsigned char *p, const char *lit, Py_ssize_t n) noexcept nogil:
    """p[:n] equals the lowercase ASCII literal ``lit``, ignoring ASCII case."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if 0x41 <= c <= 0x5A:
            c += 0x20
        if c != <unsigned char>lit[i]:
            return False
    return True


cdef inline int _check_segments(const unsigned char *s, Py_ssize_t n) noexcept nogil:
    """Segments of the decoded path s[:n] (s[0] == "/"): E_OK or the first error."""
    cdef Py_ssize_t start = 1, j, seg
    for j in range(1, n + 1):
        if j == n or s[j] == 0x2F:
            seg = j - start
            if seg == 0:
                if j != n:
                    return E_EMPTY_SEGMENT
            elif s[start] == 0x2E and (seg == 1 or (seg == 2 and s[start + 1] == 0x2E)):
                return E_DOT_SEGMENT
            start = j + 1
    return E_OK


cdef inline int _check_query(const unsigned char *q, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef unsigned char k
    while i < n:
        k = QUERY_CLASS[q[i]]
        if k == 0:
            i += 1
        elif k == 1:
            if i + 2 >= n or HEXVAL[q[i + 1]] == 0xFF or HEXVAL[q[i + 2]] == 0xFF:
                return E_Q_BAD_ESCAPE
            i += 3
        else:
            return k
    return E_OK


cdef inline bint _is_ambiguous(Py_UCS4 cp) noexcept nogil:
    cdef int i
    for i in range(52):
        if AMBIGUOUS[i] == cp:
            return True
    return False


cdef int _check_codepoints(unicode path) except -1:
    cdef Py_UCS4 ch
    for ch in path:
        if 0x80 <= ch <= 0x9F:
            return E_ENC_CONTROL
        if ch >= 0x37E and _is_ambiguous(ch):
            return E_AMBIGUOUS
    return E_OK


cdef object _fail(int code):
    raise BadTarget(_DETAILS[code])


def canonical_target(bytes raw_path not None, bytes query not None):
    """Return ``(path, forward_path, forward_query)`` or raise ``BadTarget``."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw_path)
    cdef Py_ssize_t qn = PyBytes_GET_SIZE(query)
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(raw_path)
    cdef const unsigned char *q = <const unsigned char *>PyBytes_AS_STRING(query)
    cdef Py_ssize_t i, start, end, d, f
    cdef unsigned char c, k, v, h1, h2
    cdef int err
    cdef bint non_ascii = False
    cdef unsigned char dec[C_MAX_TARGET]
    cdef unsigned char fwd[3 * C_MAX_TARGET]
    cdef object forward
    cdef unicode path

    if n + qn > C_MAX_TARGET:
        return _fail(E_TOO_LONG)

    # Absolute-form: drop "scheme://authority".
    start = 0
    if n >= 7 and _lower_eq(p, b"http://", 7):
        start = 7
    elif n >= 8 and _lower_eq(p, b"https://", 8):
        start = 8
    if start:
        end = start
        while end < n and p[end] != 0x2F:
            end += 1
        if end == start:
            return _fail(E_EMPTY_AUTHORITY)
        for i in range(start, end):
            c = p[i]
            if c < 0x21 or c > 0x7E or c == 0x23 or c == 0x3F or c == 0x5C:
                return _fail(E_BAD_AUTHORITY)
        if end == n:
            raw_path = b"/"
            n = 1
            p = <const unsigned char *>PyBytes_AS_STRING(raw_path)
        else:
            raw_path = PyBytes_FromStringAndSize(<const char *>p + end, n - end)
            n -= end
            p = <const unsigned char *>PyBytes_AS_STRING(raw_path)

    if n == 0:
        return _fail(E_EMPTY_PATH)
    if p[0] != 0x2F:
        return _fail(E_NO_SLASH)

    # Fast scan: bytes that are their own normal form.
    i = 0
    while i < n and PATH_CLASS[p[i]] == K_SAFE:
        i += 1

    if i == n:
        err = _check_segments(p, n)
        if err:
            return _fail(err)
        err = _check_query(q, qn)
        if err:
            return _fail(err)
        return (PyUnicode_DecodeASCII(<const char *>p, n, NULL), raw_path, query)

    # General scan: decode percent escapes into dec[] and write the normal form
    # (forward_path) into fwd[] in the same pass.
    memcpy(dec, p, i)
    memcpy(fwd, p, i)
    d = i
    f = i
    while i < n:
        c = p[i]
        k = PATH_CLASS[c]
        if k == K_SAFE:
            dec[d] = c
            fwd[f] = c
            f += 1
            i += 1
        elif k == K_PCT:
            if i + 2 >= n:
                return _fail(E_BAD_ESCAPE)
            h1 = HEXVAL[p[i + 1]]
            h2 = HEXVAL[p[i + 2]]
            if h1 == 0xFF or h2 == 0xFF:
                return _fail(E_BAD_ESCAPE)
            v = (h1 << 4) | h2
            if DECODED_ERR[v]:
                return _fail(DECODED_ERR[v])
            if v >= 0x80:
                non_ascii = True
            dec[d] = v
            if FORWARD_SAFE[v]:
                fwd[f] = v
                f += 1
            else:
                fwd[f] = 0x25
                fwd[f + 1] = HEXDIGITS[h1]
                fwd[f + 2] = HEXDIGITS[h2]
                f += 3
            i += 3
        elif k == K_ENCODE:
            dec[d] = c
            fwd[f] = 0x25
            fwd[f + 1] = HEXDIGITS[c >> 4]
            fwd[f + 2] = HEXDIGITS[c & 15]
            f += 3
            i += 1
        else:
            return _fail(k)
        d += 1

    if non_ascii:
        try:
            path = PyUnicode_DecodeUTF8(<const char *>dec, d, NULL)
        except UnicodeDecodeError:
            return _fail(E_BAD_UTF8)
        err = _check_codepoints(path)
        if err:
            return _fail(err)
    else:
        path = PyUnicode_DecodeASCII(<const char *>dec, d, NULL)

    err = _check_segments(dec, d)
    if err:
        return _fail(err)
    err = _check_query(q, qn)
    if err:
        return _fail(err)

    if f + qn > C_MAX_TARGET:
        return _fail(E_TOO_LONG)
    forward = PyBytes_FromStringAndSize(<const char *>fwd, f)
    return (path, forward, query)
