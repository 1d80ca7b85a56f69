"""The request context: what the transport saw, and the facts steps add.

Adapters (the proxy, the middleware) fill the first block from the ASGI
scope; each pipeline step reads it and adds its facts below. No step changes
what an earlier step wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.auth import Identity
from gateway.clientaddr import ClientAddress
from gateway.decision import Decision
from gateway.policy.model import Route
from gateway.usage.meter import CHARGE_EVERY

if TYPE_CHECKING:
    from gateway.asgi import DisconnectSignal


@dataclass(slots=True)
class RequestContext:
    # What arrived.
    method: str
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    peer: str | None
    scheme: str
    request_id: str
    started: float
    # Fired by the server when the client goes away (gateway.serve only).
    disconnect: DisconnectSignal | None = None
    # Facts added by the pipeline, in order.
    path: str = ""
    forward_path: bytes = b""
    forward_query: bytes = b""
    content_length: int | None = 0
    client: ClientAddress | None = None
    route: Route | None = None
    params: dict[str, str] = field(default_factory=dict)
    identity: Identity | None = None
    # Fair usage: headers for the response, in-flight slots to give back when
    # it ends (Meter.leave), the (key, window) that bytes are charged to, and
    # shadow-mode refusals.
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    inflight: tuple[str, ...] = ()
    bandwidth: tuple[str, float] | None = None
    charged: int = 0  # bytes charged to bandwidth so far...
    charge_at: int = CHARGE_EVERY  # ... and the count at which to charge again
    shadow: list[str] = field(default_factory=list)
    signals: list[str] = field(default_factory=list)  # from the abuse detectors
    # The outcome, filled in as the response goes out (for the audit record).
    refusal: Decision | None = None
    status: int = 0
    upstream_status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    aborted: str | None = None  # client_disconnect, upstream_failed_midstream

    @property
    def forward_target(self) -> bytes:
        if self.forward_query:
            return self.forward_path + b"?" + self.forward_query
        return self.forward_path
