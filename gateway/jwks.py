"""Verification keys for JWTs from an issuer's JWKS endpoint.

:class:`JwksSource` fetches ``jwks_url`` from the policy, keeps the usable keys in memory
and answers "which key verifies a token with this ``kid`` and ``alg``?" without I/O on the
hot path (:meth:`JwksSource.key_now`). The rules, all of them security relevant:

- Only the configured URL is fetched (``http``/``https`` only), with a timeout, a 1 MiB cap
  on the body and redirects NOT followed (a 3xx is a failed fetch). Proxy settings and
  ``.netrc`` from the environment are ignored.
- Token headers never choose where keys come from: ``jku``, ``x5u``, ``jwk`` and ``x5c`` are
  never consulted here, and the caller must not honour them either. A ``kid`` is only ever a
  key of an in-memory dict lookup (no file, database or network access derives from it);
  a ``kid`` that is not a string of at most 256 characters is refused outright.
- Keys are refreshed in the background every ``refresh_interval``. An unknown ``kid``
  triggers at most one extra fetch per ``cooldown``, however many requests with random kids
  arrive, and every caller that asks while a fetch is under way shares that fetch.
- A failed fetch (network error, non-200, oversized body, invalid JSON, no usable key) keeps
  the last known-good keys, but only for ``max_staleness`` after the last successful fetch.
  Past that, or before any fetch succeeded, the source is *stale*: :class:`KeysUnavailable`
  is raised and the gateway must answer 503, never let a token through unverified.
- Only keys that fit the issuer's algorithms are kept: RS*/PS* -> ``kty`` RSA (at least 2048
  bits), ES256/ES384/ES512 -> ``kty`` EC on P-256/P-384/P-521, EdDSA -> ``kty`` OKP
  (Ed25519/Ed448). Symmetric (``oct``) keys are never taken from the network. Keys with a
  ``use`` other than ``sig``, a ``key_ops`` without ``verify``, private key members or an
  ``alg`` outside the issuer's algorithms are ignored. A key without ``kid`` is kept (under
  ``None``) only if it is the only usable key.
- A key is handed out only for a token ``alg`` it fits (type, curve, and the JWK's own
  ``alg`` if it names one): a ``kid`` naming an EC key for an RS256 token yields no key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

__all__ = ["MAX_KID_LENGTH", "MAX_RESPONSE_BYTES", "JwksSource", "KeysUnavailable"]

log = logging.getLogger("fairgate.jwks")

MAX_KID_LENGTH = 256
MAX_RESPONSE_BYTES = 1024 * 1024
MIN_RSA_BITS = 2048

# Token alg -> (kty, curves the key may be on; None for RSA, which has no curve).
_FAMILY: dict[str, tuple[str, frozenset[str] | None]] = {
    **{a: ("RSA", None) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
_EC_CURVES = {"P-256": "secp256r1", "P-384": "secp384r1", "P-521": "secp521r1"}
# Members that only a private (or symmetric) JWK has: such a key doesn't belong in a JWKS.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class KeysUnavailable(Exception):
    """No known-good keys: never fetched successfully, or stale beyond ``max_staleness``."""


@dataclass(frozen=True, slots=True)
class _Key:
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own "alg", if it names one
    key: Any

    def fits(self, alg: str) -> bool:
        family = _FAMILY.get(alg)
        if family is None or family[0] != self.kty:
            return False
        curves = family[1]
        if curves is not None and self.crv not in curves:
            return False
        return self.alg is None or self.alg == alg


class JwksSource:
    """Keys of one issuer's JWKS endpoint; see the module docstring."""

    def __init__(
        self,
        url: str,
        algorithms: Sequence[str],
        *,
        refresh_interval: float = 300,
        cooldown: float = 30,
        max_staleness: float = 3600,
        timeout: float = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("jwks_url must be an absolute http:// or https:// URL")
        if refresh_interval <= 0 or cooldown < 0 or max_staleness <= 0 or timeout <= 0:
            raise ValueError("refresh_interval, max_staleness and timeout must be positive")
        self._url = url
        self._algorithms = frozenset(algorithms)
        self._kinds = {_FAMILY[a] for a in self._algorithms if a in _FAMILY}
        self._refresh_interval = float(refresh_interval)
        self._cooldown = float(cooldown)
        self._max_staleness = float(max_staleness)
        self._timeout = float(timeout)
        self._clock = clock
        # Replaced as a whole on each successful fetch, never mutated: readers need no lock.
        self._keys: dict[str | None, tuple[_Key, ...]] = {}
        self._last_success: float | None = None
        self._last_demand: float | None = None  # when a kid-triggered fetch last started
        self._last_ok = False
        self._fetches = 0
        self._client: httpx.AsyncClient | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- public API -------------------------------------------------------------------------

    @property
    def fetches(self) -> int:
        """HTTP fetch attempts so far (successful or not)."""
        return self._fetches

    @property
    def last_success(self) -> float | None:
        """``clock()`` at the end of the last successful fetch, or None."""
        return self._last_success

    async def start(self) -> None:
        """Fetch once (a failure is not fatal) and start the background refresh."""
        if self._client is not None or self._closed:
            raise RuntimeError("JwksSource.start() may be called once")
        self._client = httpx.AsyncClient(
            timeout=self._timeout,
            follow_redirects=False,
            trust_env=False,
            headers={
                "accept": "application/jwk-set+json, application/json",
                "accept-encoding": "identity",
            },
        )
        await self._shared_fetch()
        self._loop_task = asyncio.create_task(self._refresh_loop(), name="fairgate-jwks-refresh")

    async def aclose(self) -> None:
        """Stop the background refresh and any fetch under way; close the HTTP client."""
        self._closed = True
        for task in (self._loop_task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop_task = self._inflight = None
        if self._client is not None:
            await self._client.aclose()

    def key_now(self, kid: str | None, alg: str) -> Any | None:
        """The key for ``kid``/``alg`` from memory, without I/O.

        None if the kid is unknown (then await :meth:`get_key`) or names a key that doesn't
        fit ``alg``; raises :class:`KeysUnavailable` if the keys are stale or there are none.
        """
        if not self._acceptable(kid, alg):
            return None
        self._check_fresh()
        return self._lookup(kid, alg)[1]

    async def get_key(self, kid: str | None, alg: str) -> Any | None:
        """Like :meth:`key_now`, but an unknown kid (or stale keys) may cause one refetch.

        At most one such refetch starts per ``cooldown``; callers arriving while any fetch is
        under way wait for that one. None if the kid is still unknown afterwards.
        """
        if not self._acceptable(kid, alg):
            return None
        if not self._stale():
            known, key = self._lookup(kid, alg)
            if known:
                return key
        task = self._inflight
        if task is None or task.done():
            now = self._clock()
            if self._last_demand is None or now - self._last_demand >= self._cooldown:
                self._last_demand = now
                task = self._start_fetch()
            else:
                task = None
        if task is not None:
            # asyncio.wait neither raises the task's outcome nor cancels it if we're cancelled.
            await asyncio.wait((task,))
        self._check_fresh()
        return self._lookup(kid, alg)[1]

    # -- lookup -----------------------------------------------------------------------------

    def _acceptable(self, kid: object, alg: object) -> bool:
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH):
            return False
        return isinstance(alg, str) and alg in self._algorithms and alg in _FAMILY

    def _stale(self) -> bool:
        last = self._last_success
        return last is None or not self._keys or self._clock() - last > self._max_staleness

    def _check_fresh(self) -> None:
        if self._stale():
            raise KeysUnavailable("no JWKS keys fetched within the allowed staleness")

    def _lookup(self, kid: str | None, alg: str) -> tuple[bool, Any | None]:
        """(is the kid known at all, the one key under it that fits ``alg`` or None)."""
        entries = self._keys.get(kid)
        if entries is None:
            return False, None
        fitting = [e for e in entries if e.fits(alg)]
        # Two keys that both fit under one kid are ambiguous: use neither.
        return True, fitting[0].key if len(fitting) == 1 else None

    # -- fetching ---------------------------------------------------------------------------

    def _start_fetch(self) -> asyncio.Task[bool]:
        task = asyncio.create_task(self._fetch(), name="fairgate-jwks-fetch")
        self._inflight = task
        return task

    async def _shared_fetch(self) -> bool:
        task = self._inflight
        if task is None or task.done():
            task = self._start_fetch()
        await asyncio.wait((task,))
        return not task.cancelled() and task.exception() is None and task.result()

    async def _refresh_loop(self) -> None:
        while not self._closed:
            # After a failure, retry sooner than the regular interval (but not in a hot loop).
            delay = self._refresh_interval
            if not self._last_ok:
                delay = min(delay, max(self._cooldown, 1.0))
            await asyncio.sleep(delay)
            await self._shared_fetch()

    async def _fetch(self) -> bool:
        client = self._client
        if client is None or self._closed:
            return False
        self._fetches += 1
        try:
            body = await self._get(client)
            keys = self._parse(body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._last_ok = False
            log.warning("JWKS fetch from %s failed, keeping previous keys: %s", self._url, exc)
            return False
        self._keys = keys
        self._last_success = self._clock()
        self._last_ok = True
        return True

    async def _get(self, client: httpx.AsyncClient) -> bytes:
        async with client.stream("GET", self._url) as response:
            if response.status_code != 200:
                raise ValueError(f"status {response.status_code}")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise ValueError(f"unexpected content-encoding {encoding!r}")
            length = response.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_RESPONSE_BYTES):
                raise ValueError("response too large")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise ValueError("response too large")
                chunks.append(chunk)
        return b"".join(chunks)

    # -- parsing ----------------------------------------------------------------------------

    def _parse(self, body: bytes) -> dict[str | None, tuple[_Key, ...]]:
        document = json.loads(body)
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError('not a JWK set (an object with a "keys" list)')
        parsed: list[tuple[str | None, _Key]] = []
        for jwk in document["keys"]:
            entry = self._parse_key(jwk)
            if entry is not None:
                parsed.append(entry)
        if not parsed:
            raise ValueError("no usable signing key for the configured algorithms")
        keys: dict[str | None, tuple[_Key, ...]] = {}
        if len(parsed) == 1:
            kid, key = parsed[0]
            keys[kid] = (key,)
            return keys
        for kid, key in parsed:
            if kid is not None:  # several keys: a kid-less one can't be told apart
                keys[kid] = (*keys.get(kid, ()), key)
        if not keys:
            raise ValueError("no usable signing key with a kid")
        return keys

    def _parse_key(self, jwk: object) -> tuple[str | None, _Key] | None:
        try:
            return self._parse_key_unchecked(jwk)
        except Exception:
            return None

    def _parse_key_unchecked(self, jwk: object) -> tuple[str | None, _Key] | None:
        if not isinstance(jwk, Mapping):
            return None
        kty, crv, kid = jwk.get("kty"), jwk.get("crv"), jwk.get("kid")
        use, ops, alg = jwk.get("use"), jwk.get("key_ops"), jwk.get("alg")
        if not isinstance(kty, str) or _PRIVATE_MEMBERS.intersection(jwk):
            return None
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH):
            return None
        if use is not None and use != "sig":
            return None
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            return None
        if alg is not None and (alg not in self._algorithms or alg not in _FAMILY):
            return None
        if kty != "RSA" and not isinstance(crv, str):
            return None
        curve = crv if kty != "RSA" else None
        if not any(k == kty and (c is None or curve in c) for k, c in self._kinds):
            return None
        data = dict(jwk)
        key: Any
        if kty == "RSA":
            key = RSAAlgorithm.from_jwk(data)
            if not isinstance(key, RSAPublicKey) or key.key_size < MIN_RSA_BITS:
                return None
        elif kty == "EC":
            key = ECAlgorithm.from_jwk(data)
            if not isinstance(key, EllipticCurvePublicKey) or key.curve.name != _EC_CURVES.get(
                str(crv)
            ):
                return None
        elif kty == "OKP":
            key = OKPAlgorithm.from_jwk(data)
            expected = Ed25519PublicKey if crv == "Ed25519" else Ed448PublicKey
            if not isinstance(key, expected):
                return None
        else:
            return None
        entry = _Key(kty=kty, crv=curve, alg=alg if isinstance(alg, str) else None, key=key)
        if entry.alg is not None and not entry.fits(entry.alg):
            return None  # e.g. an RSA key that says "alg": "ES256"
        return kid, entry
