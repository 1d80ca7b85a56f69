"""Shared fixtures: the demo upstreams and the gateway under real uvicorn."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.demo import crm, voip
from gateway.demo.runner import demo_policy
from gateway.demokey import mint_token
from gateway.policy import Policy
from gateway.policy.schema import PolicySpec
from gateway.proxy import Gateway
from tests.support import ServerThread

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POLICY = ROOT / "policies" / "default.yaml"
SECRET = "test-secret-" + "s" * 40

# Every test process verifies tokens with this secret, never a real key.
os.environ["FAIRGATE_JWT_SECRET"] = SECRET
os.environ["FAIRGATE_AUDIT_KEY"] = "test-audit-key-" + "k" * 20
AUDIT_DIR = Path(tempfile.mkdtemp(prefix="fairgate-test-audit-"))
atexit.register(shutil.rmtree, AUDIT_DIR, ignore_errors=True)  # nothing left in /tmp


@dataclass
class Stack:
    servers: ServerThread
    gateway: Gateway
    port: int
    crm_port: int
    voip_port: int
    policy: Policy

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def upstreams() -> Iterator[tuple[ServerThread, int, int]]:
    servers = ServerThread()
    crm_port = servers.add(crm.create_app())
    voip_port = servers.add(voip.create_app())
    yield servers, crm_port, voip_port
    servers.stop()


def without_lockout(spec: PolicySpec) -> PolicySpec:
    """The shared gateway of most tests: all test clients share 127.0.0.1 and
    a few users, so lockout and fair-usage limits would make tests depend on
    each other. Limits run in shadow mode here (noted, never refused), and no
    ladder acts on abuse signals; the lockout, fair-usage and abuse tests run
    gateways of their own."""
    lockout = spec.auth.lockout.model_copy(update={"max_failures": 1_000_000})
    plans = {n: p.model_copy(update={"mode": "shadow"}) for n, p in spec.plans.items()}
    routes = [
        r.model_copy(
            update={"limits": [lim.model_copy(update={"mode": "shadow"}) for lim in r.limits]}
        )
        for r in spec.routes
    ]
    auth = spec.auth.model_copy(update={"lockout": lockout})
    # Detectors still raise signals (recorded), but no ladder acts on them.
    update = {"auth": auth, "plans": plans, "routes": routes, "enforcement": None}
    return audit_to_tmp(spec.model_copy(update=update))


def audit_to_tmp(spec: PolicySpec) -> PolicySpec:
    """Tests never write audit files into the working tree, and each gateway
    gets a directory of its own: a chain has one writer (the sink locks it)."""
    directory = tempfile.mkdtemp(prefix="gw-", dir=AUDIT_DIR)
    audit = spec.audit.model_copy(update={"sinks": [f"file://{directory}"]}) if spec.audit else None
    return spec.model_copy(update={"audit": audit})


def default_policy(stack: Stack, *, relaxed: bool = False) -> Policy:
    """policies/default.yaml bound to the demo upstreams of ``stack``."""
    return demo_policy(
        DEFAULT_POLICY,
        f"http://127.0.0.1:{stack.crm_port}",
        f"http://127.0.0.1:{stack.voip_port}",
        edit=without_lockout if relaxed else audit_to_tmp,
    )


@pytest.fixture(scope="session")
def stack(upstreams: tuple[ServerThread, int, int]) -> Stack:
    servers, crm_port, voip_port = upstreams
    policy = demo_policy(
        DEFAULT_POLICY,
        f"http://127.0.0.1:{crm_port}",
        f"http://127.0.0.1:{voip_port}",
        edit=without_lockout,
    )
    gateway = Gateway(policy)
    port = servers.add(gateway)
    return Stack(servers, gateway, port, crm_port, voip_port, policy)


TokenFactory = Callable[..., str]


@pytest.fixture(scope="session")
def token() -> TokenFactory:
    def make(
        sub: str = "alice",
        tenant: str = "acme",
        roles: str = "agent",
        plan: str | None = "pro",
        **kwargs: object,
    ) -> str:
        return mint_token(
            sub=sub, tenant=tenant, roles=roles.split(","), plan=plan, secret=SECRET, **kwargs
        )  # type: ignore[arg-type]

    return make


@pytest.fixture()
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=10) as c:
        yield c


@pytest.fixture()
def alice(token: TokenFactory) -> dict[str, str]:
    return {"Authorization": f"Bearer {token()}"}
