"""The fair-usage step: native and pure-Python twins, same decisions, same state.

Hypothesis drives ``gateway._usage_py.fair_usage`` and ``gateway._usage_c.
fair_usage`` side by side, each on its own ``Meter`` under one fake clock,
through random sequences of requests (plans with every limit kind, enforced
and shadowed; routes with costs, their own limits and concurrency), clock
jumps, releases of in-flight slots and bandwidth charges (each twin's own
``leave`` and ``charge``). After every operation the two must agree on the
decision (status, reason, detail, headers, Retry-After), on what the request
carries on (response headers, in-flight slots, bandwidth key, shadow notes,
bytes charged) and on the whole state: every quota and bandwidth counter,
every in-flight count, the bucket tables.
A missing native module is skipped, unless FAIRGATE_REQUIRE_EXTENSIONS=1.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import _usage_py
from gateway.auth import Identity
from gateway.clientaddr import address
from gateway.context import RequestContext
from gateway.policy import load_policy_text
from gateway.usage import step
from gateway.usage.meter import Meter
from tests.support import load_native, require_native

C_MODULE, C_IMPORT_ERROR = load_native("_usage_c")

POLICY = """
version: 1
upstreams: {up: {url: "http://127.0.0.1:9"}}
fair_usage: {retry_jitter: 0.5}
plans:
  mixed: {rate: 3/second, burst: 4, quotas: [5/minute, 12/hour], concurrent: 2,
          bandwidth: 2KB/minute}
  watched: {rate: 1/second, burst: 1, quotas: [2/minute], concurrent: 1,
            bandwidth: 1KB/minute, mode: shadow}
  quota: {quotas: [3/second, 3/minute]}  # ties: the first tightest quota names the header
  bare: {}
routes:
  - {id: plain, methods: [GET], path: /plain, upstream: up, public: true}
  - {id: costly, methods: [GET], path: /costly, upstream: up, public: true, cost: 3,
     concurrent: 1}
  - {id: free, methods: [GET], path: /free, upstream: up, public: true, cost: 0}
  - {id: keyed, methods: [GET], path: /keyed, upstream: up, public: true,
     limits: [{rate: 2/second, burst: 2, key: tenant}, {rate: 5/minute, key: "header:x-device"},
              {rate: 1/second, key: client_network, mode: shadow}]}
"""
PLANS = [None, "mixed", "watched", "quota", "bare", "unknown"]
SUBJECTS = ["alice", "bob"]
TENANTS = ["acme", "globex"]
IPS = ["192.0.2.1", "192.0.2.77", "198.51.100.5", "2001:db8::1"]
T0 = 1_000_000.0


def _native() -> Any:
    return require_native(C_MODULE, C_IMPORT_ERROR, "_usage_c")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def seconds(self) -> float:
        return self.now

    def ns(self) -> int:
        return int(self.now * 1e9)


@dataclass
class Side:
    meter: Meter
    impl: Any  # gateway._usage_py or gateway._usage_c
    held: list[tuple[str, ...]] = field(default_factory=list)
    last: RequestContext | None = None


def _request(policy: Any, op: dict[str, Any]) -> RequestContext:
    route = next(r for r in policy.routes if r.id == op["route"])
    req = RequestContext(
        "GET",
        route.path.encode(),
        b"",
        [(b"x-device", op["device"].encode())] if op["device"] else [],
        op["ip"],
        "http",
        "rid",
        0.0,
    )
    req.route = route
    req.client = address(op["ip"])
    if op["subject"] is not None:
        subject, tenant = op["subject"], op["tenant"]
        req.identity = Identity.make(subject, tenant, (), op["plan"], None, None, 0.0, 0.0)
    else:
        req.params = {"tenant": op["tenant"]}
    return req


def _outcome(req: RequestContext, decision: Any) -> Any:
    refused = None
    if decision is not None:
        refused = (
            decision.status,
            decision.reason,
            decision.detail,
            decision.retry_after,
            decision.headers,
            decision.rule,
        )
    return refused, req.response_headers, req.inflight, req.bandwidth, req.shadow


def _state(meter: Meter) -> Any:
    return (
        {k: list(v) for k, v in meter.quota_counts._slots.items()},
        {k: list(v) for k, v in meter.bandwidth._slots.items()},
        dict(meter.inflight),
        len(meter.buckets),
        len(meter.shadow_buckets),
    )


request_ops = st.fixed_dictionaries(
    {
        "kind": st.just("request"),
        "route": st.sampled_from(["plain", "costly", "free", "keyed"]),
        "plan": st.sampled_from(PLANS),
        "subject": st.sampled_from([None, *SUBJECTS]),
        "tenant": st.sampled_from(TENANTS),
        "device": st.sampled_from(["", "phone", "desk"]),
        "ip": st.sampled_from(IPS),
    }
)
other_ops = st.one_of(
    st.fixed_dictionaries(
        {
            "kind": st.just("advance"),
            "seconds": st.one_of(
                st.sampled_from([0.001, 0.25, 0.5, 1.0, 30.0, 60.0, 3600.0, 7200.0]),
                st.floats(0.0, 100.0),
            ),
        }
    ),
    # To a window's edge exactly, or a hair before or after it: where a slot rolls over.
    st.fixed_dictionaries(
        {
            "kind": st.just("edge"),
            "window": st.sampled_from([1.0, 60.0, 3600.0]),
            "ulps": st.sampled_from([-1, 0, 1]),
        }
    ),
    st.fixed_dictionaries({"kind": st.just("leave"), "index": st.integers(0, 5)}),
    st.fixed_dictionaries({"kind": st.just("charge"), "bytes": st.integers(1, 1500)}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.one_of(request_ops, request_ops, other_ops), min_size=1, max_size=60))
def test_native_and_pure_steps_agree(ops: list[dict[str, Any]]) -> None:
    native = _native()
    policy = load_policy_text(POLICY)
    clock = Clock()
    sides = [
        Side(Meter(clock=clock.seconds, clock_ns=clock.ns), _usage_py),
        Side(Meter(clock=clock.seconds, clock_ns=clock.ns), native),
    ]
    for i, op in enumerate(ops):
        if op["kind"] == "advance":
            clock.now += op["seconds"]
        elif op["kind"] == "edge":
            edge = (clock.now // op["window"] + 1) * op["window"]
            for _ in range(abs(op["ulps"])):
                edge = math.nextafter(edge, math.inf if op["ulps"] > 0 else -math.inf)
            clock.now = max(clock.now, edge)
        outcomes = []
        for side in sides:
            if op["kind"] == "request":
                req = _request(policy, op)
                random.seed(i)  # the same jitter for both
                decision = side.impl.fair_usage(req, policy, side.meter)
                outcomes.append(_outcome(req, decision))
                if req.inflight:
                    side.held.append(req.inflight)
                side.last = req
            elif op["kind"] == "leave" and side.held:
                side.impl.leave(side.meter, side.held.pop(op["index"] % len(side.held)))
            elif op["kind"] == "charge" and side.last is not None and side.last.bandwidth:
                # The bytes of the last request, as the proxy charges them.
                side.last.bytes_out += op["bytes"]
                side.impl.charge(side.meter, side.last)
                outcomes.append((side.last.charged, side.last.charge_at))
            outcomes.append(_state(side.meter))
        assert outcomes[: len(outcomes) // 2] == outcomes[len(outcomes) // 2 :], op


def test_the_selected_step_is_the_native_one_unless_disabled() -> None:
    expected = "c" if C_MODULE is not None else "py"
    if os.environ.get("FAIRGATE_NO_EXTENSIONS", "") not in ("", "0"):
        expected = "py"
    assert expected == step.IMPLEMENTATION


def test_subject_churn_agrees() -> None:
    """More subjects than the native step keeps keys for (it starts over), the
    same subjects again: the twins still agree on every decision and count."""
    native = _native()
    policy = load_policy_text(POLICY)
    clock = Clock()
    meters = [Meter(clock=clock.seconds, clock_ns=clock.ns) for _ in range(2)]
    for i in [*range(5000), *range(0, 5000, 7)]:
        op = {"route": "plain", "plan": "mixed", "subject": f"s{i}", "tenant": "acme"}
        op |= {"device": "", "ip": IPS[i % len(IPS)]}
        outcomes = []
        for impl, meter in zip((_usage_py, native), meters, strict=True):
            req = _request(policy, op)
            outcomes.append(_outcome(req, impl.fair_usage(req, policy, meter)))
            impl.leave(meter, req.inflight)
        assert outcomes[0] == outcomes[1], op
        clock.now += 0.01
    assert _state(meters[0]) == _state(meters[1])


def test_the_native_wall_clock_is_time_time() -> None:
    """A meter on ``time.time`` is read natively (no call): it must be the same
    clock, to the same nanosecond rounding, between two calls of the real one."""
    native = _native()
    for _ in range(10_000):
        before = time.time()
        now = native._wall_clock()
        after = time.time()
        assert before <= now <= after
        assert type(now) is float
