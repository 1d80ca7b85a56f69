"""Authentication: JWT bearer tokens verified with PyJWT.

Algorithms, issuers, audiences and keys come from the policy, never from the
token: the token's header only picks among what the policy allows. Verified
tokens are cached by a hash of the token until their ``exp``, because a
signature check costs tens of microseconds and clients reuse tokens.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from gateway.decision import Decision, deny
from gateway.jwks import JwksSource, KeysUnavailable
from gateway.policy.model import Issuer, Policy
from gateway.state import IdentityState

CHALLENGE = (b"www-authenticate", b'Bearer realm="fairgate"')
INVALID = (b"www-authenticate", b'Bearer realm="fairgate", error="invalid_token"')
_SAFE = re.compile(r"^[A-Za-z0-9._@:+=~-]{1,256}$")


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    tenant: str
    roles: tuple[str, ...]
    plan: str | None
    session: str | None
    jti: str | None
    expires: float
    # When the token stops being accepted at all (exp + the issuer's leeway):
    # a single-use marker must outlive the token, not just its exp.
    usable_until: float = 0.0
    # "tenant/subject": the key that limits, detectors and bans count by, since
    # one subject name may exist in two tenants.
    key: str = ""
    # The identity headers for the upstream, encoded once per verified token
    # (the cache then serves them to every request that token makes).
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def make(
        cls,
        subject: str,
        tenant: str,
        roles: tuple[str, ...],
        plan: str | None,
        session: str | None,
        jti: str | None,
        expires: float,
        usable_until: float,
    ) -> Identity:
        headers = [
            (b"x-fairgate-subject", subject.encode()),
            (b"x-fairgate-tenant", tenant.encode()),
            (b"x-fairgate-roles", ",".join(roles).encode()),
        ]
        if plan:
            headers.append((b"x-fairgate-plan", plan.encode()))
        return cls(
            subject,
            tenant,
            roles,
            plan,
            session,
            jti,
            expires,
            usable_until,
            f"{tenant}/{subject}",
            tuple(headers),
        )


class Authenticator:
    def __init__(
        self, policy: Policy, state: IdentityState, jwks: JwksRegistry | None = None
    ) -> None:
        self._jwks = JwksRegistry() if jwks is None else jwks
        self._issuers = {i.issuer: i for i in policy.issuers}
        self._claims = policy.claims
        self._default_plan = policy.default_plan
        self._plans = policy.plans
        self._required = sorted(
            {"exp", "iat", "iss", "aud", policy.claims.subject, policy.claims.tenant}
        )
        self._cache: dict[bytes, Identity] = {}
        self._cache_size = policy.token_cache_size
        self.query_name = (policy.query_token or "access_token").encode()
        self._cookie_name = (policy.cookie_token or "access_token").encode()
        self._query_on = policy.query_token is not None
        self._cookie_on = policy.cookie_token is not None
        self.state = state

    def extract(
        self, headers: Sequence[tuple[bytes, bytes]], query: bytes
    ) -> tuple[bytes | None, str] | Decision:
        """The one token of a request and where it came from, or a refusal.

        Two tokens are refused even when they agree: a client that sends
        several is confused or probing which one a layer believes.
        """
        values: list[bytes] = []
        cookies: list[bytes] = []
        for name, value in headers:  # one pass: this runs on every request
            if name == b"authorization":
                values.append(value)
            elif name == b"cookie":
                cookies.append(value)
        if len(values) > 1:
            return deny("bad_request", "Send one Authorization header, not several.")
        found: list[tuple[bytes, str]] = []
        if values:
            scheme, _, token = values[0].partition(b" ")
            token = token.strip()
            if scheme.lower() != b"bearer" or not token:
                return deny("unauthenticated", "Use the Bearer scheme.", headers=(CHALLENGE,))
            found.append((token, "header"))
        if query and self.query_name + b"=" in query:
            for pair in query.split(b"&"):
                name, _, value = pair.partition(b"=")
                if name == self.query_name:
                    found.append((value, "query"))
        for value in cookies:
            if self._cookie_name + b"=" in value:
                for crumb in value.split(b";"):
                    key, _, token = crumb.strip().partition(b"=")
                    if key == self._cookie_name:
                        found.append((token, "cookie"))
        if len(found) > 1:
            return deny("bad_request", "Send one token, in the Authorization header.")
        if not found:
            return None, ""
        token, source = found[0]
        if (source == "query" and not self._query_on) or (
            source == "cookie" and not self._cookie_on
        ):
            return None, ""
        return token, source

    async def authenticate(self, token: bytes, network: str, now: float) -> Identity | Decision:
        """Verify ``token`` (cached), honouring revocation and lockouts."""
        state = self.state
        key = hashlib.sha256(token).digest()
        identity = self._cache.get(key)
        if identity is not None and identity.expires <= now:
            del self._cache[key]
            identity = None
        if identity is None:
            claimed = claimed_subject(token)
            net_key = f"net:{network}"
            keys = (net_key, f"sub:{claimed}") if claimed else (net_key,)
            # A subject under attack takes no new tokens until the block ends
            # (tokens already verified keep working: they are in the cache).
            wait = state.blocked_for(keys[1:], now)
            if wait:
                return too_many_failures(wait)
            result = await self._verify(token, now)
            if isinstance(result, Decision):
                if result.reason == "unauthenticated":
                    # A blocked network gets 429 for every further failure. Its
                    # valid tokens still pass: a good signature is not brute
                    # force, and one attacker behind a shared NAT must not lock
                    # out the rest of it.
                    wait = state.blocked_for((net_key,), now)
                    state.record_failure(keys, now)
                    if wait:
                        return too_many_failures(wait)
                return result
            identity = result
            if self._cache_size:
                if len(self._cache) >= self._cache_size:
                    # Drop the oldest entry: dicts keep insertion order.
                    del self._cache[next(iter(self._cache))]
                self._cache[key] = identity
        if identity.jti is not None and state.is_revoked(identity.jti, now):
            return _invalid("The token has been revoked.")
        return identity

    async def _verify(self, token: bytes, now: float) -> Identity | Decision:
        issuer = self._issuer_of(token)
        if issuer is None:
            return _invalid("The token's issuer is not trusted here.")
        try:
            header = jwt.get_unverified_header(token)
        except Exception:
            return _invalid("The token could not be verified.")
        if "crit" in header:
            # RFC 7515 4.1.11: a recipient that does not understand a critical
            # extension must reject the token; Fairgate understands none.
            return _invalid("The token has critical header parameters.")
        alg = header.get("alg")
        if alg not in issuer.algorithms:
            return _invalid("The token's algorithm is not accepted here.")
        key: Any = issuer.key
        if issuer.jwks_url is not None:
            key = await self._jwks_key(issuer, header.get("kid"), alg)
            if isinstance(key, Decision):
                return key
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(issuer.audiences),
                issuer=issuer.issuer,
                leeway=issuer.leeway,
                options={"require": self._required, "verify_signature": True, "strict_aud": False},
            )
        except jwt.ExpiredSignatureError:
            return _invalid("The token has expired.")
        except jwt.ImmatureSignatureError:
            return _invalid("The token is not valid yet.")
        except jwt.InvalidAudienceError:
            return _invalid("The token is for another audience.")
        except jwt.InvalidIssuerError:
            return _invalid("The token's issuer is not trusted here.")
        except jwt.MissingRequiredClaimError as exc:
            return _invalid(f"The token lacks the {exc.claim!r} claim.")
        except Exception:
            # Hostile tokens reach odd corners of any decoder (huge numbers,
            # wrong types): every failure to verify is a 401, never a 500.
            return _invalid("The token could not be verified.")
        return self._identity(claims, now, issuer.leeway)

    async def _jwks_key(self, issuer: Issuer, kid: object, alg: str) -> Any:
        """The issuer's JWKS key for ``kid``; a refusal when unknown or stale.

        Only ``kid`` and ``alg`` of the header are read: ``jku``, ``x5u`` and
        ``jwk`` would let the token name its own key, so they are ignored.
        """
        source = self._jwks.source(issuer)
        if kid is not None and not isinstance(kid, str):
            return _invalid("The token's key id is malformed.")
        try:
            key = source.key_now(kid, alg)
        except KeysUnavailable:
            key = None
        if key is None:
            try:
                await self._jwks.ensure_started(source)
                key = await source.get_key(kid, alg)
            except KeysUnavailable:
                # Never fall back to accepting a token we cannot check.
                return deny(
                    "auth_unavailable", "The token issuer's keys are unavailable.", retry_after=5
                )
        if key is None:
            return _invalid("The token's key is not known.")
        return key

    def _issuer_of(self, token: bytes) -> Issuer | None:
        if len(self._issuers) == 1:
            return next(iter(self._issuers.values()))
        try:
            payload = token.split(b".")[1]
            claims = orjson.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
            iss = claims.get("iss") if isinstance(claims, dict) else None
            return self._issuers.get(iss) if isinstance(iss, str) else None
        except Exception:
            return None

    def _identity(self, claims: dict[str, Any], now: float, leeway: float) -> Identity | Decision:
        c = self._claims
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name, 0)
            # PyJWT reads "exp": "1800000000" as a number; RFC 7519 says NumericDate.
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (-1e12 < value < 1e12)
            ):
                return _invalid(f"The token's {name} claim must be a plausible number.")
        subject, tenant = claims.get(c.subject), claims.get(c.tenant)
        roles = claims.get(c.roles, [])
        if not isinstance(subject, str) or not subject or not isinstance(tenant, str) or not tenant:
            return _invalid("The token's subject and tenant must be non-empty strings.")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            return _invalid("The token's roles must be a list of strings.")
        plan = claims.get(c.plan, self._default_plan)
        if plan is not None and (
            not isinstance(plan, str) or (self._plans and plan not in self._plans)
        ):
            return _invalid("The token names an unknown plan.")
        # These values travel upstream as identity headers: a CR, LF or comma
        # in them would forge headers or roles, however well signed.
        # fullmatch: with match, "$" would also accept a trailing newline.
        if not all(
            _SAFE.fullmatch(v) for v in (subject, tenant, *roles, *([plan] if plan else []))
        ):
            return _invalid("The token's identity claims hold characters not allowed.")
        session, jti = claims.get(c.session), claims.get("jti")
        exp = claims["exp"]
        return Identity.make(
            subject=subject,
            tenant=tenant,
            roles=tuple(roles),
            plan=plan,
            session=session if isinstance(session, str) else None,
            jti=jti if isinstance(jti, str) else None,
            expires=float(exp),
            usable_until=float(exp) + leeway,
        )


class JwksRegistry:
    """One ``JwksSource`` per JWKS issuer, kept across policy reloads and
    started on first use (or at server start-up by ``start_all``)."""

    def __init__(self) -> None:
        self._sources: dict[tuple[str, str], JwksSource] = {}
        self._starting: dict[int, asyncio.Task[None]] = {}

    def source(self, issuer: Issuer) -> JwksSource:
        assert issuer.jwks_url is not None
        key = (issuer.issuer, issuer.jwks_url)
        found = self._sources.get(key)
        if found is None:
            found = self._sources[key] = JwksSource(
                issuer.jwks_url,
                issuer.algorithms,
                refresh_interval=issuer.jwks_refresh,
                cooldown=issuer.jwks_cooldown,
                max_staleness=issuer.jwks_max_staleness,
            )
        return found

    async def ensure_started(self, source: JwksSource) -> None:
        task = self._starting.get(id(source))
        if task is None:
            task = self._starting[id(source)] = asyncio.ensure_future(source.start())
        await asyncio.shield(task)

    async def start_all(self, issuers: Sequence[Issuer]) -> None:
        for issuer in issuers:
            if issuer.jwks_url is not None:
                await self.ensure_started(self.source(issuer))

    async def aclose(self) -> None:
        for source in self._sources.values():
            await source.aclose()
        self._sources.clear()
        self._starting.clear()


def too_many_failures(wait: float) -> Decision:
    return deny(
        "too_many_failures",
        "Too many failed authentications; try again later.",
        retry_after=max(1, math.ceil(wait)),
        rule="auth.lockout",
    )


def claimed_subject(token: bytes) -> str | None:
    """The unverified ``sub`` of a token, only to count failures against it."""
    try:
        payload = token.split(b".")[1]
        if len(payload) > 8192:
            return None
        claims = orjson.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    except Exception:
        return None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub[:128] if isinstance(sub, str) and sub else None


def _invalid(detail: str) -> Decision:
    return deny("unauthenticated", detail, headers=(INVALID,))
