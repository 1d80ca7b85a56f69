"""problem+json (RFC 9457): the only place the gateway renders its own errors."""

from __future__ import annotations

import orjson

from gateway.decision import REASONS, Decision

TYPE_BASE = "https://fairgate.dev/problems/"
CONTENT_TYPE = (b"content-type", b"application/problem+json")


def render_problem(
    decision: Decision, request_id: str, request_id_header: bytes = b"x-request-id"
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of the response for ``decision``."""
    body: dict[str, object] = {
        "type": TYPE_BASE + decision.reason.replace("_", "-"),
        "title": REASONS[decision.reason][1],
        "status": decision.status,
        "detail": decision.detail,
        "reason": decision.reason,
        "request_id": request_id,
    }
    headers = [CONTENT_TYPE, (request_id_header, request_id.encode()), *decision.headers]
    if decision.retry_after is not None:
        body["retry_after"] = decision.retry_after
        headers.append((b"retry-after", str(decision.retry_after).encode()))
    payload = orjson.dumps(body)
    headers.append((b"content-length", str(len(payload)).encode()))
    if decision.status in (401, 403, 429, 503):
        # Refusals depend on who asks: never let a shared cache keep them.
        headers.append((b"cache-control", b"no-store"))
    return decision.status, headers, payload
