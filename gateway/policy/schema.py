"""The shape of the policy file, as pydantic models.

Every model forbids unknown keys, so a typo such as ``permision:`` is an
error rather than a rule silently switched off. Units are parsed here, once,
so nothing on the hot path ever parses a string. Cross references (upstreams,
permissions, plans) are checked later by ``gateway.policy.compile``.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from gateway.units import parse_duration, parse_size


def _duration(value: object) -> float:
    if not isinstance(value, str | int | float):
        raise ValueError("a duration such as 30s, 15m, 1h or 90d")
    return parse_duration(value)


def _size(value: object) -> int:
    if not isinstance(value, str | int):
        raise ValueError("a size such as 512KiB, 10MiB or 50MB")
    return parse_size(value)


Duration = Annotated[float, BeforeValidator(_duration)]
Size = Annotated[int, BeforeValidator(_size)]
Mode = Literal["enforce", "shadow"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSpec(Strict):
    trusted_proxies: list[str] = Field(default_factory=list)
    # The one header the trusted proxies write. Proxies append to their own
    # header and pass others through, so reading both would let a client
    # choose its address by sending the other one.
    client_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    max_body: Size = 10 * 1024 * 1024
    max_headers: Size = 16 * 1024
    request_id_header: str = "x-request-id"

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"an IP network such as 10.0.0.0/8, not {item!r}") from exc
        return value


class UpstreamSpec(Strict):
    url: str
    connect_timeout: Duration = 1.0
    read_timeout: Duration = 30.0
    forward_authorization: bool = False
    max_idle: int = Field(default=64, ge=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith("http://"):
            raise ValueError("an http:// URL such as http://127.0.0.1:9101")
        return value


class IssuerSpec(Strict):
    issuer: str
    audiences: list[str] = Field(min_length=1)
    algorithms: list[
        Literal[
            "HS256",
            "HS384",
            "HS512",
            "RS256",
            "RS384",
            "RS512",
            "ES256",
            "ES384",
            "PS256",
            "PS384",
            "EdDSA",
        ]
    ] = Field(min_length=1)
    secret_env: str | None = None
    key_file: str | None = None
    jwks_url: str | None = None
    leeway: Duration = 30.0
    jwks_refresh: Duration = 300.0
    jwks_cooldown: Duration = 30.0
    jwks_max_staleness: Duration = 3600.0


class ClaimsSpec(Strict):
    subject: str = "sub"
    tenant: str = "tenant"
    roles: str = "roles"
    plan: str = "plan"
    session: str = "sid"


class TokenSourcesSpec(Strict):
    """Where else a token may come from. Off by default: query strings and
    cookies leak into logs and are sent cross-site."""

    query: str | None = None
    cookie: str | None = None


class LockoutSpec(Strict):
    max_failures: int = Field(default=10, ge=1)
    per: Duration = 300.0
    block: Duration = 900.0


class AuthSpec(Strict):
    issuers: list[IssuerSpec] = Field(default_factory=list)
    claims: ClaimsSpec = ClaimsSpec()
    default_plan: str | None = None
    token_sources: TokenSourcesSpec = TokenSourcesSpec()
    lockout: LockoutSpec = LockoutSpec()
    cache_size: int = Field(default=65536, ge=0)


class RoleSpec(Strict):
    inherits: list[str] = Field(default_factory=list)
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
    cross_tenant: bool = False


class PlanSpec(Strict):
    rate: str | None = None
    burst: int | None = Field(default=None, ge=1)
    quotas: list[str] = Field(default_factory=list)
    seats: int | None = Field(default=None, ge=1)
    concurrent: int | None = Field(default=None, ge=1)
    bandwidth: str | None = None
    mode: Mode = "enforce"


LIMIT_KEYS = ("subject", "tenant", "client", "client_network", "route")


class LimitSpec(Strict):
    rate: str
    burst: int | None = Field(default=None, ge=1)
    key: str = "subject"
    mode: Mode = "enforce"

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if value in LIMIT_KEYS or (value.startswith("header:") and len(value) > 7):
            return value
        raise ValueError(f"one of {', '.join(LIMIT_KEYS)} or header:NAME, not {value!r}")


class FairUsageSpec(Strict):
    retry_jitter: float = Field(default=0.0, ge=0.0, le=1.0)


class RouteSpec(Strict):
    id: str
    methods: list[str] = Field(min_length=1)
    path: str
    upstream: str
    permission: str | None = None
    public: bool = False
    object: str | None = None
    owner: str | None = None
    single_use: bool = False
    cost: int = Field(default=1, ge=0)
    limits: list[LimitSpec] = Field(default_factory=list)
    concurrent: int | None = Field(default=None, ge=1)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        out = []
        for method in value:
            if not method.isascii() or not method.isalpha():
                raise ValueError(f"an HTTP method such as GET, not {method!r}")
            out.append(method.upper())
        return out

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("a path template starting with '/'")
        return value


class MaintenanceSpec(Strict):
    upstream: str
    start: datetime
    end: datetime
    message: str = "Scheduled maintenance."

    @field_validator("start", "end")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("a timestamp with a time zone, such as 2026-12-01T02:00Z")
        return value


class RotateSpec(Strict):
    size: Size = 64 * 1024 * 1024
    interval: Duration = 86400.0


class AuditSpec(Strict):
    sinks: list[str] = Field(default_factory=lambda: ["file://var/audit"], min_length=1)
    retention: Duration = 90 * 86400.0
    ip_key_env: str = "FAIRGATE_AUDIT_KEY"
    checkpoint_key_env: str | None = None
    fsync: Literal["batch", "always", "never"] = "batch"
    rotate: RotateSpec = RotateSpec()
    on_sink_failure: Literal["block", "deny"] = "block"
    queue: int = Field(default=10000, ge=1)
    batch: int = Field(default=1024, ge=1)
    # The longest a record waits in its worker before its batch is handed
    # over and written (and fsynced): what a SIGKILL of the worker can lose.
    flush: Duration = 0.2
    checkpoint_interval: Duration = 60.0
    # process: records are sealed and written by a process of each worker's
    # own, off the serving core; inline: on the worker's event loop.
    writer: Literal["process", "inline"] = "process"

    @field_validator("flush")
    @classmethod
    def _flush(cls, value: float) -> float:
        if not 0.001 <= value <= 10.0:
            raise ValueError("a duration from 1ms to 10s, such as 200ms")
        return value

    @field_validator("sinks")
    @classmethod
    def _sinks(cls, value: list[str]) -> list[str]:
        for sink in value:
            if not (sink == "stdout" or sink.startswith(("file://", "redis://", "rediss://"))):
                raise ValueError(f"file://DIR, stdout or redis://HOST:PORT sinks, not {sink!r}")
        return value


class WindowSpec(Strict):
    max: int = Field(ge=1)
    per: Duration


class ScrapingSpec(Strict):
    mode: Mode = "enforce"
    distinct_objects: WindowSpec | None = None
    sequential_run: int | None = Field(default=None, ge=2)


class AccountSharingSpec(Strict):
    mode: Mode = "enforce"
    distinct_networks: WindowSpec | None = None
    distinct_devices: WindowSpec | None = None
    seats_per: Duration = 3600.0  # live sessions beyond the plan's seats, over this window


class FanOutSpec(Strict):
    routes: list[str] = Field(min_length=1)
    field: str
    max: int = Field(ge=1)
    per: Duration


class SpamSpec(Strict):
    mode: Mode = "enforce"
    fan_out: FanOutSpec


class DuplicatesSpec(Strict):
    mode: Mode = "enforce"
    routes: list[str] = Field(min_length=1)
    max: int = Field(ge=1)
    per: Duration


class ProbingSpec(Strict):
    mode: Mode = "enforce"
    refusals: WindowSpec


class DetectorsSpec(Strict):
    scraping: ScrapingSpec | None = None
    account_sharing: AccountSharingSpec | None = None
    spam: SpamSpec | None = None
    duplicates: DuplicatesSpec | None = None
    probing: ProbingSpec | None = None


class RungSpec(Strict):
    after: int = Field(ge=1)
    action: Literal["warn", "throttle", "suspend", "terminate"]
    for_: Duration | None = Field(default=None, alias="for")


class EnforcementSpec(Strict):
    ladder: list[RungSpec] = Field(min_length=1)
    window: Duration = 86400.0
    throttle_rate: str = "1/second"


class AdminSpec(Strict):
    listen: str = "127.0.0.1:9090"
    token_env: str | None = None


class PolicySpec(Strict):
    version: Literal[1]
    network: NetworkSpec = NetworkSpec()
    state: str = "memory://"
    state_failure: Literal["open", "closed", "local"] = "local"
    upstreams: dict[str, UpstreamSpec] = Field(min_length=1)
    auth: AuthSpec = AuthSpec()
    roles: dict[str, list[str] | RoleSpec] = Field(default_factory=dict)
    plans: dict[str, PlanSpec] = Field(default_factory=dict)
    fair_usage: FairUsageSpec = FairUsageSpec()
    routes: list[RouteSpec] = Field(min_length=1)
    maintenance: list[MaintenanceSpec] = Field(default_factory=list)
    audit: AuditSpec | None = None
    detectors: DetectorsSpec = DetectorsSpec()
    enforcement: EnforcementSpec | None = None
    admin: AdminSpec = AdminSpec()
