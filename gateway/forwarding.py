"""The request as it leaves for the upstream: exactly what was decided on.

Builds the upstream header list once per request: the client's headers after
hygiene, then the gateway's own (identity, forwarding, request id), appended
last so that nothing a client sends can remove or shadow them.
"""

from __future__ import annotations

from gateway.context import RequestContext
from gateway.headers import forwarded_value, upstream_request_headers
from gateway.policy.model import Upstream

Header = tuple[bytes, bytes]


def upstream_headers(
    req: RequestContext, upstream: Upstream, request_id_header: bytes
) -> list[Header]:
    headers = upstream_request_headers(
        req.headers,
        forward_authorization=upstream.forward_authorization,
        request_id_header=request_id_header,
    )
    if req.identity is not None:
        headers.extend(req.identity.headers)
    client_ip = req.client.ip if req.client else "unknown"
    host = next((v for k, v in req.headers if k == b"host"), None)
    headers.append((b"x-forwarded-for", client_ip.encode()))
    headers.append((b"x-forwarded-proto", req.scheme.encode()))
    if host is not None:
        headers.append((b"x-forwarded-host", host))
    headers.append((b"forwarded", forwarded_value(client_ip, req.scheme, host)))
    headers.append((request_id_header, req.request_id.encode()))
    return headers
