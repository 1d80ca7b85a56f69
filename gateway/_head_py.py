"""The response head, pure-Python twin of ``gateway._head_c`` (ext/_head_c.pyx).

uvicorn's httptools protocol writes the status line and headers of every
response in a loop that runs two regular expressions over each header's
bytes (the validation that keeps a CR/LF from splitting a response). For a
proxied response with the gateway's own headers that loop is several µs per
request, more than the fair-usage step itself; ``gateway.serve`` therefore
writes the head with the native twin of this function instead. This module
is uvicorn's loop (0.54, ``RequestResponseCycle.send``), statement for
statement, so the twins, and uvicorn, agree on every byte, every refusal and
the framing they leave behind; ``tests/test_response_head.py`` holds all
three equal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["HEADER_RE", "HEADER_VALUE_RE", "Framing", "response_head"]

# uvicorn's own patterns (uvicorn/protocols/http/httptools_impl.py).
HEADER_RE = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
HEADER_VALUE_RE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")

# (head bytes, chunked_encoding, expected_content_length, keep_alive): the
# cycle's framing state after the head, as uvicorn's loop leaves it.
Framing = tuple[bytes, "bool | None", int, bool]


def response_head(
    status_line: bytes,
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    head_request: bool,
    chunked_encoding: bool | None,
    expected_content_length: int,
    keep_alive: bool,
) -> Framing:
    """The head of a response and the framing it sets.

    ``status_line`` is uvicorn's ``STATUS_LINE[status]``; ``head_request``
    whether the request's method is HEAD. Raises what uvicorn raises: a
    ``RuntimeError`` for an invalid header name or value, ``ValueError``
    for a Content-Length that is no integer.
    """
    content = [status_line]
    has_connection_close = False

    for name, value in headers:
        if HEADER_RE.search(name):
            raise RuntimeError("Invalid HTTP header name.")
        if HEADER_VALUE_RE.search(value):
            raise RuntimeError("Invalid HTTP header value.")

        name = name.lower()
        if name == b"content-length" and chunked_encoding is None:
            expected_content_length = int(value.decode())
            chunked_encoding = False
        elif name == b"transfer-encoding" and value.lower() == b"chunked":
            expected_content_length = 0
            chunked_encoding = True
        elif name == b"connection":
            connection = [token.lower().strip() for token in value.split(b",")]
            if b"close" in connection:
                keep_alive = False
                has_connection_close = True
        content.extend([name, b": ", value, b"\r\n"])

    if not keep_alive and not has_connection_close:
        content.append(b"connection: close\r\n")

    if chunked_encoding is None and not head_request and status not in (204, 304):
        # Neither content-length nor transfer-encoding specified
        chunked_encoding = True
        content.append(b"transfer-encoding: chunked\r\n")

    content.append(b"\r\n")
    return b"".join(content), chunked_encoding, expected_content_length, keep_alive
