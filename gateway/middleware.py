"""``Fairgate(app, policy=...)``: the same engine guarding an in-process app.

A refused request gets the same problem+json as from the proxy; an allowed
one reaches the app with the canonical path, hygienic headers and identity
headers, exactly as an upstream would see it. Every request, refused or
served, gets its audit record when the policy has an ``audit`` section, as
from the proxy: the app's status and the bytes both ways are recorded.

The audit writer starts with the host app's lifespan (or on the first
request, for a host that has none) and is drained and sealed when the host
shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from gateway.asgi import Message, Scope, context_from_scope, send_decision
from gateway.bodies import BUFFER_BODY, ClientGone, PayloadTooLarge, read_body, too_large_to_screen
from gateway.context import RequestContext
from gateway.decision import Decision
from gateway.engine import Engine
from gateway.forwarding import upstream_headers
from gateway.policy import Policy, load_policy
from gateway.recording import AuditTrail, instance_name, unavailable
from gateway.usage.step import leave

logger = logging.getLogger("fairgate.middleware")

# After the audit trail failed to start, requests are refused (503
# audit_unavailable) for this long before the next attempt.
RETRY_START = 5.0


class Fairgate:
    def __init__(
        self, app: Any, *, policy: Policy | str | Path, worker: int = 0, audit: bool = True
    ) -> None:
        """``worker`` names this process's audit chain (give each process its
        own); ``audit=False`` writes no records even if the policy asks."""
        self.app = app
        self.policy = policy if isinstance(policy, Policy) else load_policy(policy)
        self.engine = Engine(self.policy)
        self._rid = self.policy.request_id_header.encode()
        self.audit: AuditTrail | None = None
        if audit and self.policy.audit is not None:
            self.audit = AuditTrail.from_policy(
                self.policy.audit, instance=instance_name(), worker=worker
            )
        self._starting: asyncio.Lock | None = None
        self._retry_start_at = 0.0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            # The engine decides on HTTP requests; a WebSocket would reach the
            # app with no checks and the client's own identity headers.
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self.audit is not None:
                await self.app(scope, receive, self._lifespan_send(send))
            else:
                await self.app(scope, receive, send)
            return
        req = context_from_scope(scope, self._rid)
        try:
            decision = None
            if self.audit is not None:
                decision = await self._audit_ready(self.audit)
            if decision is None:
                decision = await self.engine.decide(req)
            if decision is None:
                decision = await self._call_app(req, scope, receive, send)
            if decision is not None:
                req.refusal, req.status = decision, decision.status
                await send_decision(
                    send, decision, req.request_id, self._rid, head=req.method == "HEAD"
                )
        except Exception:
            req.aborted = "app_error"
            raise
        finally:
            if req.inflight:
                leave(self.engine.meter, req.inflight)
            await self._record(req)

    async def _record(self, req: RequestContext) -> None:
        """Count the request, and hand its audit record to the writer, as the proxy does."""
        self.engine.after(req)
        if self.audit is not None:
            await self.audit.record(req, self.policy)

    async def _audit_ready(self, audit: AuditTrail) -> Decision | None:
        """Start the writer if no lifespan did; then refuse (or hold) requests
        while the trail cannot record them, as ``on_sink_failure`` says."""
        if audit.writer.state == "new":
            if time.monotonic() < self._retry_start_at:
                return unavailable()  # it failed a moment ago: don't retry per request
            if self._starting is None:
                self._starting = asyncio.Lock()
            async with self._starting:
                if time.monotonic() < self._retry_start_at:
                    return unavailable()  # the request before this one just failed
                if audit.writer.state == "new":
                    try:
                        await audit.writer.start()
                    except Exception:
                        logger.exception("the audit trail could not start")
                        self._retry_start_at = time.monotonic() + RETRY_START
                        return unavailable()
        return None if audit.writer.ok else await audit.admit()

    async def aclose(self) -> None:
        """Drain and seal the audit trail: for hosts run without lifespan
        (with lifespan, the host's shutdown does this)."""
        if self.audit is not None:
            if self._starting is not None:
                async with self._starting:  # not while a first request starts it
                    await self.audit.writer.aclose(timeout=30)
            else:
                await self.audit.writer.aclose(timeout=30)

    def _lifespan_send(self, send: Any) -> Any:
        audit = self.audit
        assert audit is not None

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and audit.writer.state == "new":
                try:
                    await audit.writer.start()
                except Exception as exc:
                    # Serving unrecorded requests is not an option: refuse to start.
                    message = {"type": "lifespan.startup.failed", "message": f"audit trail: {exc}"}
            elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                # The host has finished its requests: drain and seal the chain.
                await audit.writer.aclose(timeout=30)
            await send(message)

        return lifespan_send

    async def _call_app(
        self, req: RequestContext, scope: Scope, receive: Any, send: Any
    ) -> Decision | None:
        """Hand the request to the app; a decision when a body detector refuses it."""
        assert req.route is not None
        meter, metered = self.engine.meter, req.bandwidth

        def count_in(size: int) -> None:
            req.bytes_in += size
            if metered is not None:
                meter.bandwidth.add(metered[0], metered[1], size)

        async def counted_receive() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                count_in(len(message.get("body", b"")))
            return message

        app_receive: Any = counted_receive
        if req.route.id in self.policy.detectors.body_routes:
            # As the proxy does: a screened route's body is read whole (bounded,
            # however it is framed) and inspected before the app sees a byte.
            try:
                body = await read_body(receive, req.content_length, BUFFER_BODY)
            except PayloadTooLarge:
                return too_large_to_screen()
            except ClientGone:
                req.aborted = "client_disconnect"
                return None
            count_in(len(body))  # counted once, here, refused or not
            refused = self.engine.abuse.inspect_body(req, self.policy, body, self.engine.clock())
            if refused is not None:
                return refused
            if req.content_length != 0:  # no body read: the app reads the client's own
                app_receive = _replay(body, counted_receive)
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

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                req.status = req.upstream_status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *added]}
            elif message["type"] == "http.response.body":
                size = len(message.get("body", b""))
                req.bytes_out += size
                if metered is not None:
                    meter.bandwidth.add(metered[0], metered[1], size)
            await send(message)

        await self.app(scope, app_receive, send_with_headers)
        return None


def _replay(body: bytes, receive: Any) -> Any:
    """``receive`` for the app once the body was read (and counted): the
    body, then the client's own messages (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
