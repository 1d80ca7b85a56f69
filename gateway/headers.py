"""Header hygiene, in one place: what a client may not send upstream, what
an upstream may not send back, and the headers the gateway owns.

Names are compared in a normal form (lower case, ``_`` and ``.`` read as
``-``) because many backends and frameworks fold those spellings together:
``X_Fairgate_Subject`` must not slip past a filter for ``x-fairgate-subject``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

Header = tuple[bytes, bytes]

# RFC 9110 7.6.1 connection-specific headers, plus framing the transport owns.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"host",
        b"content-length",
    }
)

# Headers the gateway owns: a client-sent copy is always dropped, because the
# upstream trusts them (identity) or acts on them (rewrites, overrides).
OWNED = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"x-original-url",
        b"x-rewrite-url",
        b"x-original-uri",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-original-method",
        b"true-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"client-ip",
        b"x-request-id",
    }
)
OWNED_PREFIXES = (b"x-fairgate-", b"x-forwarded-")

# Response headers from an upstream that only the gateway may set.
RESPONSE_STRIP = HOP_BY_HOP - {b"content-length"}

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{8,128}$")


def normal_name(name: bytes) -> bytes:
    name = name.lower()
    if b"_" in name or b"." in name:
        name = name.replace(b"_", b"-").replace(b".", b"-")
    return name


def is_owned(name: bytes) -> bool:
    return name in OWNED or name.startswith(OWNED_PREFIXES)


def connection_tokens(headers: Iterable[Header]) -> set[bytes]:
    """Header names listed in ``Connection`` (they are hop-by-hop too)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(normal_name(t.strip()) for t in value.split(b",") if t.strip())
    return tokens


# name -> (normal name, always dropped): header names repeat from request to
# request, so each is judged once. Bounded: hostile clients invent names.
_judged: dict[bytes, tuple[bytes, bool]] = {}


def _judge(name: bytes) -> tuple[bytes, bool]:
    found = _judged.get(name)
    if found is None:
        norm = normal_name(name)
        found = (norm, norm in HOP_BY_HOP or is_owned(norm))
        if len(_judged) < 4096:
            _judged[name] = found
    return found


def upstream_request_headers(
    headers: Sequence[Header], *, forward_authorization: bool, request_id_header: bytes
) -> list[Header]:
    """The client's headers minus hop-by-hop, Connection-named and owned ones.

    Callers append the gateway's own headers *after* this, so naming them in
    ``Connection`` cannot remove them.
    """
    dropped = connection_tokens(headers)
    out = []
    for name, value in headers:
        norm, always = _judge(name)
        if always or norm == request_id_header or (dropped and norm in dropped):
            continue
        if norm == b"authorization" and not forward_authorization:
            continue
        out.append((name, value))
    return out


def downstream_response_headers(headers: Sequence[Header]) -> list[Header]:
    """The upstream's response headers minus hop-by-hop and Connection-named ones."""
    dropped = connection_tokens(headers)
    if not dropped:
        return [h for h in headers if h[0] not in RESPONSE_STRIP]
    return [h for h in headers if h[0] not in RESPONSE_STRIP and normal_name(h[0]) not in dropped]


def valid_request_id(value: bytes) -> bool:
    return _REQUEST_ID.match(value) is not None


@lru_cache(maxsize=4096)
def forwarded_value(client_ip: str, proto: str, host: bytes | None) -> bytes:
    """An RFC 7239 ``Forwarded`` element for one hop."""
    node = f'"[{client_ip}]"' if ":" in client_ip else client_ip
    value = f"for={node};proto={proto}"
    if host and all(0x21 <= c < 0x7F and c not in b'";,' for c in host):
        value += f";host={host.decode('ascii')}"
    return value.encode("latin-1")
