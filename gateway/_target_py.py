"""Canonical request target, pure-Python implementation.

``canonical_target(raw_path, query)`` takes the RAW request target of an ASGI
request (``scope["raw_path"]`` and ``scope["query_string"]``), refuses anything
malformed or ambiguous with :class:`BadTarget`, and returns the decision the
gateway routes, authorizes and forwards on:

``(path, forward_path, forward_query)``

* ``path`` -- the decoded path (``str``) used for routing and authorization;
* ``forward_path`` -- the bytes sent upstream: ``path`` re-encoded in one
  normal form, so the upstream decodes it to exactly ``path``;
* ``forward_query`` -- the validated query, forwarded verbatim.

``gateway._target_c`` (built from ``ext/_target_c.pyx``) behaves identically:
same results, same exception class, same ``detail`` strings, same order of
checks.  The order is part of the contract:

1. length of ``raw_path`` + ``query`` (at most ``MAX_TARGET`` bytes);
2. absolute-form (``http://`` / ``https://``, any case): authority dropped;
3. the path starts with ``/``;
4. one left-to-right scan of the raw path bytes and percent escapes;
5. the decoded bytes are strict UTF-8;
6. the decoded code points (C1 controls, NFKC look-alikes of delimiters);
7. the segments (empty segments, ``.`` / ``..``), left to right;
8. one left-to-right scan of the query;
9. length of ``forward_path`` + ``query`` (at most ``MAX_TARGET`` bytes).
"""

from __future__ import annotations

import re

from gateway._target_errors import BadTarget

__all__ = ["AMBIGUOUS_CODEPOINTS", "MAX_TARGET", "BadTarget", "canonical_target"]

MAX_TARGET = 8192

# Bytes that stand for themselves in ``forward_path``: ALPHA DIGIT "-._~", "/",
# the sub-delims "!$&'()*+,=" (";" is refused) and ":@".  Everything else is
# percent-encoded with uppercase hex.
_UNENCODED = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/!$&'()*+,=:@"
_UNENCODED_SET = frozenset(_UNENCODED)
# Allowed raw in the path ("%" aside): the above, and "[" "]" (forwarded as %5B / %5D).
_RAW_PATH_OK = _UNENCODED + b"[]"
_RAW_PATH_OK_SET = frozenset(_RAW_PATH_OK)
_HEX = frozenset(b"0123456789abcdefABCDEF")
# The two bytes after a "%" -> the decoded byte (either hex case).
_ESCAPES: dict[bytes, int] = {
    bytes((hi, lo)): int(bytes((hi, lo)), 16) for hi in _HEX for lo in _HEX
}

# Raw path bytes that are refused, with their reason.
_RAW_PATH_ERRORS: dict[int, str] = {}
for _b in range(256):
    if _b < 0x20 or _b == 0x7F:
        _RAW_PATH_ERRORS[_b] = "control character in path"
    elif _b >= 0x80:
        _RAW_PATH_ERRORS[_b] = "non-ASCII byte in path"
for _b in b'"<>`{}|^':
    _RAW_PATH_ERRORS[_b] = "disallowed character in path"
_RAW_PATH_ERRORS[0x20] = "space in path"
_RAW_PATH_ERRORS[ord("#")] = "fragment in path"
_RAW_PATH_ERRORS[ord("\\")] = "backslash in path"
_RAW_PATH_ERRORS[ord(";")] = "semicolon in path"
_RAW_PATH_ERRORS[ord("?")] = "question mark in path"

# Percent escapes that are refused, by decoded byte.
_DECODED_ERRORS: dict[int, str] = {_b: "encoded control character in path" for _b in range(0x20)}
_DECODED_ERRORS[0x7F] = "encoded control character in path"
_DECODED_ERRORS[ord("/")] = "encoded slash in path"
_DECODED_ERRORS[ord("\\")] = "encoded backslash in path"
_DECODED_ERRORS[ord("%")] = "double percent encoding in path"
_DECODED_ERRORS[ord(";")] = "encoded semicolon in path"
_DECODED_ERRORS[ord("#")] = "encoded fragment marker in path"
_DECODED_ERRORS[ord("?")] = "encoded question mark in path"
del _b

# Non-ASCII code points whose NFKC compatibility form contains one of
# / \ . ; # ? %  (Unicode 14, as in Python 3.11's unicodedata).  An upstream
# that normalizes would see a new delimiter or a dot segment, so they are
# refused.  tests/test_target.py re-derives this list from unicodedata.
AMBIGUOUS_CODEPOINTS: frozenset[int] = frozenset(
    (
        0x037E,
        0x2024,
        0x2025,
        0x2026,
        0x2047,
        0x2048,
        0x2049,
        0x2100,
        0x2101,
        0x2105,
        0x2106,
        *range(0x2488, 0x249C),
        0x33C2,
        0x33C7,
        0x33D8,
        0xFE14,
        0xFE16,
        0xFE19,
        0xFE30,
        0xFE52,
        0xFE54,
        0xFE56,
        0xFE5F,
        0xFE68,
        0xFE6A,
        0xFF03,
        0xFF05,
        0xFF0E,
        0xFF0F,
        0xFF1B,
        0xFF1F,
        0xFF3C,
        0x1F100,
    )
)

# The first refused non-ASCII code point: a C1 control or an ambiguous one.
_BAD_UNICODE = re.compile(
    "[\x80-\x9f" + "".join(sorted(chr(cp) for cp in AMBIGUOUS_CODEPOINTS)) + "]"
)

# forward_path encoding of each decoded byte.
_FORWARD: tuple[bytes, ...] = tuple(
    bytes((_i,)) if _i in _UNENCODED_SET else b"%%%02X" % _i for _i in range(256)
)

_NEEDS_ENCODING = re.compile(rb"[^A-Za-z0-9\-._~/!$&'()*+,=:@]")

# Query: printable ASCII except "#", percent escapes well formed.
_QUERY_ALLOWED = bytes(b for b in range(0x21, 0x7F) if b != 0x23)
_QUERY_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def canonical_target(raw_path: bytes, query: bytes) -> tuple[str, bytes, bytes]:
    """Return ``(path, forward_path, forward_query)`` or raise :class:`BadTarget`."""
    # Exactly bytes, as the native module's typed arguments demand (no subclasses).
    if type(raw_path) is not bytes:
        raise TypeError("raw_path must be bytes")
    if type(query) is not bytes:
        raise TypeError("query must be bytes")
    if len(raw_path) + len(query) > MAX_TARGET:
        raise BadTarget("request target too long")

    raw = raw_path if raw_path[:1] == b"/" else _strip_absolute_form(raw_path)
    if not raw:
        raise BadTarget("empty path")
    if raw[0] != 0x2F:
        raise BadTarget("path must start with /")

    if not raw.translate(None, _UNENCODED):
        # Fast path: only bytes that are their own normal form (no "%").
        path = raw.decode("ascii")
        if "//" in path or "/." in path:
            _check_segments(path)
        forward = raw
    else:
        path, forward = _decode_path(raw)

    _check_query(query)
    if len(forward) + len(query) > MAX_TARGET:
        raise BadTarget("request target too long")
    return path, forward, query


def _strip_absolute_form(raw: bytes) -> bytes:
    head = raw[:8].lower()
    if head.startswith(b"http://"):
        start = 7
    elif head.startswith(b"https://"):
        start = 8
    else:
        return raw
    end = raw.find(b"/", start)
    authority = raw[start:] if end < 0 else raw[start:end]
    if not authority:
        raise BadTarget("empty authority in absolute-form target")
    for b in authority:
        if b < 0x21 or b > 0x7E or b in b"#?\\":
            raise BadTarget("invalid authority in absolute-form target")
    return b"/" if end < 0 else raw[end:]


def _decode_path(raw: bytes) -> tuple[str, bytes]:
    # Left to right: the raw run before each "%", then the escape, and so on.
    decoded = bytearray()
    for index, chunk in enumerate(raw.split(b"%")):
        if index:
            v = _ESCAPES.get(chunk[:2])
            if v is None:
                raise BadTarget("malformed percent escape in path")
            detail = _DECODED_ERRORS.get(v)
            if detail is not None:
                raise BadTarget(detail)
            decoded.append(v)
            chunk = chunk[2:]
        if chunk.translate(None, _RAW_PATH_OK):
            for b in chunk:
                if b not in _RAW_PATH_OK_SET:
                    raise BadTarget(_RAW_PATH_ERRORS[b])
        decoded += chunk

    try:
        path = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadTarget("invalid UTF-8 in path") from None
    if not path.isascii():
        bad = _BAD_UNICODE.search(path)
        if bad is not None:
            if ord(bad[0]) <= 0x9F:
                raise BadTarget("encoded control character in path")
            raise BadTarget("ambiguous unicode character in path")
    if "//" in path or "/." in path:
        _check_segments(path)
    if decoded.translate(None, _UNENCODED):
        return path, _NEEDS_ENCODING.sub(_encode_match, decoded)
    return path, bytes(decoded)


def _encode_match(match: re.Match[bytes]) -> bytes:
    return _FORWARD[match[0][0]]


def _check_segments(path: str) -> None:
    segments = path.split("/")
    last = len(segments) - 1
    for index in range(1, last + 1):
        segment = segments[index]
        if not segment:
            if index != last:
                raise BadTarget("empty path segment")
        elif segment == "." or segment == "..":
            raise BadTarget("dot segment in path")


def _check_query(query: bytes) -> None:
    if not query.translate(None, _QUERY_ALLOWED) and (
        b"%" not in query or _QUERY_BAD_ESCAPE.search(query) is None
    ):
        return
    n = len(query)
    i = 0
    while i < n:
        b = query[i]
        if b == 0x25:
            if i + 2 >= n or query[i + 1] not in _HEX or query[i + 2] not in _HEX:
                raise BadTarget("malformed percent escape in query")
            i += 3
        elif 0x21 <= b <= 0x7E and b != 0x23:
            i += 1
        elif b == 0x23:
            raise BadTarget("fragment in query")
        elif b == 0x20:
            raise BadTarget("space in query")
        elif b >= 0x80:
            raise BadTarget("non-ASCII byte in query")
        else:
            raise BadTarget("control character in query")
    raise AssertionError("unreachable: the fast check and the scan disagree")  # pragma: no cover
