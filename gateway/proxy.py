"""The standalone reverse proxy: the engine decides, then the body streams.

Nothing reaches an upstream before the engine allows it. Bodies stream both
ways with backpressure; a client that goes away cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway import steps
from gateway.abuse.watch import AbuseWatch
from gateway.asgi import DisconnectSignal, Message, Scope, context_from_scope, send_decision
from gateway.audit.records import Snapshot
from gateway.auth import JwksRegistry
from gateway.bodies import (
    BUFFER_BODY,
    ClientGone,
    PayloadTooLarge,
    read_body,
    too_large_to_screen,
)
from gateway.context import RequestContext
from gateway.decision import Decision, deny
from gateway.engine import Engine
from gateway.forwarding import upstream_headers
from gateway.headers import downstream_response_headers
from gateway.policy.model import Policy, Upstream
from gateway.recording import AuditTrail, instance_name
from gateway.standing import BanStore
from gateway.state import MemoryIdentityState
from gateway.transport import UpstreamPool, UpstreamResponse, UpstreamTimeout, UpstreamUnavailable
from gateway.usage.meter import Meter
from gateway.usage.step import charge, leave

logger = logging.getLogger("fairgate.proxy")

# How long an exchange runs before the gateway starts watching for the client
# going away (see _DisconnectWatcher).
ARM_AFTER = 0.01


class Gateway:
    """The public ASGI app of ``fairgate run``."""

    def __init__(
        self,
        policy: Policy,
        *,
        clock: Callable[[], float] | None = None,
        meter: Meter | None = None,
        worker: int = 0,
        audit: bool = True,
    ) -> None:
        """``worker`` names this process's audit chain; ``audit=False`` for a
        process that serves no requests (the admin-only parent of workers)."""
        self._clock = clock
        self._pools: dict[str, tuple[Upstream, UpstreamPool]] = {}
        self.state = MemoryIdentityState(policy.lockout)
        self.jwks = JwksRegistry()
        self.meter = meter or (Meter(clock=clock) if clock else Meter())
        # Charges the bytes a request moved to its bandwidth counter (natively
        # when the extension is built): as they stream, and when it ends.
        self._charge = functools.partial(charge, self.meter)
        self.audit: AuditTrail | None = None
        if audit and policy.audit is not None:
            self.audit = AuditTrail.from_policy(
                policy.audit, instance=instance_name(), worker=worker
            )
        self.bans = BanStore()
        self.abuse = AbuseWatch(self.bans)
        self._recording: set[asyncio.Task[None]] = set()
        self.apply(policy)

    def apply(self, policy: Policy) -> None:
        """Swap in a new policy; requests in flight finish under the old one."""
        # Revocations, replays and lockouts outlive a policy reload.
        self.state.configure(policy.lockout)
        self.engine = Engine(
            policy,
            clock=self._clock or time.time,
            state=self.state,
            jwks=self.jwks,
            meter=self.meter,
            bans=self.bans,
            abuse=self.abuse,
        )
        self.policy = policy
        self._request_id_header = policy.request_id_header.encode()
        pools = {}
        for name, upstream in policy.upstreams.items():
            current = self._pools.get(name)
            if current is not None and current[0] == upstream:
                pools[name] = current
            else:
                pools[name] = (
                    upstream,
                    UpstreamPool(
                        upstream.url,
                        connect_timeout=upstream.connect_timeout,
                        read_timeout=upstream.read_timeout,
                        max_idle=upstream.max_idle,
                    ),
                )
        self._pools = pools

    async def aclose(self) -> None:
        await self.jwks.aclose()
        for _, pool in self._pools.values():
            await pool.aclose()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            # WebSockets are not part of the CRM and VoIP APIs: refuse, don't guess.
            await send({"type": "websocket.close", "code": 1008})
            return
        req = context_from_scope(scope, self._request_id_header)
        try:
            audit = self.audit
            decision = None if audit is None or audit.writer.ok else await audit.admit()
            if decision is None:
                decision = await self.engine.decide(req)
            if decision is None:
                decision = await self._forward(req, receive, send)
            if decision is not None:
                await self._refuse(req, decision, send)
        except Exception:
            logger.exception("request %s failed inside the gateway", req.request_id)
            if req.status:
                raise  # the response has started: cutting the connection is all that is left
            await self._refuse(req, deny("internal_error", "The gateway failed."), send)
        finally:
            # In-flight slots are given back on every exit: success, refusal,
            # upstream error, timeout, client disconnect, or a bug.
            if req.inflight:
                leave(self.meter, req.inflight)
            if req.bandwidth is not None and req.bytes_in + req.bytes_out > req.charged:
                self._charge(req)  # what an error or a disconnect left uncharged
            if (facts := self._record(req)) is not None:
                await self._record_when_room(facts)

    def parser_refusal(self, decision: Decision, request_id: str, peer: str | None) -> None:
        """Record a request the HTTP parser refused (bad syntax, ambiguous
        framing, an oversize head): gateway.serve's protocol answered it with
        problem+json before any request existed, so only its client is known."""
        req = RequestContext("", b"", b"", [], peer, "http", request_id, time.perf_counter())
        steps.client(req, self.policy)
        req.refusal, req.status = decision, decision.status
        facts = self._record(req)
        if facts is None:
            return
        task = asyncio.get_running_loop().create_task(self._record_when_room(facts))
        self._recording.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._recorded)

    def _recorded(self, task: asyncio.Task[None]) -> None:
        self._recording.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a refused request was not recorded", exc_info=task.exception())

    async def _refuse(self, req: RequestContext, decision: Decision, send: Any) -> None:
        req.refusal = decision
        req.status = decision.status
        await send_decision(
            send, decision, req.request_id, self._request_id_header, head=req.method == "HEAD"
        )

    def _record(self, req: RequestContext) -> Snapshot | None:
        """Count the request, and queue its audit record (step 11) without
        waiting: no coroutine per request. Returns the record's facts when
        the writer has no room, for ``_record_when_room``."""
        self.engine.after(req)
        return None if self.audit is None else self.audit.offer(req, self.policy)

    async def _record_when_room(self, facts: Snapshot) -> None:
        assert self.audit is not None
        await self.audit.wait_to_queue(facts)

    async def _forward(self, req: RequestContext, receive: Any, send: Any) -> Decision | None:
        """Step 10. Returns a decision when the gateway must answer instead
        (upstream down or slow, body too large); ``None`` once a response went out
        or the client left."""
        assert req.route is not None
        upstream, pool = self._pools[req.route.upstream]
        rid_header = self._request_id_header
        headers = upstream_headers(req, upstream, rid_header)
        body: bytes | AsyncIterator[bytes]
        length = req.content_length
        # Bytes are charged to the plan's bandwidth as they stream, every
        # CHARGE_EVERY bytes, and the rest when the request ends (_charge).
        charging = self._charge if req.bandwidth is not None else None
        screened = req.route.id in self.policy.detectors.body_routes
        try:
            if screened or (length is not None and length <= BUFFER_BODY):
                # A screened route's body is read whole, however it is framed:
                # chunked or large bodies must not slip past the detectors.
                body = await read_body(receive, length, BUFFER_BODY)
                length = req.bytes_in = len(body)
                if screened:
                    decision = self.abuse.inspect_body(req, self.policy, body, self.engine.clock())
                    if decision is not None:
                        return decision
            else:
                body = _stream_body(req, receive, self.policy.max_body, charging)
        except ClientGone:
            req.aborted = "client_disconnect"
            return None
        except PayloadTooLarge:
            return too_large_to_screen()
        watcher = _watch_disconnect(req, receive) if isinstance(body, bytes) else None
        if watcher is not None and watcher.fired:
            req.aborted = "client_disconnect"  # gone already: nothing goes upstream
            return None
        response: UpstreamResponse | None = None
        try:
            try:
                response = await pool.request(
                    req.method.encode(), req.forward_target, headers, body, length
                )
            except (UpstreamTimeout, UpstreamUnavailable, PayloadTooLarge, ClientGone) as exc:
                cause = exc.__cause__ if isinstance(exc, UpstreamUnavailable) else exc
                if isinstance(exc, ClientGone) or isinstance(cause, ClientGone):
                    req.aborted = "client_disconnect"
                    return None
                if isinstance(exc, PayloadTooLarge) or isinstance(cause, PayloadTooLarge):
                    return deny(
                        "payload_too_large",
                        f"The request body exceeds {self.policy.max_body} bytes.",
                    )
                if isinstance(exc, UpstreamTimeout):
                    return deny(
                        "upstream_timeout", f"The {upstream.name} upstream did not answer in time."
                    )
                logger.warning("upstream %s unavailable: %s", upstream.name, exc)
                return deny("upstream_unavailable", f"The {upstream.name} upstream is unavailable.")
            if watcher is None:
                watcher = _watch_disconnect(req, receive)
                if watcher.fired:
                    req.aborted = "client_disconnect"  # gone while the upstream thought
                    return None
            response_headers = downstream_response_headers(response.headers)
            response_headers.append((rid_header, req.request_id.encode()))
            response_headers.extend(req.response_headers)
            req.upstream_status = req.status = response.status
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": response_headers,
                }
            )
            try:
                async for chunk in response.iter_body():
                    req.bytes_out += len(chunk)
                    if charging is not None and req.bytes_in + req.bytes_out >= req.charge_at:
                        charging(req)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (UpstreamTimeout, UpstreamUnavailable) as exc:
                # The status line is gone: the only honest signal left is to cut
                # the connection, so the client sees a truncated response.
                logger.warning("upstream %s failed mid-response: %s", upstream.name, exc)
                req.aborted = "upstream_failed_midstream"
                raise
            watcher.disarm()
            if charging is not None:
                charging(req)  # before the response ends: the client's next request sees it
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if watcher is None or not watcher.fired:
                raise
            # The client left: the upstream request is abandoned, nothing to send.
            req.aborted = "client_disconnect"
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            if watcher is not None:
                watcher.disarm()
            if response is not None:
                await response.aclose()
        return None

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Fetch issuer keys before the first request; a failure is not
                # fatal (requests then get 503 auth_unavailable, never a pass).
                await self.jwks.start_all(self.policy.issuers)
                if self.audit is not None:
                    try:
                        await self.audit.writer.start()
                    except Exception as exc:
                        # Serving unrecorded requests is not an option: refuse to start.
                        await send(
                            {"type": "lifespan.startup.failed", "message": f"audit trail: {exc}"}
                        )
                        return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # uvicorn has finished the requests in flight: their records are
                # queued. Drain them, then seal the chain with a final checkpoint.
                if self._recording:  # parser refusals still on their way to the writer
                    await asyncio.gather(*self._recording, return_exceptions=True)
                if self.audit is not None:
                    await self.audit.writer.aclose(timeout=30)
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _stream_body(
    req: RequestContext,
    receive: Any,
    limit: int,
    charge: Callable[[RequestContext], None] | None,
) -> AsyncIterator[bytes]:
    total = 0
    more = True
    while more:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge
        if chunk:
            req.bytes_in = total
            if charge is not None and total + req.bytes_out >= req.charge_at:
                charge(req)
            yield chunk


class _DisconnectWatcher:
    """Cancels the forwarding task when the client goes away, under servers
    that give no ``DisconnectSignal`` (the Gateway run by another ASGI server).

    ASGI servers swallow ``send`` after a disconnect, so only ``receive``
    tells us; without this, a slow upstream call would run on for nobody.
    Watching costs a task per request, so it is armed only once the exchange
    has lasted ``ARM_AFTER``: most requests finish before and pay a timer.
    """

    __slots__ = ("_handle", "_receive", "_task", "_waiter", "fired")

    def __init__(self, receive: Any) -> None:
        self.fired = False
        self._receive = receive
        self._task = asyncio.current_task()
        self._waiter: asyncio.Future[None] | None = None
        self._handle: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            ARM_AFTER, self._arm
        )

    def _arm(self) -> None:
        self._handle = None
        self._waiter = asyncio.ensure_future(_until_disconnect(self._receive))
        self._waiter.add_done_callback(self._fire)

    def _fire(self, waiter: asyncio.Future[Any]) -> None:
        if not waiter.cancelled() and self._task is not None:
            self.fired = True
            self._task.cancel()

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._waiter is not None:
            self._waiter.remove_done_callback(self._fire)
            self._waiter.cancel()
            self._waiter = None


async def _until_disconnect(receive: Any) -> None:
    # Request body messages may still be pending (an empty final one for a
    # GET): only a disconnect counts.
    while (await receive())["type"] != "http.disconnect":
        pass


def _watch_disconnect(req: RequestContext, receive: Any) -> DisconnectSignal | _DisconnectWatcher:
    """Cancel this task if the client leaves: by the server's own signal when
    it gives one (gateway.serve, free), else by watching ``receive``."""
    if req.disconnect is not None:
        return req.disconnect.arm()
    return _DisconnectWatcher(receive)
