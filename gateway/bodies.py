"""Request bodies as both adapters read them: whole and bounded.

Routes whose body a detector reads (spam fan-out, duplicate submissions)
get it read whole, however it is framed, before anything else sees it; a
chunked or oversize body must not slip past the detectors.
"""

from __future__ import annotations

from typing import Any

from gateway.asgi import Message
from gateway.decision import Decision, deny

# Bodies up to this size are read whole: on screened routes always (larger
# ones are refused there); elsewhere by the proxy, for one write upstream and
# so that an idempotent request can be retried on a stale pooled connection.
BUFFER_BODY = 64 * 1024


class PayloadTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


async def read_body(receive: Any, length: int | None, limit: int) -> bytes:
    """The whole body, or ``PayloadTooLarge`` past ``limit`` bytes (at once
    when ``Content-Length`` says so: no 100-continue invites the upload), or
    ``ClientGone`` if the client leaves first."""
    if length == 0:
        return b""
    if length is not None and length > limit:
        raise PayloadTooLarge
    chunks = []
    total = 0
    more = True
    while more:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def too_large_to_screen() -> Decision:
    return deny(
        "payload_too_large",
        f"Bodies on this route are screened for abuse and limited to {BUFFER_BODY} bytes.",
    )
