"""Turn a validated ``PolicySpec`` into a ``Policy``: resolve references,
expand roles, build the router, load key material.

Every failure is a ``PolicyError`` that names the key path and line.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from fnmatch import fnmatchcase
from pathlib import Path

from gateway.abuse.rules import Detectors, Ladder, Rung, Window
from gateway.audit.config import decode_key
from gateway.policy.errors import PolicyError, format_path
from gateway.policy.loader import Lines, line_of
from gateway.policy.model import (
    AuditPolicy,
    Claims,
    Issuer,
    Lockout,
    MaintenanceWindow,
    Plan,
    Policy,
    Role,
    Route,
    Upstream,
)
from gateway.policy.schema import IssuerSpec, PolicySpec, RoleSpec, WindowSpec
from gateway.router import RouteConflict, Router, template_params
from gateway.usage.rules import PlanRules, bandwidth_rule, bucket_rule, quota_rule

# Permissions the gateway itself checks (admin API), so roles may grant them
# although no route names them.
BUILTIN_PERMISSIONS = frozenset({"fairgate.admin"})
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
MIN_HMAC_SECRET = 32


class _Ctx:
    def __init__(self, file: str, lines: Lines) -> None:
        self.file = file
        self.lines = lines

    def error(self, *parts: str | int, expected: str) -> PolicyError:
        return PolicyError(self.file, format_path(parts), line_of(self.lines, parts), expected)


def compile_policy(spec: PolicySpec, lines: Lines, file: str, text: str) -> Policy:
    ctx = _Ctx(file, lines)
    if spec.state != "memory://":
        # Accepting redis:// and quietly keeping state per process would make
        # every limit N times looser behind N replicas.
        raise ctx.error("state", expected="memory:// (shared Redis state is not supported yet)")
    upstreams = {
        name: Upstream(
            name,
            u.url.rstrip("/"),
            u.connect_timeout,
            u.read_timeout,
            u.forward_authorization,
            u.max_idle,
        )
        for name, u in spec.upstreams.items()
    }
    plans = _plans(spec, ctx)
    if spec.auth.default_plan is not None and spec.auth.default_plan not in plans:
        raise ctx.error("auth", "default_plan", expected=f"one of the plans {sorted(plans)}")
    issuers = tuple(_issuer(ctx, i, issuer) for i, issuer in enumerate(spec.auth.issuers))
    route_permissions = {r.permission for r in spec.routes if r.permission}
    known_permissions = frozenset(route_permissions) | BUILTIN_PERMISSIONS
    roles = _roles(spec, ctx, known_permissions)
    routes = _routes(spec, ctx, roles, upstreams)
    try:
        router = Router(routes)
    except (RouteConflict, ValueError) as exc:
        index = next(
            (i for i, r in enumerate(spec.routes) if r.path in str(exc)), len(spec.routes) - 1
        )
        raise ctx.error("routes", index, "path", expected=str(exc)) from None
    if not issuers and not all(r.public for r in routes):
        raise ctx.error(
            "auth", "issuers", expected="at least one issuer, as some routes are not public"
        )
    maintenance: dict[str, list[MaintenanceWindow]] = {}
    for i, window in enumerate(spec.maintenance):
        if window.upstream not in upstreams:
            raise ctx.error("maintenance", i, "upstream", expected=f"one of {sorted(upstreams)}")
        if window.end <= window.start:
            raise ctx.error("maintenance", i, "end", expected="a time after start")
        maintenance.setdefault(window.upstream, []).append(
            MaintenanceWindow(
                window.upstream, window.start.timestamp(), window.end.timestamp(), window.message
            )
        )
    return Policy(
        source=file,
        revision=hashlib.sha256(text.encode()).hexdigest()[:12],
        trusted_proxies=tuple(
            ipaddress.ip_network(n, strict=False) for n in spec.network.trusted_proxies
        ),
        client_header=spec.network.client_header,
        max_body=spec.network.max_body,
        max_headers=spec.network.max_headers,
        request_id_header=spec.network.request_id_header.lower(),
        state=spec.state,
        state_failure=spec.state_failure,
        upstreams=upstreams,
        issuers=issuers,
        claims=Claims(**spec.auth.claims.model_dump()),
        default_plan=spec.auth.default_plan,
        query_token=spec.auth.token_sources.query,
        cookie_token=spec.auth.token_sources.cookie,
        lockout=Lockout(
            spec.auth.lockout.max_failures, spec.auth.lockout.per, spec.auth.lockout.block
        ),
        token_cache_size=spec.auth.cache_size,
        roles=roles,
        cross_tenant_roles=frozenset(r.name for r in roles.values() if r.cross_tenant),
        plans=plans,
        retry_jitter=spec.fair_usage.retry_jitter,
        routes=tuple(routes),
        router=router,
        maintenance={k: tuple(v) for k, v in maintenance.items()},
        admin_listen=spec.admin.listen,
        admin_token_env=spec.admin.token_env,
        audit=_audit(spec, ctx),
        detectors=_detectors(spec, ctx, {r.id for r in routes}),
        ladder=_ladder(spec, ctx),
        permissions=known_permissions,
    )


def _detectors(spec: PolicySpec, ctx: _Ctx, route_ids: set[str]) -> Detectors:
    d = spec.detectors
    for name, ids in (
        ("spam", d.spam.fan_out.routes if d.spam else []),
        ("duplicates", d.duplicates.routes if d.duplicates else []),
    ):
        for i, rid in enumerate(ids):
            if rid not in route_ids:
                path = (
                    ("detectors", name, "fan_out", "routes", i)
                    if name == "spam"
                    else ("detectors", name, "routes", i)
                )
                raise ctx.error(*path, expected="the id of a route")

    def window(w: WindowSpec | None) -> Window | None:
        return Window(w.max, w.per) if w else None

    return Detectors(
        scraping_mode=d.scraping.mode if d.scraping else None,
        distinct_objects=window(d.scraping.distinct_objects) if d.scraping else None,
        sequential_run=d.scraping.sequential_run if d.scraping else None,
        sharing_mode=d.account_sharing.mode if d.account_sharing else None,
        distinct_networks=window(d.account_sharing.distinct_networks)
        if d.account_sharing
        else None,
        distinct_devices=window(d.account_sharing.distinct_devices) if d.account_sharing else None,
        seats_per=d.account_sharing.seats_per if d.account_sharing else 3600.0,
        spam_mode=d.spam.mode if d.spam else None,
        fan_out_routes=frozenset(d.spam.fan_out.routes) if d.spam else frozenset(),
        fan_out_field=d.spam.fan_out.field if d.spam else "",
        fan_out=Window(d.spam.fan_out.max, d.spam.fan_out.per) if d.spam else None,
        duplicates_mode=d.duplicates.mode if d.duplicates else None,
        duplicate_routes=frozenset(d.duplicates.routes) if d.duplicates else frozenset(),
        duplicates=Window(d.duplicates.max, d.duplicates.per) if d.duplicates else None,
        probing_mode=d.probing.mode if d.probing else None,
        refusals=window(d.probing.refusals) if d.probing else None,
    )


def _ladder(spec: PolicySpec, ctx: _Ctx) -> Ladder | None:
    e = spec.enforcement
    if e is None:
        return None
    rungs = []
    last = 0
    for i, rung in enumerate(e.ladder):
        if rung.after <= last:
            raise ctx.error(
                "enforcement",
                "ladder",
                i,
                "after",
                expected=f"a count above the previous rung's ({last})",
            )
        last = rung.after
        if rung.action in ("throttle", "suspend") and rung.for_ is None:
            raise ctx.error(
                "enforcement", "ladder", i, expected=f"a duration (for: 15m) for {rung.action}"
            )
        rungs.append(Rung(rung.after, rung.action, rung.for_))
    try:
        throttle = bucket_rule("ladder-throttle", e.throttle_rate, None, "subject", "enforce")
    except ValueError as exc:
        raise ctx.error("enforcement", "throttle_rate", expected=str(exc)) from None
    return Ladder(tuple(rungs), e.window, throttle.rate, throttle.burst)


def _audit(spec: PolicySpec, ctx: _Ctx) -> AuditPolicy | None:
    a = spec.audit
    if a is None:
        return None
    ip_key = os.environ.get(a.ip_key_env, "")
    if len(ip_key) < 16:
        # Without a stable secret key, pseudonyms could be reversed by
        # hashing every IPv4 address, or would change at each restart.
        raise ctx.error(
            "audit",
            "ip_key_env",
            expected=f"the environment variable {a.ip_key_env} set to 16+ characters",
        )
    checkpoint_key = None
    if a.checkpoint_key_env is not None:
        value = os.environ.get(a.checkpoint_key_env, "")
        if len(value) < 16:
            raise ctx.error(
                "audit",
                "checkpoint_key_env",
                expected=f"the environment variable {a.checkpoint_key_env} set to 16+ characters",
            )
        # The same encoding rules as `fairgate audit verify --key-env`.
        checkpoint_key = decode_key(value)
    return AuditPolicy(
        sinks=tuple(a.sinks),
        retention=a.retention,
        ip_key=ip_key.encode(),
        checkpoint_key=checkpoint_key,
        fsync=a.fsync,
        rotate_bytes=a.rotate.size,
        rotate_seconds=a.rotate.interval,
        on_sink_failure=a.on_sink_failure,
        queue=a.queue,
        batch=a.batch,
        checkpoint_interval=a.checkpoint_interval,
        writer=a.writer,
        flush=a.flush,
    )


def _plans(spec: PolicySpec, ctx: _Ctx) -> dict[str, Plan]:
    plans = {}
    for name, p in spec.plans.items():
        try:
            bucket = (
                bucket_rule(f"plan-{name}", p.rate, p.burst, "subject", p.mode) if p.rate else None
            )
        except ValueError as exc:
            raise ctx.error("plans", name, "rate", expected=str(exc)) from None
        if p.burst is not None and bucket is None:
            raise ctx.error("plans", name, "burst", expected="a rate for the burst to apply to")
        quotas = []
        for i, quota in enumerate(p.quotas):
            try:
                quotas.append(quota_rule(f"quota-{name}-{i}", quota, "subject", p.mode))
            except ValueError as exc:
                raise ctx.error("plans", name, "quotas", i, expected=str(exc)) from None
        try:
            bandwidth = (
                bandwidth_rule(f"bandwidth-{name}", p.bandwidth, p.mode) if p.bandwidth else None
            )
        except ValueError as exc:
            raise ctx.error("plans", name, "bandwidth", expected=str(exc)) from None
        rules = PlanRules(bucket, tuple(quotas), bandwidth, p.concurrent, p.mode)
        plans[name] = Plan(name, p.seats, rules)
    return plans


def _issuer(ctx: _Ctx, index: int, spec: IssuerSpec) -> Issuer:
    sources = [s for s in (spec.secret_env, spec.key_file, spec.jwks_url) if s]
    if len(sources) != 1:
        raise ctx.error(
            "auth", "issuers", index, expected="exactly one of secret_env, key_file or jwks_url"
        )
    hmac = {a in HMAC_ALGORITHMS for a in spec.algorithms}
    if len(hmac) != 1:
        # Mixing lets an attacker sign HS256 with the public key (ATTACKS.md 2).
        raise ctx.error(
            "auth",
            "issuers",
            index,
            "algorithms",
            expected="HMAC (HS*) or asymmetric algorithms, never both",
        )
    is_hmac = hmac.pop()
    key: str | bytes
    if spec.jwks_url:
        if is_hmac:
            raise ctx.error(
                "auth",
                "issuers",
                index,
                "jwks_url",
                expected="asymmetric algorithms (a JWKS never carries HMAC keys)",
            )
        if not spec.jwks_url.startswith(("https://", "http://")):
            raise ctx.error("auth", "issuers", index, "jwks_url", expected="an http(s):// URL")
        return Issuer(
            spec.issuer,
            tuple(spec.audiences),
            tuple(spec.algorithms),
            b"",
            spec.leeway,
            spec.jwks_url,
            spec.jwks_refresh,
            spec.jwks_cooldown,
            spec.jwks_max_staleness,
        )
    if spec.secret_env:
        if not is_hmac:
            raise ctx.error(
                "auth",
                "issuers",
                index,
                "secret_env",
                expected="key_file for asymmetric algorithms",
            )
        secret = os.environ.get(spec.secret_env)
        if not secret:
            raise ctx.error(
                "auth",
                "issuers",
                index,
                "secret_env",
                expected=f"the environment variable {spec.secret_env} to be set",
            )
        if len(secret) < MIN_HMAC_SECRET:
            raise ctx.error(
                "auth",
                "issuers",
                index,
                "secret_env",
                expected=f"a secret of at least {MIN_HMAC_SECRET} characters",
            )
        key = secret
    else:
        assert spec.key_file is not None
        try:
            key = Path(spec.key_file).read_bytes()
        except OSError as exc:
            raise ctx.error(
                "auth",
                "issuers",
                index,
                "key_file",
                expected=f"a readable key file ({exc.strerror})",
            ) from None
        if not is_hmac and b"PRIVATE KEY" in key:
            raise ctx.error(
                "auth",
                "issuers",
                index,
                "key_file",
                expected="a public key (the gateway never needs the private one)",
            )
    return Issuer(spec.issuer, tuple(spec.audiences), tuple(spec.algorithms), key, spec.leeway)


def _roles(spec: PolicySpec, ctx: _Ctx, known: frozenset[str]) -> dict[str, Role]:
    raw: dict[str, RoleSpec] = {
        name: RoleSpec(allow=value) if isinstance(value, list) else value
        for name, value in spec.roles.items()
    }
    for name, role in raw.items():
        for key in ("allow", "deny"):
            for i, pattern in enumerate(getattr(role, key)):
                if not any(fnmatchcase(p, pattern) for p in known):
                    path = (
                        ("roles", name, i)
                        if isinstance(spec.roles[name], list)
                        else ("roles", name, key, i)
                    )
                    raise ctx.error(*path, expected="a permission that some route requires")
        for i, parent in enumerate(role.inherits):
            if parent not in raw:
                raise ctx.error(
                    "roles", name, "inherits", i, expected=f"one of the roles {sorted(raw)}"
                )

    def expand(name: str, seen: tuple[str, ...]) -> tuple[set[str], set[str]]:
        if name in seen:
            raise ctx.error(
                "roles",
                name,
                "inherits",
                expected=f"no inheritance cycle ({' -> '.join((*seen, name))})",
            )
        role = raw[name]
        allow = {p for p in known if any(fnmatchcase(p, pat) for pat in role.allow)}
        deny = {p for p in known if any(fnmatchcase(p, pat) for pat in role.deny)}
        for parent in role.inherits:
            parent_allow, parent_deny = expand(parent, (*seen, name))
            allow |= parent_allow
            deny |= parent_deny
        return allow, deny

    roles = {}
    for name in raw:
        allow, deny = expand(name, ())
        roles[name] = Role(name, frozenset(allow - deny), frozenset(deny), raw[name].cross_tenant)
    return roles


def _routes(
    spec: PolicySpec, ctx: _Ctx, roles: dict[str, Role], upstreams: dict[str, Upstream]
) -> list[Route]:
    routes = []
    seen: set[str] = set()
    for i, r in enumerate(spec.routes):
        if r.id in seen:
            raise ctx.error("routes", i, "id", expected="a route id used once")
        seen.add(r.id)
        if r.upstream not in upstreams:
            raise ctx.error(
                "routes", i, "upstream", expected=f"one of the upstreams {sorted(upstreams)}"
            )
        if not r.public and not r.permission:
            raise ctx.error(
                "routes",
                i,
                "permission",
                expected="a permission, or public: true for anonymous routes",
            )
        if r.public and r.permission:
            raise ctx.error("routes", i, "permission", expected="no permission on a public route")
        params = {name for name, _ in template_params(r.path)}
        for key in ("object", "owner"):
            value = getattr(r, key)
            if value is not None and value not in params:
                raise ctx.error(
                    "routes", i, key, expected=f"a parameter of the path {sorted(params)}"
                )
        allowed = frozenset(n for n, role in roles.items() if r.permission in role.permissions)
        denied = frozenset(n for n, role in roles.items() if r.permission in role.denied)
        if r.permission and not allowed:
            raise ctx.error(
                "routes", i, "permission", expected="a permission that some role allows"
            )
        limits = []
        for j, limit in enumerate(r.limits):
            try:
                limits.append(
                    bucket_rule(f"route-{r.id}-{j}", limit.rate, limit.burst, limit.key, limit.mode)
                )
            except ValueError as exc:
                raise ctx.error("routes", i, "limits", j, "rate", expected=str(exc)) from None
        methods = set(r.methods)
        if "GET" in methods:
            methods.add("HEAD")
        routes.append(
            Route(
                id=r.id,
                methods=frozenset(methods),
                path=r.path,
                upstream=r.upstream,
                permission=r.permission,
                public=r.public,
                object_param=r.object,
                owner_param=r.owner,
                single_use=r.single_use,
                cost=r.cost,
                limits=tuple(limits),
                concurrent=r.concurrent,
                has_tenant="tenant" in params,
                allowed_roles=allowed,
                denied_roles=denied,
            )
        )
    return routes
