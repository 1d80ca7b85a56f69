"""The pipeline steps of DESIGN.md. Each takes the request context (and what
it needs of the policy), adds facts, and returns ``None`` to pass the request
on or a ``Decision`` to end it. None of them knows about HTTP transport.
"""

from __future__ import annotations

import math

from gateway.auth import CHALLENGE, Authenticator
from gateway.clientaddr import resolve_client
from gateway.context import RequestContext
from gateway.decision import Decision, deny
from gateway.policy.model import Policy
from gateway.router import MethodNotAllowed
from gateway.target import BadTarget, canonical_target


def framing(req: RequestContext, policy: Policy) -> Decision | None:
    """Size limits and unambiguous body framing (request smuggling)."""
    size = 0
    lengths: list[bytes] = []
    chunked = False
    for name, value in req.headers:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            chunked = True
    if size > policy.max_headers:
        return deny(
            "headers_too_large", f"The request's header block exceeds {policy.max_headers} bytes."
        )
    if lengths and chunked:
        return deny("bad_request", "Content-Length and Transfer-Encoding together are ambiguous.")
    if lengths:
        if len(set(lengths)) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
            return deny("bad_request", "The Content-Length header is malformed.")
        req.content_length = int(lengths[0])
        if req.content_length > policy.max_body:
            return deny("payload_too_large", f"The request body exceeds {policy.max_body} bytes.")
    elif chunked:
        req.content_length = None
    return None


def target(req: RequestContext) -> Decision | None:
    """Step 1: the canonical target, from the raw bytes the client sent."""
    try:
        req.path, req.forward_path, req.forward_query = canonical_target(req.raw_path, req.query)
    except BadTarget as exc:
        return deny("bad_request_path", f"The request target is ambiguous: {exc.detail}.")
    return None


def client(req: RequestContext, policy: Policy) -> None:
    """Step 2: the client address, believing only trusted proxies."""
    req.client = resolve_client(req.peer, req.headers, policy.trusted_proxies, policy.client_header)


def route(req: RequestContext, policy: Policy) -> Decision | None:
    """Step 3: method + template; deny by default."""
    match = policy.router.match(req.method, req.path)
    if match is None:
        return deny("route_not_found", f"No route for {req.method} {req.path}.")
    if isinstance(match, MethodNotAllowed):
        allow = ", ".join(match.allow).encode()
        return deny(
            "method_not_allowed", f"{req.method} is not allowed here.", headers=((b"allow", allow),)
        )
    req.route = match.route
    req.params = match.params
    return None


def maintenance(req: RequestContext, policy: Policy, now: float) -> Decision | None:
    """Step 4: a maintenance window on the route's upstream."""
    assert req.route is not None
    for window in policy.maintenance.get(req.route.upstream, ()):
        if window.start <= now < window.end:
            return deny(
                "maintenance",
                window.message,
                retry_after=max(1, math.ceil(window.end - now)),
                rule=f"maintenance.{window.upstream}",
            )
    return None


async def authenticate(
    req: RequestContext, authenticator: Authenticator, now: float
) -> Decision | None:
    """Step 5: the bearer token; public routes skip it."""
    assert req.route is not None and req.client is not None
    if req.route.public:
        return None
    found = authenticator.extract(req.headers, req.query)
    if isinstance(found, Decision):
        return found
    token, source = found
    if token is None:
        return deny("unauthenticated", "A bearer token is required.", headers=(CHALLENGE,))
    result = await authenticator.authenticate(token, req.client.network, now)
    if isinstance(result, Decision):
        return result
    req.identity = result
    if source == "query":
        # The upstream never sees the token in its access logs.
        req.forward_query = _without_param(req.forward_query, authenticator.query_name)
    return None


def _without_param(query: bytes, name: bytes) -> bytes:
    return b"&".join(p for p in query.split(b"&") if p.partition(b"=")[0] != name)


def spend_single_use(req: RequestContext, authenticator: Authenticator) -> None:
    """Mark a single-use token spent, once every step has let the request pass:
    a request refused later (a limit, the ladder) must not burn the token. No
    await separates the check from this mark, so two concurrent requests with
    one token cannot both pass."""
    route_, identity = req.route, req.identity
    if route_ is not None and route_.single_use and identity is not None and identity.jti:
        authenticator.state.mark_used(identity.jti, identity.usable_until)


def single_use(req: RequestContext, authenticator: Authenticator, now: float) -> Decision | None:
    """Routes marked ``single_use`` accept each token once (replay defence)."""
    route_, identity = req.route, req.identity
    if route_ is None or not route_.single_use or identity is None:
        return None
    if identity.jti is None:
        return deny(
            "unauthenticated", "This route needs a token with a jti claim.", headers=(CHALLENGE,)
        )
    if authenticator.state.is_used(identity.jti, now):
        return deny(
            "replayed",
            "This token was already used on a single-use route.",
            rule=f"routes.{route_.id}",
        )
    return None


def authorize(req: RequestContext, policy: Policy) -> Decision | None:
    """Step 7: role permissions, tenant isolation and owner scope."""
    route_ = req.route
    identity = req.identity
    assert route_ is not None
    if route_.public or identity is None:
        return None
    roles = identity.roles
    # Set operations in C: this runs on every authenticated request.
    if route_.allowed_roles.isdisjoint(roles) or not route_.denied_roles.isdisjoint(roles):
        return deny(
            "forbidden",
            f"This route needs the {route_.permission} permission.",
            rule=f"routes.{route_.id}",
        )
    cross_tenant = not policy.cross_tenant_roles.isdisjoint(roles)
    if route_.has_tenant and not cross_tenant and req.params["tenant"] != identity.tenant:
        return deny(
            "tenant_mismatch",
            "The path names another tenant than the token.",
            rule=f"routes.{route_.id}",
        )
    if route_.owner_param and req.params[route_.owner_param] != identity.subject:
        return deny(
            "forbidden", "This route only serves the resource's owner.", rule=f"routes.{route_.id}"
        )
    return None
