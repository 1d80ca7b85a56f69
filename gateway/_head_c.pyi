"""Stub for the native ``gateway._head_c`` (built from ext/_head_c.pyx)."""

from collections.abc import Iterable

from gateway._head_py import Framing

def response_head(
    status_line: bytes,
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    head_request: bool,
    chunked_encoding: bool | None,
    expected_content_length: int,
    keep_alive: bool,
) -> Framing: ...
