"""The compiled policy: everything the hot path needs, precomputed.

Nothing here parses strings or walks YAML at request time. A ``Policy`` is
immutable; a reload builds a new one and swaps it in whole.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from gateway.abuse.rules import Detectors, Ladder
from gateway.router import Router
from gateway.usage.rules import BucketRule, PlanRules

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    connect_timeout: float
    read_timeout: float
    forward_authorization: bool
    max_idle: int


@dataclass(frozen=True, slots=True)
class Issuer:
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    key: str | bytes  # empty when keys come from jwks_url
    leeway: float
    jwks_url: str | None = None
    jwks_refresh: float = 300.0
    jwks_cooldown: float = 30.0
    jwks_max_staleness: float = 3600.0


@dataclass(frozen=True, slots=True)
class Claims:
    subject: str
    tenant: str
    roles: str
    plan: str
    session: str


@dataclass(frozen=True, slots=True)
class Lockout:
    max_failures: int
    per: float
    block: float


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    permissions: frozenset[str]
    denied: frozenset[str]
    cross_tenant: bool


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    seats: int | None
    rules: PlanRules


@dataclass(frozen=True, slots=True)
class Route:
    id: str
    methods: frozenset[str]
    path: str
    upstream: str
    permission: str | None
    public: bool
    object_param: str | None
    owner_param: str | None
    single_use: bool
    cost: int
    limits: tuple[BucketRule, ...]
    concurrent: int | None
    has_tenant: bool
    # Role names resolved at load: a request is authorized when one of its
    # roles is in ``allowed_roles`` and none is in ``denied_roles``.
    allowed_roles: frozenset[str]
    denied_roles: frozenset[str]


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    upstream: str
    start: float
    end: float
    message: str


@dataclass(frozen=True, slots=True)
class AuditPolicy:
    sinks: tuple[str, ...]
    retention: float
    ip_key: bytes
    checkpoint_key: bytes | None
    fsync: str
    rotate_bytes: int
    rotate_seconds: float
    on_sink_failure: str
    queue: int
    batch: int
    checkpoint_interval: float
    writer: str = "process"  # "process" (a writer process per worker) or "inline"
    flush: float = 0.2  # seconds a record may wait in its worker before its batch goes


@dataclass(frozen=True, slots=True)
class Policy:
    source: str
    revision: str
    trusted_proxies: tuple[IPNetwork, ...]
    client_header: str
    max_body: int
    max_headers: int
    request_id_header: str
    state: str
    state_failure: str
    upstreams: dict[str, Upstream]
    issuers: tuple[Issuer, ...]
    claims: Claims
    default_plan: str | None
    query_token: str | None
    cookie_token: str | None
    lockout: Lockout
    token_cache_size: int
    roles: dict[str, Role]
    cross_tenant_roles: frozenset[str]
    plans: dict[str, Plan]
    retry_jitter: float
    routes: tuple[Route, ...]
    router: Router[Route]
    maintenance: dict[str, tuple[MaintenanceWindow, ...]]
    admin_listen: str
    admin_token_env: str | None
    audit: AuditPolicy | None
    detectors: Detectors
    ladder: Ladder | None
    permissions: frozenset[str] = field(default_factory=frozenset)
