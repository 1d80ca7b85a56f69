"""``Fairgate(app, policy=...)``: the same engine guarding an in-process app.

A refused request gets the same problem+json as from the proxy; an allowed
one reaches the app with the canonical path, hygienic headers and identity
headers, exactly as an upstream would see it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.asgi import Scope, context_from_scope, send_decision
from gateway.context import RequestContext
from gateway.engine import Engine
from gateway.forwarding import upstream_headers
from gateway.policy import Policy, load_policy


class Fairgate:
    def __init__(self, app: Any, *, policy: Policy | str | Path) -> None:
        self.app = app
        self.policy = policy if isinstance(policy, Policy) else load_policy(policy)
        self.engine = Engine(self.policy)
        self._rid = self.policy.request_id_header.encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            # The engine decides on HTTP requests; a WebSocket would reach the
            # app with no checks and the client's own identity headers.
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan
            return
        req = context_from_scope(scope, self._rid)
        try:
            decision = await self.engine.decide(req)
            if decision is not None:
                await send_decision(
                    send, decision, req.request_id, self._rid, head=req.method == "HEAD"
                )
                return
            await self._call_app(req, scope, receive, send)
        finally:
            if req.inflight:
                self.engine.meter.leave(req.inflight)

    async def _call_app(self, req: RequestContext, scope: Scope, receive: Any, send: Any) -> None:
        assert req.route is not None
        upstream = self.policy.upstreams[req.route.upstream]
        scope = dict(scope)
        scope["path"] = req.path
        scope["raw_path"] = req.forward_path
        scope["query_string"] = req.forward_query
        headers = upstream_headers(req, upstream, self._rid)
        host = [h for h in req.headers if h[0] == b"host"]
        scope["headers"] = host + headers
        scope.setdefault("state", {})["fairgate"] = req.identity
        added = [(self._rid, req.request_id.encode()), *req.response_headers]
        meter, metered = self.engine.meter, req.bandwidth

        async def counted_receive() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if metered is not None and message["type"] == "http.request":
                meter.bandwidth.add(metered[0], metered[1], len(message.get("body", b"")))
            return message

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *added]}
            elif metered is not None and message["type"] == "http.response.body":
                meter.bandwidth.add(metered[0], metered[1], len(message.get("body", b"")))
            await send(message)

        await self.app(scope, counted_receive, send_with_headers)
