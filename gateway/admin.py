"""The admin API, on its own listener: health, readiness, policy, reload.

Everything except ``/healthz`` needs a bearer token whose roles grant
``fairgate.admin``, verified exactly like client tokens.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import metrics
from gateway.auth import CHALLENGE, Identity
from gateway.clientaddr import resolve_client
from gateway.decision import Decision, deny
from gateway.policy import PolicyError, load_policy
from gateway.problems import render_problem
from gateway.proxy import Gateway
from gateway.units import parse_duration

ADMIN_PERMISSION = "fairgate.admin"
# A revocation without an end outlives any token we would accept (issuers
# here mint tokens for hours, not days); the entry then expires by itself.
MAX_TOKEN_LIFETIME = 30 * 86400.0
logger = logging.getLogger("fairgate.admin")


def _problem(decision: Decision, request_id: str = "admin") -> Response:
    status, headers, body = render_problem(decision, request_id)
    response = Response(body, status_code=status)
    response.raw_headers = headers
    return response


async def _upstream_reachable(url: str, timeout: float) -> bool:
    parts = urlsplit(url)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port or 80), timeout
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


SHARED_STATE_ONLY = (
    "This admin listener's process serves no requests (--workers > 1): bans and "
    "revocations would not reach the workers until shared state is configured."
)


def create_admin_app(
    gateway: Gateway,
    policy_path: str | None,
    reload_hook: Callable[[], None] | None = None,
    serves_requests: bool = True,
) -> Starlette:
    """``serves_requests=False`` for the parent of ``--workers``: the state it
    would change lives in the workers, so those endpoints refuse (501)."""

    async def admin_identity(request: Request) -> Identity | Response:
        engine = gateway.engine
        now = engine.clock()
        found = engine.authenticator.extract(request.scope["headers"], b"")
        if isinstance(found, Decision):
            return _problem(found)
        token, _ = found
        if token is None:
            return _problem(
                deny("unauthenticated", "An admin token is required.", headers=(CHALLENGE,))
            )
        client = resolve_client(
            request.client.host if request.client else None,
            request.scope["headers"],
            gateway.policy.trusted_proxies,
            gateway.policy.client_header,
        )
        result = await engine.authenticator.authenticate(token, client.network, now)
        if isinstance(result, Decision):
            return _problem(result)
        roles = gateway.policy.roles
        if not any(ADMIN_PERMISSION in roles[r].permissions for r in result.roles if r in roles):
            return _problem(deny("forbidden", f"The admin API needs {ADMIN_PERMISSION}."))
        return result

    async def healthz(request: Request) -> Response:
        audit = gateway.audit
        if audit is not None and audit.writer.state == "closed":
            # The audit writer (process) is gone: this process can only refuse
            # requests from now on, so it must be restarted.
            return JSONResponse({"status": "audit trail stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks = {}
        for name, upstream in gateway.policy.upstreams.items():
            checks[f"upstream:{name}"] = await _upstream_reachable(
                upstream.url, upstream.connect_timeout
            )
        if gateway.audit is not None:
            # A request that cannot be recorded is held or refused: not ready.
            checks["audit"] = gateway.audit.healthy
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    async def policy(request: Request) -> Response:
        who = await admin_identity(request)
        if isinstance(who, Response):
            return who
        p = gateway.policy
        return JSONResponse(
            {
                "source": p.source,
                "revision": p.revision,
                "routes": len(p.routes),
                "upstreams": sorted(p.upstreams),
            }
        )

    async def reload(request: Request) -> Response:
        who = await admin_identity(request)
        if isinstance(who, Response):
            return who
        if policy_path is None:
            return JSONResponse({"reloaded": False, "error": "no policy file to reload"}, 409)
        try:
            new = load_policy(policy_path)
        except PolicyError as exc:
            # A broken file never replaces the running policy.
            return JSONResponse(
                {"reloaded": False, "error": str(exc), "revision": gateway.policy.revision},
                status_code=422,
            )
        gateway.apply(new)
        if reload_hook is not None:
            reload_hook()
        return JSONResponse({"reloaded": True, "revision": new.revision})

    async def prometheus(request: Request) -> Response:
        who = await admin_identity(request)
        if isinstance(who, Response):
            return who
        meter = gateway.meter
        metrics.INFLIGHT.set(len(meter.inflight))
        # They grow with live subjects (live counts are never dropped): watch them.
        metrics.USAGE_COUNTERS.labels("quota").set(len(meter.quota_counts))
        metrics.USAGE_COUNTERS.labels("bandwidth").set(len(meter.bandwidth))
        metrics.USAGE_BUCKETS.set(len(meter.buckets))
        audit = gateway.audit
        if audit is not None:
            writer: Any = audit.writer
            metrics.AUDIT_QUEUE.set(writer.queue_depth)
            metrics.AUDIT_WRITTEN.set(writer.written)
            metrics.AUDIT_FAILURES.set(writer.failures)
            metrics.AUDIT_HEALTHY.set(1 if writer.healthy else 0)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def bans(request: Request) -> Response:
        who = await admin_identity(request)
        if isinstance(who, Response):
            return who
        if not serves_requests and request.method != "GET":
            return _problem(deny("not_implemented", SHARED_STATE_ONLY))
        store, now = gateway.bans, gateway.engine.clock()
        if request.method == "GET":
            return JSONResponse({"bans": [b.as_json() for b in store.active(now)]})
        if request.method == "DELETE":
            target = request.query_params.get("target", "")
            if not store.lift(target):
                return _problem(deny("route_not_found", f"No active ban on {target!r}."))
            logger.warning("ban on %s lifted by %s", target, who.subject)
            return JSONResponse({"lifted": target})
        try:
            body = await request.json()
            seconds = parse_duration(body["for"]) if body.get("for") is not None else None
            ban = store.add(
                str(body["target"]),
                str(body.get("action", "suspend")),
                seconds,
                str(body.get("reason", "set by an operator")),
                now,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _problem(deny("bad_request", f"Send target, action and for: {exc}."))
        logger.warning("%s on %s by %s", ban.action, ban.target, who.subject)
        return JSONResponse(ban.as_json(), status_code=201)

    async def revoke(request: Request) -> Response:
        who = await admin_identity(request)
        if isinstance(who, Response):
            return who
        if not serves_requests:
            return _problem(deny("not_implemented", SHARED_STATE_ONLY))
        try:
            body = await request.json()
            jti = body["jti"]
            until = float(body.get("until", gateway.engine.clock() + MAX_TOKEN_LIFETIME))
            if not isinstance(jti, str) or not jti or len(jti) > 256:
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            return _problem(
                deny("bad_request", 'Send {"jti": "...", "until": <unix time, optional>}.')
            )
        gateway.engine.state.revoke(jti, until)
        logger.warning("token revoked by %s until %d", who.subject, until)
        return JSONResponse({"revoked": jti, "until": until})

    return Starlette(
        routes=[
            Route("/tokens/revoke", revoke, methods=["POST"]),
            Route("/metrics", prometheus),
            Route("/bans", bans, methods=["GET", "POST", "DELETE"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/policy", policy),
            Route("/policy/reload", reload, methods=["POST"]),
        ]
    )


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock
