"""Fair usage (step 8) against gateways of their own, under real uvicorn.

Buckets run on an injected nanosecond clock, so the number of requests
admitted is exact, whatever the machine's speed.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from gateway.demokey import mint_token
from gateway.policy import load_policy_text
from gateway.proxy import Gateway
from gateway.usage.meter import Meter, SlidingCounter
from tests.conftest import SECRET, Stack
from tests.support import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.ns = 1_000_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


POLICY = """
version: 1
upstreams:
  crm: {{url: "http://127.0.0.1:{crm}"}}
  voip: {{url: "http://127.0.0.1:{voip}", read_timeout: 0.5s}}
  dead: {{url: "http://127.0.0.1:{dead}", connect_timeout: 0.5s}}
auth:
  issuers:
    - {{issuer: https://id.fairgate.example, audiences: [crm-voip-api], algorithms: [HS256],
       secret_env: FAIRGATE_JWT_SECRET}}
  default_plan: free
roles: {{agent: [x.read]}}
plans:
  free: {{rate: 5/second, burst: 10, concurrent: 2}}
  quota: {{quotas: [3/second]}}
  bytes: {{bandwidth: 1MB/hour}}
  shadow: {{rate: 1/minute, burst: 1, mode: shadow}}
routes:
  - {{id: leads, methods: [GET], path: "/crm/v1/{{tenant}}/leads", upstream: crm,
     permission: x.read}}
  - {{id: costly, methods: [GET], path: "/crm/v1/{{tenant}}/export", upstream: crm,
     permission: x.read, cost: 4}}
  - {{id: narrow, methods: [GET], path: "/crm/v1/{{tenant}}/contacts", upstream: crm,
     permission: x.read, limits: [{{rate: 2/minute, key: client}}]}}
  - {{id: rec, methods: [GET], path: "/voip/v1/{{tenant}}/recordings/{{rid}}", upstream: voip,
     permission: x.read}}
  - {{id: dead, methods: [GET], path: "/dead/{{tenant}}", upstream: dead, permission: x.read}}
  - {{id: slow, methods: [GET], path: "/slow/{{tenant}}", upstream: voip, permission: x.read}}
  - {{id: call, methods: [POST], path: "/voip/v1/{{tenant}}/calls", upstream: voip,
     permission: x.read, single_use: true}}
"""


class Env:
    def __init__(self, stack: Stack, slow_port: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        policy = load_policy_text(POLICY.format(crm=stack.crm_port, voip=slow_port, dead=dead))
        self.clock = FakeClock()
        self.meter = Meter(clock_ns=self.clock)
        self.gateway = Gateway(policy, meter=self.meter)
        self.port = stack.servers.add(self.gateway)

    def get(
        self, path: str, plan: str = "free", sub: str = "alice", **kw: object
    ) -> httpx.Response:
        token = mint_token(sub=sub, tenant="acme", roles=["agent"], plan=plan, secret=SECRET)
        return httpx.get(
            f"http://127.0.0.1:{self.port}{path}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
            **kw,
        )  # type: ignore[arg-type]


@pytest.fixture()
def env(stack: Stack, voip_proxy_port: int) -> Env:
    return Env(stack, voip_proxy_port)


@pytest.fixture(scope="module")
def voip_proxy_port(stack: Stack) -> Iterator[int]:
    """The demo VoIP upstream, plus a /slow/ path that never answers."""
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b" /slow/" in head.split(b"\r\n", 1)[0]:
            await reader.read()  # never answer; the read timeout fires
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", stack.voip_port)
        up_writer.write(head.replace(b"keep-alive", b"close"))
        await up_writer.drain()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(
            pipe(up_reader, writer), pipe(reader, up_writer), return_exceptions=True
        )

    async def start() -> int:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return int(server.sockets[0].getsockname()[1])

    yield stack.servers.call(start())


def test_exact_burst_then_refill(env: Env) -> None:
    statuses = [env.get("/crm/v1/acme/leads").status_code for _ in range(12)]
    assert statuses == [200] * 10 + [429] * 2
    env.clock.advance(0.2)  # 5/second: exactly one token
    assert env.get("/crm/v1/acme/leads").status_code == 200
    assert env.get("/crm/v1/acme/leads").status_code == 429


def test_429_body_and_headers(env: Env) -> None:
    for _ in range(10):
        ok = env.get("/crm/v1/acme/leads")
    assert ok.headers["ratelimit-policy"] == '"plan-free";q=10;w=2'
    assert ok.headers["ratelimit"] == '"plan-free";r=0;t=2'
    refused = env.get("/crm/v1/acme/leads")
    assert refused.status_code == 429
    body = refused.json()
    assert body["reason"] == "rate_limited"
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "1" and body["retry_after"] == 1
    assert refused.headers["ratelimit-policy"] == '"plan-free";q=10;w=2'
    assert refused.headers["ratelimit"].startswith('"plan-free";r=0;t=')


def test_headers_agree_with_state(env: Env) -> None:
    first = env.get("/crm/v1/acme/leads")
    assert first.headers["ratelimit"] == '"plan-free";r=9;t=1'
    env.get("/crm/v1/acme/leads")
    remaining, _ = env.meter.buckets.peek("plan-free\x1facme/alice", 5.0, 10)
    assert remaining == 8


def test_cost_weighted_and_no_partial_consumption(env: Env) -> None:
    # 10 tokens: two exports (4 each) pass, the third is refused and charges nothing.
    assert [env.get("/crm/v1/acme/export").status_code for _ in range(3)] == [200, 200, 429]
    assert env.meter.buckets.peek("plan-free\x1facme/alice", 5.0, 10)[0] == 2
    # The route limit (2/minute per client) refuses the third call; the plan
    # bucket it shares the decision with keeps the tokens that call would have used.
    assert [env.get("/crm/v1/acme/contacts", sub="bob").status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]
    assert env.meter.buckets.peek("plan-free\x1facme/bob", 5.0, 10)[0] == 8
    assert env.get("/crm/v1/acme/contacts", sub="bob").json()["reason"] == "rate_limited"


def test_quota_rollover(env: Env) -> None:
    # A sliding window counter weighs the previous second in, so the exact
    # cut depends on where the second boundary falls: at least 3 pass, and
    # soon after comes a refusal.
    responses = [env.get("/crm/v1/acme/leads", plan="quota") for _ in range(8)]
    statuses = [r.status_code for r in responses]
    assert statuses[:3] == [200, 200, 200] and 429 in statuses
    refused = responses[statuses.index(429)]
    assert refused.json()["reason"] == "quota_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    # The 3/second window rolls over (a sliding window counter: within ~2 s).
    wait_for(
        lambda: env.get("/crm/v1/acme/leads", plan="quota").status_code == 200,
        timeout=5,
        what="quota rollover",
    )


def test_bandwidth_counts_streamed_bytes(env: Env) -> None:
    big = env.get("/voip/v1/acme/recordings/1", plan="bytes", params={"size": 1_500_000})
    assert big.status_code == 200 and len(big.content) == 1_500_000
    refused = env.get("/voip/v1/acme/recordings/1", plan="bytes", params={"size": 10})
    assert refused.status_code == 429
    assert refused.json()["reason"] == "bandwidth_exceeded"
    assert int(refused.headers["retry-after"]) > 0


def test_shadow_mode_passes_and_notes(env: Env) -> None:
    assert [env.get("/crm/v1/acme/leads", plan="shadow").status_code for _ in range(3)] == [200] * 3


def test_concurrency_limit_and_release_on_every_exit(env: Env) -> None:
    inflight = env.meter.inflight
    # Success.
    assert env.get("/crm/v1/acme/leads").status_code == 200
    assert inflight == {}
    # Upstream refused (502) and upstream timeout (504).
    assert env.get("/dead/acme").status_code == 502
    assert env.get("/slow/acme").status_code == 504
    assert inflight == {}
    # Two slow requests hold both slots; a third is refused at once.
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(env.get("/slow/acme").status_code))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    wait_for(lambda: inflight.get("subject:acme/alice") == 2, what="two in flight")
    refused = env.get("/crm/v1/acme/leads")
    assert refused.status_code == 429
    assert refused.json()["reason"] == "concurrency_limited"
    for t in threads:
        t.join()
    assert results == [504, 504]
    wait_for(lambda: inflight == {}, what="slots released")
    # Client disconnect while the upstream is slow.
    token = mint_token(sub="alice", tenant="acme", roles=["agent"], plan="free", secret=SECRET)
    sock = socket.create_connection(("127.0.0.1", env.port))
    sock.sendall(
        f"GET /slow/acme HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    wait_for(lambda: inflight.get("subject:acme/alice") == 1, what="in flight")
    sock.close()
    wait_for(lambda: inflight == {}, timeout=2, what="released after disconnect")
    # Client disconnect in the middle of a streamed response.
    sock = socket.create_connection(("127.0.0.1", env.port))
    sock.sendall(
        f"GET /voip/v1/acme/recordings/2?size=200000000 HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    wait_for(lambda: inflight == {}, timeout=5, what="released after mid-stream disconnect")


def test_default_policy_free_plan_over_http(stack: Stack) -> None:
    from tests.conftest import default_policy

    policy = default_policy(stack)
    port = stack.servers.add(Gateway(policy))
    token = mint_token(sub="victor", tenant="acme", roles=["viewer"], plan="free", secret=SECRET)
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}
    ) as client:
        responses = [client.get("/crm/v1/acme/leads") for _ in range(20)]
    statuses = [r.status_code for r in responses]
    assert statuses[:10] == [200] * 10 and 429 in statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["reason"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    assert '"plan-free";q=10;w=2' in refused.headers["ratelimit-policy"]
    assert '"quota-free-0";q=2000;w=86400' in responses[0].headers["ratelimit-policy"]


def test_refused_request_does_not_spend_a_single_use_token(env: Env) -> None:
    token = mint_token(sub="caller", tenant="acme", roles=["agent"], plan="free", secret=SECRET)
    auth = {"Authorization": f"Bearer {token}"}
    for _ in range(10):
        env.get("/crm/v1/acme/leads", sub="caller")
    url = f"http://127.0.0.1:{env.port}/voip/v1/acme/calls"
    refused = httpx.post(url, headers=auth, json={"to": "+15551234567"})
    assert refused.status_code == 429
    env.clock.advance(1)
    placed = httpx.post(url, headers=auth, json={"to": "+15551234567"})
    assert placed.status_code == 201, placed.text
    assert httpx.post(url, headers=auth, json={"to": "+15551234567"}).status_code == 409


def test_bandwidth_counts_a_download_while_it_streams(env: Env) -> None:
    """A long download is charged as it flows (every 64 KiB), not when it ends:
    while it still runs, the plan's next request is already refused."""
    token = mint_token(sub="alice", tenant="acme", roles=["agent"], plan="bytes", secret=SECRET)
    sock = socket.create_connection(("127.0.0.1", env.port))
    try:
        sock.sendall(
            f"GET /voip/v1/acme/recordings/3?size=50000000 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        received = 0
        while received < 1_500_000:  # past the plan's 1 MB, far from the end
            chunk = sock.recv(65536)
            assert chunk
            received += len(chunk)
        refused = env.get("/voip/v1/acme/recordings/1", plan="bytes", params={"size": 10})
        assert refused.status_code == 429
        assert refused.json()["reason"] == "bandwidth_exceeded"
    finally:
        sock.close()


def test_sliding_counters_forget_only_expired_keys() -> None:
    now = [1_000_000.0]
    counter = SlidingCounter(lambda: now[0], max_keys=100)
    counter.add("heavy", 3600.0, 5)
    for i in range(1000):
        counter.add(f"flood-{i}", 3600.0, 1)
    # A flood of new keys hands nobody's quota back: live counts are kept.
    assert counter.used("heavy", 3600.0) == 5 and len(counter) == 1001
    # Once every window has passed, the next sweeps drop them all.
    now[0] += 2 * 3600.0
    for i in range(1000):
        counter.add(f"late-{i}", 3600.0, 1)
    assert len(counter) == 1000


def test_a_counter_whose_window_changes_starts_over() -> None:
    """A reload that changes a rule's window, or a subject on a new plan, must
    not mix two windows' counts (that once read as a huge negative use)."""
    now = [1_000_000.0]
    counter = SlidingCounter(lambda: now[0])
    counter.add("alice", 3600.0, 1)
    counter.add("alice", 86400.0, 900)
    now[0] += 86400.0
    assert counter.used("alice", 86400.0) == pytest.approx(900 * (1 - (now[0] % 86400) / 86400))
