"""Benchmark: the cost of authentication, cache hit vs full verification.

Not a test. Prints a human table, then a JSON summary line last.

    python loadtests/bench_auth.py [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

os.environ.setdefault("FAIRGATE_JWT_SECRET", "bench-secret-" + "s" * 40)

from gateway.auth import Authenticator
from gateway.demokey import mint_token
from gateway.policy import load_policy_text
from gateway.state import MemoryIdentityState

POLICY = """
version: 1
upstreams: {up: {url: "http://127.0.0.1:9"}}
auth:
  issuers:
    - {issuer: https://id.fairgate.example, audiences: [crm-voip-api], algorithms: [HS256],
       secret_env: FAIRGATE_JWT_SECRET}
roles: {agent: [x.read]}
routes:
  - {id: r, methods: [GET], path: "/t/{tenant}", upstream: up, permission: x.read}
"""


async def measure(rounds: int) -> dict[str, float]:
    policy = load_policy_text(POLICY)
    secret = os.environ["FAIRGATE_JWT_SECRET"]
    token = mint_token(sub="alice", tenant="acme", roles=["agent"], secret=secret).encode()
    cached = Authenticator(policy, MemoryIdentityState(policy.lockout))
    await cached.authenticate(token, "203.0.113.0/24", time.time())
    now = time.time()
    start = time.perf_counter()
    for _ in range(rounds):
        await cached.authenticate(token, "203.0.113.0/24", now)
    hit = (time.perf_counter() - start) / rounds * 1e6
    tokens = [
        mint_token(sub="alice", tenant="acme", roles=["agent"], secret=secret).encode()
        for _ in range(min(rounds, 20000))
    ]
    cold = Authenticator(policy, MemoryIdentityState(policy.lockout))
    start = time.perf_counter()
    for t in tokens:
        await cold.authenticate(t, "203.0.113.0/24", now)
    miss = (time.perf_counter() - start) / len(tokens) * 1e6
    return {
        "cache_hit_us": round(hit, 3),
        "verify_hs256_us": round(miss, 2),
        "speedup": round(miss / hit, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200_000)
    args = parser.parse_args()
    result = asyncio.run(measure(args.rounds))
    print(f"token cache hit:      {result['cache_hit_us']:8.3f} µs per request")
    print(f"full HS256 verify:    {result['verify_hs256_us']:8.2f} µs per request")
    print(json.dumps({"bench": "auth", **result}))


if __name__ == "__main__":
    main()
