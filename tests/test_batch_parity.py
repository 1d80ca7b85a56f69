"""The native record batch (``gateway._records_c.RecordBatch``) and its pure
twin (``gateway._records_py.RecordBatch``) write the same batch frames.

The native one writes each record's body straight from the request's slots,
with no snapshot between; the twin takes the snapshot and writes its body.
Hypothesis holds them equal for requests in every state the pipeline leaves
them in (the requests of ``test_facts_parity``), and holds that a request
whose body cannot be written leaves the batch as it was, in both.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import _facts_py, _records_py
from gateway.audit import frames
from gateway.audit.chain import Chain
from gateway.context import RequestContext
from tests.support import load_native, require_native
from tests.test_facts_parity import POLICY, requests

C_MODULE, C_IMPORT_ERROR = load_native("_records_c")
KEY = b"k" * 32


def native() -> Any:
    return require_native(C_MODULE, C_IMPORT_ERROR, "_records_c")


def batches() -> tuple[Any, Any]:
    return (
        native().RecordBatch(native().RecordSealer("inst", KEY)),
        _records_py.RecordBatch(_records_py.RecordSealer("inst", KEY)),
    )


def add(batch: Any, req: RequestContext, now: float, finished: float) -> Any:
    """What ``add`` returns, or the type of what it raised."""
    try:
        return batch.add(req, POLICY, now, finished)
    except Exception as exc:  # compared between the twins
        return type(exc)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(requests(), min_size=1, max_size=4),
    st.floats(0, 4e9),
    st.one_of(st.floats(0, 2e6), st.integers(0, 2**53)),
)
def test_native_and_pure_batches_are_equal(
    reqs: list[RequestContext], now: float, finished: float
) -> None:
    fast, pure = batches()
    for req in reqs:
        assert add(fast, req, now, finished) == add(pure, req, now, finished)
        assert fast.count == pure.count
    fast.add_json(b'["facts"]')
    pure.add_json(b'["facts"]')
    frame = fast.take()
    assert frame == pure.take()
    assert fast.count == pure.count == 0
    # The frame holds, in order, the body of each request that could be written.
    expected = []
    for req in reqs:
        try:
            body = _records_py.RecordSealer("inst", KEY).body(
                _facts_py.snapshot(req, POLICY, now=now, finished=finished)
            )
        except Exception:  # leaves no entry
            continue
        expected.append(body)
    entries = frames.decode_batch(frame[4:])
    bodies = [body for item in entries if type(item) is frames.Bodies for body in item]
    assert bodies == expected
    assert entries[-1] == ["facts"]
    assert fast.take() == pure.take() == b"\x80\x00\x00\x00"  # empty again


def test_a_body_that_cannot_be_written_leaves_the_batch_as_it_was() -> None:
    for batch in batches():
        good = RequestContext("GET", b"/x", b"", [], None, "http", "r1", 1.0)
        bad = RequestContext("GET", b"/x", b"", [], None, "http", "r2", 1.0)
        bad.bytes_out = 2**70  # beyond JSON's 64-bit integers
        assert batch.add(good, POLICY, 5.0, 2.0) == 1
        with pytest.raises(TypeError):
            batch.add(bad, POLICY, 5.0, 2.0)
        assert batch.count == 1
        assert batch.add(good, POLICY, 5.0, 2.0) == 2
        entries = frames.decode_batch(batch.take()[4:])
        assert len(entries) == 1 and len(entries[0]) == 2
        assert entries[0][0] == entries[0][1]


def test_the_clocks_are_read_as_the_snapshot_reads_them() -> None:
    for batch in batches():
        req = RequestContext("GET", b"/x", b"", [], None, "http", "r1", time.perf_counter())
        before, wall_before = time.perf_counter(), time.time()
        batch.add(req, POLICY)
        after, wall_after = time.perf_counter(), time.time()
        (run,) = frames.decode_batch(batch.take()[4:])
        line = _records_py.RecordSealer("inst", KEY).seal(run[0], Chain("c"))
        record = orjson.loads(line)
        latency_ms = (before - req.started) * 1000, (after - req.started) * 1000
        assert latency_ms[0] - 0.001 <= record["latency_ms"] <= latency_ms[1] + 0.001
        stamp = datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
        ts = stamp.replace(tzinfo=UTC).timestamp()
        assert wall_before - 0.001 <= ts <= wall_after  # milliseconds, cut short


def test_json_entries_and_take() -> None:
    for batch in batches():
        assert batch.add_json(b"{}") == 1
        assert batch.add_json(b"[1]") == 2
        assert frames.decode_batch(batch.take()[4:]) == [{}, [1]]
        with pytest.raises(TypeError):
            batch.add_json("not bytes")
        assert batch.count == 0
    with pytest.raises(TypeError):
        _records_py.RecordBatch(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        native().RecordBatch(None)
