"""JwksSource against a real JWKS server on loopback (asyncio.start_server, raw HTTP/1.1).

Time that matters (cool-down, staleness) runs on an injected clock; the server's key set and
behaviour (ok / 500 / dropped connection / garbage / oversized / redirect / hang) are
switched by the test.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.jwks import MAX_KID_LENGTH, MAX_RESPONSE_BYTES, JwksSource, KeysUnavailable

RSA_ALGS = ["RS256", "PS256"]
Factory = Callable[..., Awaitable[JwksSource]]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class JwksServer:
    """A loopback HTTP server whose key set and failure mode the test controls."""

    def __init__(self) -> None:
        self.keys: list[Any] = []  # JWKs, and whatever junk a test wants served
        self.mode = "ok"
        self.delay = 0.0
        self.hits = 0
        self._server: asyncio.Server | None = None
        self._hang = asyncio.Event()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/.well-known/jwks.json"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def stop(self) -> None:
        self._hang.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.hits += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            # A redirect target that would serve the keys, were the redirect followed.
            mode = "ok" if b"followed" in head.split(b"\r\n", 1)[0] else self.mode
            if mode == "close":
                return
            if mode == "hang":
                await self._hang.wait()
                return
            if mode == "chunked_big":
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                )
                # A valid JWKS padded with whitespace past the cap, with no Content-Length.
                body = json.dumps({"keys": self.keys}).encode()
                body = body[:-1] + b" " * (MAX_RESPONSE_BYTES + 10) + body[-1:]
                for i in range(0, len(body), 65536):
                    part = body[i : i + 65536]
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                return
            status, extra, body = "200 OK", b"", json.dumps({"keys": self.keys}).encode()
            if mode == "500":
                status, body = "500 Internal Server Error", b"oops"
            elif mode == "garbage":
                body = b"<html>not json{"
            elif mode == "not_a_set":
                body = b'{"keys": "nope"}'
            elif mode == "big":
                body = body[:-1] + b" " * MAX_RESPONSE_BYTES + body[-1:]
            elif mode == "redirect":
                status, body = "302 Found", b""
                extra = b"location: /.well-known/jwks.json?followed\r\n"
            writer.write(
                b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"%sconnection: close\r\n\r\n" % (status.encode(), len(body), extra)
            )
            writer.write(body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def _jwk(to_jwk: Callable[..., Any], public: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = to_jwk(public, as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(extra)
    return jwk


def rsa_jwk(private: rsa.RSAPrivateKey, kid: str | None, **extra: Any) -> dict[str, Any]:
    return _jwk(RSAAlgorithm.to_jwk, private.public_key(), kid, **{"use": "sig", **extra})


def ec_jwk(private: ec.EllipticCurvePrivateKey, kid: str | None, **extra: Any) -> dict[str, Any]:
    return _jwk(ECAlgorithm.to_jwk, private.public_key(), kid, **{"use": "sig", **extra})


def token(private: Any, kid: str | None, alg: str) -> str:
    headers = {"kid": kid} if kid is not None else {}
    claims = {"sub": "alice", "iss": "https://idp.test", "exp": int(time.time()) + 60}
    return jwt.encode(claims, private, algorithm=alg, headers=headers)


def verifies(tok: str, key: Any, alg: str) -> bool:
    try:
        jwt.decode(tok, key, algorithms=[alg], issuer="https://idp.test")
    except jwt.InvalidTokenError:
        return False
    return True


async def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
    }


@pytest.fixture
async def server(keys: dict[str, Any]) -> AsyncIterator[JwksServer]:
    srv = JwksServer()
    srv.keys = [rsa_jwk(keys["rsa1"], "r1"), ec_jwk(keys["p256"], "e1")]
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def opened() -> AsyncIterator[list[JwksSource]]:
    created: list[JwksSource] = []
    yield created
    for src in created:
        await src.aclose()


@pytest.fixture
def source_factory(server: JwksServer, clock: Clock, opened: list[JwksSource]) -> Factory:
    async def make(algorithms: list[str] | None = None, **kwargs: Any) -> JwksSource:
        kwargs.setdefault("clock", clock)
        src = JwksSource(server.url, algorithms or [*RSA_ALGS, "ES256", "ES384"], **kwargs)
        opened.append(src)
        await src.start()
        return src

    return make


# -- basic fetch and verification -------------------------------------------------------------


async def test_initial_fetch_and_verify(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any], clock: Clock
) -> None:
    src = await source_factory()
    assert src.fetches == 1 and server.hits == 1
    assert src.last_success == clock.t
    for alg in RSA_ALGS:
        key = src.key_now("r1", alg)
        assert key is not None
        assert verifies(token(keys["rsa1"], "r1", alg), key, alg)
        # A token signed by someone else's key doesn't verify with it.
        assert not verifies(token(keys["rsa2"], "r1", alg), key, alg)
    ec_key = await src.get_key("e1", "ES256")
    assert ec_key is not None and verifies(token(keys["p256"], "e1", "ES256"), ec_key, "ES256")
    assert src.fetches == 1  # known kids never cause a fetch


async def test_eddsa_keys(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any]
) -> None:
    server.keys = [_jwk(OKPAlgorithm.to_jwk, keys["ed"].public_key(), "ed1")]
    src = await source_factory(["EdDSA"])
    key = src.key_now("ed1", "EdDSA")
    assert key is not None and verifies(token(keys["ed"], "ed1", "EdDSA"), key, "EdDSA")


# -- rotation ---------------------------------------------------------------------------------


async def test_rotation_new_kid_one_refetch(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any]
) -> None:
    src = await source_factory()
    server.keys = [*server.keys, rsa_jwk(keys["rsa2"], "r2")]
    assert src.key_now("r2", "RS256") is None  # the sync path never fetches
    assert src.fetches == 1
    key = await src.get_key("r2", "RS256")
    assert src.fetches == 2
    assert key is not None and verifies(token(keys["rsa2"], "r2", "RS256"), key, "RS256")
    assert src.key_now("r2", "RS256") is key
    assert src.key_now("r1", "RS256") is not None


async def test_concurrent_callers_share_one_fetch(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any]
) -> None:
    src = await source_factory()
    server.keys = [*server.keys, rsa_jwk(keys["rsa2"], "r2")]
    server.delay = 0.1
    results = await asyncio.gather(*(src.get_key("r2", "RS256") for _ in range(50)))
    assert src.fetches == 2 and server.hits == 2
    assert all(r is not None for r in results)
    assert verifies(token(keys["rsa2"], "r2", "RS256"), results[0], "RS256")


async def test_background_refresh_drops_removed_kid(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any]
) -> None:
    src = await source_factory(refresh_interval=0.05)
    assert src.key_now("r1", "RS256") is not None
    server.keys = [rsa_jwk(keys["rsa2"], "r2")]
    await wait_for(lambda: src.key_now("r1", "RS256") is None)
    key = src.key_now("r2", "RS256")
    assert key is not None and verifies(token(keys["rsa2"], "r2", "RS256"), key, "RS256")
    assert src.fetches >= 2


async def test_aclose_stops_background_refresh(source_factory: Factory) -> None:
    src = await source_factory(refresh_interval=0.02)
    await wait_for(lambda: src.fetches >= 3)
    await src.aclose()
    count = src.fetches
    await asyncio.sleep(0.1)
    assert src.fetches == count


# -- the random-kid flood ---------------------------------------------------------------------


async def test_flood_of_random_kids_one_fetch_per_cooldown(
    source_factory: Factory, server: JwksServer, clock: Clock
) -> None:
    src = await source_factory()
    server.delay = 0.05  # keep the fetch in flight while the flood arrives
    kids = [secrets.token_urlsafe(16) for _ in range(200)]
    results = await asyncio.gather(*(src.get_key(k, "RS256") for k in kids))
    assert results == [None] * 200
    assert src.fetches == 2 and server.hits == 2
    # After that fetch, still inside the cool-down: no more fetches at all.
    for k in kids:
        assert await src.get_key(k + "x", "RS256") is None
    clock.advance(29.9)
    assert await src.get_key("another", "RS256") is None
    assert src.fetches == 2 and server.hits == 2
    # Past the cool-down, one more is allowed, then the door closes again.
    clock.advance(0.2)
    results = await asyncio.gather(*(src.get_key(k, "RS256") for k in kids))
    assert results == [None] * 200
    assert src.fetches == 3 and server.hits == 3
    # The known key kept working through all of it.
    assert src.key_now("r1", "RS256") is not None


async def test_oversized_kid_is_refused_without_fetch(
    source_factory: Factory, server: JwksServer
) -> None:
    src = await source_factory()
    long_kid = "k" * (MAX_KID_LENGTH + 1)
    assert src.key_now(long_kid, "RS256") is None
    assert await src.get_key(long_kid, "RS256") is None
    assert await src.get_key("x" * 100_000, "RS256") is None
    assert await src.get_key(123, "RS256") is None  # type: ignore[arg-type]
    assert src.fetches == 1 and server.hits == 1
    # The longest allowed kid is an ordinary unknown kid.
    assert await src.get_key("k" * MAX_KID_LENGTH, "RS256") is None
    assert src.fetches == 2


async def test_path_like_kid_is_only_a_lookup(source_factory: Factory, server: JwksServer) -> None:
    src = await source_factory()
    for kid in ("../../etc/passwd", "http://evil.test/jwks", "' OR 1=1 --", "\x00"):
        assert await src.get_key(kid, "RS256") is None
    assert server.hits == 2  # one cool-down-limited refetch to the configured URL, nothing else


# -- key type vs. token algorithm -------------------------------------------------------------


async def test_kid_of_other_key_type_gives_no_key(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any]
) -> None:
    src = await source_factory()
    assert src.key_now("e1", "RS256") is None
    assert await src.get_key("e1", "RS256") is None
    assert await src.get_key("e1", "PS256") is None
    assert await src.get_key("e1", "ES384") is None  # P-256 key, P-384 algorithm
    assert await src.get_key("r1", "ES256") is None
    assert src.fetches == 1  # a known kid of the wrong type never triggers a refetch
    # An algorithm the issuer doesn't allow gets nothing, even for a fitting key.
    assert await src.get_key("r1", "RS512") is None
    assert await src.get_key("r1", "HS256") is None
    assert await src.get_key("r1", "none") is None


async def test_only_key_types_of_the_issuers_algorithms_are_kept(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any]
) -> None:
    server.keys = [
        rsa_jwk(keys["rsa1"], "r1"),
        ec_jwk(keys["p256"], "e1"),
        ec_jwk(keys["p384"], "e2"),
        {"kty": "oct", "kid": "h1", "k": "c2VjcmV0"},
    ]
    src = await source_factory(["ES256"])
    key = src.key_now("e1", "ES256")
    assert key is not None and verifies(token(keys["p256"], "e1", "ES256"), key, "ES256")
    assert src.key_now("r1", "ES256") is None
    assert src.key_now("e2", "ES256") is None
    assert src.key_now("h1", "ES256") is None
    assert src._keys.keys() == {"e1"}  # white-box: the others were not even stored


async def test_ignored_keys(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any]
) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private_jwk = RSAAlgorithm.to_jwk(keys["rsa2"], as_dict=True)
    server.keys = [
        rsa_jwk(keys["rsa1"], "r1"),
        rsa_jwk(keys["rsa2"], "enc", use="enc"),
        rsa_jwk(keys["rsa2"], "ops", key_ops=["encrypt"]),
        rsa_jwk(keys["rsa2"], "alg", alg="ES256"),
        rsa_jwk(keys["rsa2"], "alg512", alg="RS512"),
        rsa_jwk(weak, "weak"),
        {**private_jwk, "kid": "private"},
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        "not a key",
        rsa_jwk(keys["rsa2"], None),  # no kid among several keys
    ]
    src = await source_factory()
    assert src._keys.keys() == {"r1"}
    for kid in ("enc", "ops", "alg", "alg512", "weak", "private", "broken", None):
        assert src.key_now(kid, "RS256") is None


async def test_jwk_alg_restricts_the_key(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any]
) -> None:
    server.keys = [rsa_jwk(keys["rsa1"], "r1", alg="PS256")]
    src = await source_factory()
    assert src.key_now("r1", "RS256") is None
    key = src.key_now("r1", "PS256")
    assert key is not None and verifies(token(keys["rsa1"], "r1", "PS256"), key, "PS256")


async def test_kidless_key_only_if_alone(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any]
) -> None:
    server.keys = [rsa_jwk(keys["rsa1"], None), rsa_jwk(keys["rsa2"], "enc", use="enc")]
    src = await source_factory()
    key = src.key_now(None, "RS256")
    assert key is not None and verifies(token(keys["rsa1"], None, "RS256"), key, "RS256")
    assert src.key_now("anything", "RS256") is None


async def test_duplicate_kid_of_same_type_is_ambiguous(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any]
) -> None:
    server.keys = [rsa_jwk(keys["rsa1"], "same"), rsa_jwk(keys["rsa2"], "same")]
    src = await source_factory()
    assert src.key_now("same", "RS256") is None


# -- failures and staleness -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["500", "close"])
async def test_endpoint_down_keeps_keys_until_max_staleness(
    source_factory: Factory,
    server: JwksServer,
    keys: dict[str, Any],
    clock: Clock,
    mode: str,
) -> None:
    src = await source_factory()
    good = clock.t
    server.mode = mode
    clock.advance(31)
    assert await src.get_key("new", "RS256") is None  # the refetch fails
    assert src.fetches == 2 and src.last_success == good
    tok = token(keys["rsa1"], "r1", "RS256")
    clock.t = good + 3600  # exactly max_staleness: still usable
    key = src.key_now("r1", "RS256")
    assert key is not None and verifies(tok, key, "RS256")
    assert await src.get_key("r1", "RS256") is key
    clock.advance(0.001)
    with pytest.raises(KeysUnavailable):
        src.key_now("r1", "RS256")
    with pytest.raises(KeysUnavailable):
        await src.get_key("r1", "RS256")  # tries one (failing) refetch first
    assert src.fetches == 3
    with pytest.raises(KeysUnavailable):
        await src.get_key("unknown", "RS256")  # within the cool-down: no fetch
    assert src.fetches == 3

    # Recovery: the endpoint comes back; the next allowed fetch restores service.
    server.mode = "ok"
    clock.advance(30)
    key = await src.get_key("r1", "RS256")
    assert src.fetches == 4 and src.last_success == clock.t
    assert key is not None and verifies(tok, key, "RS256")
    assert src.key_now("r1", "RS256") is key


async def test_initial_failure_is_not_fatal_and_recovers(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any], clock: Clock
) -> None:
    server.mode = "500"
    src = await source_factory()
    assert src.fetches == 1 and src.last_success is None
    with pytest.raises(KeysUnavailable):
        src.key_now("r1", "RS256")
    with pytest.raises(KeysUnavailable):
        await src.get_key("r1", "RS256")
    server.mode = "ok"
    clock.advance(30)
    key = await src.get_key("r1", "RS256")
    assert key is not None and verifies(token(keys["rsa1"], "r1", "RS256"), key, "RS256")


async def test_background_retries_after_failure(
    source_factory: Factory, server: JwksServer
) -> None:
    server.mode = "close"
    src = await source_factory(refresh_interval=0.05, cooldown=0)
    server.mode = "ok"
    await wait_for(lambda: src.last_success is not None)
    assert src.key_now("r1", "RS256") is not None


@pytest.mark.parametrize("mode", ["garbage", "not_a_set", "big", "chunked_big", "redirect"])
async def test_bad_responses_keep_old_keys(
    source_factory: Factory,
    server: JwksServer,
    keys: dict[str, Any],
    clock: Clock,
    mode: str,
) -> None:
    src = await source_factory()
    good = src.last_success
    # Even a new key in the set is not taken from a bad response.
    server.keys = [rsa_jwk(keys["rsa2"], "r2")]
    server.mode = mode
    clock.advance(30)
    assert await src.get_key("r2", "RS256") is None
    assert src.fetches == 2 and src.last_success == good
    key = src.key_now("r1", "RS256")
    assert key is not None and verifies(token(keys["rsa1"], "r1", "RS256"), key, "RS256")


async def test_set_without_usable_keys_keeps_old_keys(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any], clock: Clock
) -> None:
    src = await source_factory()
    server.keys = [rsa_jwk(keys["rsa2"], "enc", use="enc")]
    clock.advance(30)
    assert await src.get_key("enc", "RS256") is None
    assert src.fetches == 2 and src.last_success == 1000.0
    assert src.key_now("r1", "RS256") is not None


async def test_response_just_under_cap_is_accepted(
    source_factory: Factory, server: JwksServer, keys: dict[str, Any]
) -> None:
    body_len = len(json.dumps({"keys": server.keys}))
    server.keys = [*server.keys, {"kty": "none", "pad": "x" * (MAX_RESPONSE_BYTES - body_len - 40)}]
    src = await source_factory()
    assert src.last_success is not None and src.key_now("r1", "RS256") is not None


async def test_timeout(source_factory: Factory, server: JwksServer) -> None:
    server.mode = "hang"
    started = time.monotonic()
    src = await source_factory(timeout=0.2)
    assert time.monotonic() - started < 2
    assert src.fetches == 1 and src.last_success is None


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://idp.test/jwks", "/jwks.json", "https://", "gopher://x/"]
)
def test_only_http_urls(url: str) -> None:
    with pytest.raises(ValueError):
        JwksSource(url, ["RS256"])


def test_not_started_is_unavailable() -> None:
    src = JwksSource("https://idp.test/jwks", ["RS256"])
    assert src.fetches == 0 and src.last_success is None
    with pytest.raises(KeysUnavailable):
        src.key_now("r1", "RS256")
