"""The native snapshot (``gateway._facts_c``) and its pure twin
(``gateway._facts_py``) return the same facts for every request.

Hypothesis builds requests in every state the pipeline leaves them in:
refused or not, shadow refusals, signals, an aborted response, no identity,
route or client, a hostile raw target, odd values in any slot. The native
one reads slots directly, so it is also held to the twin where it must not
take its fast path: subclasses, unset slots, objects of other classes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import _facts_py, recording
from gateway.auth import Identity
from gateway.clientaddr import address
from gateway.context import RequestContext
from gateway.decision import deny
from gateway.policy import load_policy_text
from gateway.policy.model import Policy
from tests.support import load_native, require_native

C_MODULE, C_IMPORT_ERROR = load_native("_facts_c")
POLICY = load_policy_text(
    """
version: 1
upstreams: {crm: {url: "http://127.0.0.1:9"}}
auth: {issuers: [{issuer: https://id.example, audiences: [a], algorithms: [HS256],
                  secret_env: FAIRGATE_JWT_SECRET}]}
routes:
  - {id: leads, methods: [GET], path: "/crm/{tenant}/leads", upstream: crm, public: true}
""",
    "<facts parity>",
)
ROUTE = POLICY.routes[0]


def native() -> Any:
    return require_native(C_MODULE, C_IMPORT_ERROR, "_facts_c")


text = st.text(max_size=12)
anything = st.one_of(
    st.none(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), text, st.booleans()
)
identities = st.one_of(
    st.none(),
    st.builds(
        Identity,
        subject=text,
        tenant=text,
        roles=st.lists(text, max_size=3).map(tuple),
        plan=st.one_of(st.none(), text),
        session=st.one_of(st.none(), text),
        jti=st.none(),
        expires=st.none(),
    ),
)
clients = st.one_of(
    st.none(),
    st.sampled_from(["192.0.2.7", "2001:db8::1", "10.1.2.3"]).map(address),
)
refusals = st.one_of(
    st.none(),
    st.builds(
        lambda reason, rule: deny(reason, "refused", rule=rule),
        st.sampled_from(["forbidden", "rate_limited", "tenant_mismatch"]),
        st.one_of(st.none(), text),
    ),
)
reasons = st.lists(st.one_of(text, st.just("rate_limited:pro.rate")), max_size=3)


@st.composite
def requests(draw: Any) -> RequestContext:
    req = RequestContext(
        method=draw(st.sampled_from(["GET", "POST", "DELETE"])),
        raw_path=draw(st.binary(max_size=600)),
        query=b"",
        headers=[],
        peer=None,
        scheme="http",
        request_id=draw(text),
        started=draw(st.floats(0, 1e6)),
    )
    req.path = draw(st.one_of(st.just(""), text))
    req.identity = draw(identities)
    req.route = draw(st.one_of(st.none(), st.just(ROUTE)))
    req.refusal = draw(refusals)
    req.client = draw(clients)
    req.shadow = draw(reasons)
    req.signals = draw(reasons)
    req.aborted = draw(st.one_of(st.none(), st.sampled_from(["client_disconnect", ""])))
    req.status = draw(st.integers(0, 599))
    req.upstream_status = draw(st.one_of(st.none(), st.integers(100, 599)))
    req.bytes_in = draw(st.integers(0, 2**40))
    req.bytes_out = draw(anything)  # odd values pass through as they are
    return req


@settings(max_examples=400, deadline=None)
@given(
    requests(),
    st.booleans(),
    st.floats(0, 4e9),
    st.one_of(st.floats(0, 2e6), st.integers(0, 2**53)),
)
def test_native_and_pure_snapshots_are_equal(
    req: RequestContext, degraded: bool, now: float, finished: float
) -> None:
    kw = {"degraded": degraded, "now": now, "finished": finished}
    expected = _facts_py.snapshot(req, POLICY, **kw)
    got = native().snapshot(req, POLICY, **kw)
    assert got == expected
    assert [type(v) for v in got] == [type(v) for v in expected]


def test_the_clocks_are_read_as_time_and_perf_counter_read_them() -> None:
    req = RequestContext("GET", b"/x", b"", [], None, "http", "r1", time.perf_counter())
    before, wall_before = time.perf_counter(), time.time()
    facts = native().snapshot(req, POLICY)
    after, wall_after = time.perf_counter(), time.time()
    latency, ts = facts[6], facts[22]
    assert type(latency) is float and type(ts) is float
    assert before - req.started <= latency <= after - req.started
    assert wall_before <= ts <= wall_after


def test_objects_it_must_not_read_directly_go_to_the_twin() -> None:
    class Subclass(RequestContext):
        __slots__ = ()

        def __getattribute__(self, name: str) -> Any:
            # A subclass may change what an attribute means.
            value = object.__getattribute__(self, name)
            return "OVERRIDDEN" if name == "method" else value

    sub = Subclass("GET", b"/x", b"", [], None, "http", "r1", 1.0)
    facts = native().snapshot(sub, POLICY, now=5.0, finished=2.0)
    assert facts == _facts_py.snapshot(sub, POLICY, now=5.0, finished=2.0)
    assert facts[7] == "OVERRIDDEN"

    # An unset slot raises as attribute access raises, in both.
    req = RequestContext("GET", b"/x", b"", [], None, "http", "r1", 1.0)
    del req.request_id
    for snapshot in (native().snapshot, _facts_py.snapshot):
        with pytest.raises(AttributeError):
            snapshot(req, POLICY, now=5.0, finished=2.0)

    # A stand-in for the policy (any object with a revision) still works.
    class Revision:
        revision = "r-standin"

    whole = RequestContext("GET", b"/x", b"", [], None, "http", "r2", 1.0)
    facts = native().snapshot(whole, Revision(), now=5.0, finished=2.0)  # type: ignore[arg-type]
    assert facts[11] == "r-standin"
    assert isinstance(POLICY, Policy)


def test_the_selected_snapshot_is_the_native_one_unless_disabled() -> None:
    expected = "c" if C_MODULE is not None else "py"
    if os.environ.get("FAIRGATE_NO_EXTENSIONS", "") not in ("", "0"):
        expected = "py"
    assert expected == recording.FACTS_IMPLEMENTATION
