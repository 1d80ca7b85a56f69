"""ATTACKS.md 3, 5 and 16: a JWKS issuer under attack, with a real JWKS
server on loopback whose keys the test rotates and whose availability it
toggles."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.responses import JSONResponse, Response

from gateway.policy import load_policy_text
from gateway.proxy import Gateway
from tests.conftest import Stack
from tests.support import wait_for

ISS, AUD = "https://id.fairgate.example", "crm-voip-api"


@dataclass
class JwksServer:
    keys: list[dict[str, Any]] = field(default_factory=list)
    up: bool = True
    hits: int = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.hits += 1
        response: Response
        if self.up:
            response = JSONResponse({"keys": self.keys})
        else:
            response = Response("down", status_code=503)
        await response(scope, receive, send)


def public_jwk(key: Any, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    else:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, use="sig")
    return dict(jwk)


@dataclass
class JwksGateway:
    port: int
    jwks: JwksServer
    rsa_key: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey

    def call(self, token: str) -> httpx.Response:
        return httpx.get(
            f"http://127.0.0.1:{self.port}/crm/v1/acme/echo",
            headers={"Authorization": f"Bearer {token}"},
        )


def claims() -> dict[str, object]:
    now = int(time.time())
    return {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "tenant": "acme",
        "roles": ["agent"],
        "iat": now,
        "exp": now + 600,
    }


def make_gateway(stack: Stack, *, cooldown: str, staleness: str) -> JwksGateway:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    server = JwksServer(keys=[public_jwk(rsa_key, "rsa-1"), public_jwk(ec_key, "ec-1")])
    jwks_port = stack.servers.add(server, lifespan="off")
    policy = load_policy_text(f"""
version: 1
upstreams: {{crm: {{url: "http://127.0.0.1:{stack.crm_port}"}}}}
auth:
  issuers:
    - {{issuer: "{ISS}", audiences: [{AUD}], algorithms: [RS256, ES256],
       jwks_url: "http://127.0.0.1:{jwks_port}/jwks.json", jwks_cooldown: {cooldown},
       jwks_max_staleness: {staleness}, jwks_refresh: 1h}}
  lockout: {{max_failures: 100000}}
roles: {{agent: [debug.echo]}}
routes:
  - {{id: echo, methods: [GET], path: "/crm/v1/{{tenant}}/echo", upstream: crm,
     permission: debug.echo}}
""")
    port = stack.servers.add(Gateway(policy))
    return JwksGateway(port, server, rsa_key, ec_key)


@pytest.fixture()
def jwks_gateway(stack: Stack) -> Iterator[JwksGateway]:
    yield make_gateway(stack, cooldown="1h", staleness="1h")


def test_jwks_keys_verify_tokens(jwks_gateway: JwksGateway) -> None:
    g = jwks_gateway
    assert (
        g.call(jwt.encode(claims(), g.rsa_key, "RS256", headers={"kid": "rsa-1"})).status_code
        == 200
    )
    assert (
        g.call(jwt.encode(claims(), g.ec_key, "ES256", headers={"kid": "ec-1"})).status_code == 200
    )


def test_3_kid_naming_a_key_of_another_type_is_401(jwks_gateway: JwksGateway) -> None:
    g = jwks_gateway
    # RS256 header pointing at the EC key (and the reverse): never verified.
    assert (
        g.call(jwt.encode(claims(), g.rsa_key, "RS256", headers={"kid": "ec-1"})).status_code == 401
    )
    assert (
        g.call(jwt.encode(claims(), g.ec_key, "ES256", headers={"kid": "rsa-1"})).status_code == 401
    )


def test_5_random_kid_flood_fetches_at_most_once_per_cooldown(jwks_gateway: JwksGateway) -> None:
    g = jwks_gateway
    hits = g.jwks.hits
    statuses = {
        g.call(
            jwt.encode(claims(), g.rsa_key, "RS256", headers={"kid": uuid.uuid4().hex})
        ).status_code
        for _ in range(50)
    }
    assert statuses == {401}
    assert g.jwks.hits - hits <= 1


def test_rotated_key_is_picked_up(jwks_gateway: JwksGateway) -> None:
    g = jwks_gateway
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    g.jwks.keys = [public_jwk(new_key, "rsa-2")]
    token = jwt.encode(claims(), new_key, "RS256", headers={"kid": "rsa-2"})
    assert g.call(token).status_code == 200


def test_16_jwks_down_keeps_last_good_keys_then_503(stack: Stack) -> None:
    g = make_gateway(stack, cooldown="0s", staleness="3s")
    token = jwt.encode(claims(), g.rsa_key, "RS256", headers={"kid": "rsa-1"})
    assert g.call(token).status_code == 200
    g.jwks.up = False
    # Cached verified tokens keep working; a new token still verifies with the
    # last known-good keys until they are older than the maximum staleness.
    fresh = jwt.encode({**claims(), "jti": "n"}, g.rsa_key, "RS256", headers={"kid": "rsa-1"})
    assert g.call(fresh).status_code == 200
    stale = wait_for(
        lambda: (
            (
                r := g.call(
                    jwt.encode(
                        {**claims(), "jti": uuid.uuid4().hex},
                        g.rsa_key,
                        "RS256",
                        headers={"kid": "rsa-1"},
                    )
                )
            ).status_code
            == 503
            and r
        ),
        timeout=10,
        what="staleness",
    )
    assert stale.json()["reason"] == "auth_unavailable"
    assert stale.headers["retry-after"]
    g.jwks.up = True
    wait_for(
        lambda: (
            g.call(
                jwt.encode(
                    {**claims(), "jti": uuid.uuid4().hex},
                    g.rsa_key,
                    "RS256",
                    headers={"kid": "rsa-1"},
                )
            ).status_code
            == 200
        ),
        timeout=10,
        what="recovery",
    )
