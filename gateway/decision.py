"""Decisions: what the engine answers when a request must not go on.

``REASONS`` is the catalogue of stable reason codes. Clients branch on
``reason``, so a code, once shipped, keeps its meaning and status.
"""

from __future__ import annotations

from dataclasses import dataclass

REASONS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "Bad request"),
    "bad_request_path": (400, "Ambiguous or malformed request target"),
    "unauthenticated": (401, "Authentication required"),
    "forbidden": (403, "Forbidden"),
    "tenant_mismatch": (403, "Tenant mismatch"),
    "suspended": (403, "Suspended"),
    "terminated": (403, "Terminated"),
    "route_not_found": (404, "No such route"),
    "method_not_allowed": (405, "Method not allowed"),
    "replayed": (409, "Token already used"),
    "payload_too_large": (413, "Payload too large"),
    "rate_limited": (429, "Rate limited"),
    "quota_exceeded": (429, "Quota exceeded"),
    "concurrency_limited": (429, "Too many concurrent requests"),
    "bandwidth_exceeded": (429, "Bandwidth exceeded"),
    "too_many_failures": (429, "Too many failed authentications"),
    "headers_too_large": (431, "Request header fields too large"),
    "internal_error": (500, "Internal gateway error"),
    "not_implemented": (501, "Not implemented in this deployment"),
    "upstream_unavailable": (502, "Upstream unavailable"),
    "maintenance": (503, "Maintenance"),
    "audit_unavailable": (503, "Audit trail unavailable"),
    "auth_unavailable": (503, "Token keys unavailable"),
    "upstream_timeout": (504, "Upstream timeout"),
}


@dataclass(frozen=True, slots=True)
class Decision:
    """A refusal. ``headers`` are extra response headers (``Allow``,
    ``WWW-Authenticate``); ``retry_after`` is whole seconds."""

    reason: str
    detail: str
    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    retry_after: int | None = None
    rule: str | None = None


def deny(
    reason: str,
    detail: str,
    *,
    headers: tuple[tuple[bytes, bytes], ...] = (),
    retry_after: int | None = None,
    rule: str | None = None,
) -> Decision:
    status = REASONS[reason][0]
    return Decision(reason, detail, status, headers, retry_after, rule)
