"""``writer: inline`` (``gateway.audit.inline.InlineWriter``): the worker
writes each record's body into a batch, as for a writer process, and seals
and writes the batches itself, its files on a thread. Real files; the
gateway under real uvicorn is in test_audit_e2e."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.audit import verify
from gateway.audit.inline import InlineWriter
from gateway.audit.remote import WriterProcess
from gateway.audit.sealer import RecordSealer
from gateway.policy import load_policy_text
from gateway.proxy import Gateway
from gateway.recording import AuditTrail
from tests.conftest import Stack, default_policy
from tests.test_audit_helpers import KEY, PSEUDONYM_KEY, complete_lines, file_config, until
from tests.test_audit_process import (
    config,
    facts,
    offer_all,
    parity_items,
    plain_lines,
    record_lines,
    records,
    write_all,
)
from tests.test_policy import BASE


async def test_the_inline_writer_writes_the_bytes_the_event_loop_writer_writes(
    tmp_path: Path,
) -> None:
    items = parity_items()
    expected = await plain_lines(tmp_path / "plain", items)
    inline_config = config(tmp_path / "inline", checkpoint_every=10_000)
    await write_all(InlineWriter(inline_config, ip_key=PSEUDONYM_KEY), items)
    assert record_lines(tmp_path / "inline") == expected
    report = verify([tmp_path / "inline"], KEY)
    assert report.ok, report.describe()


async def test_a_full_queue_holds_records_back_and_loses_none(tmp_path: Path) -> None:
    writer = InlineWriter(
        config(tmp_path, queue_size=8, batch_size=4, checkpoint_every=5), ip_key=PSEUDONYM_KEY
    )
    await writer.start()
    depths: list[int] = []
    for i in range(200):
        if not writer.offer_facts(facts(i)):
            depths.append(writer.queue_depth)
            await writer.write_facts(facts(i))
    await writer.aclose()
    # The queue filled (offers were refused and waited), and never held more
    # than its bound of records (plus the checkpoints queued past it).
    assert depths and min(depths) >= 8 and max(depths) <= 8 + 2
    assert writer.written == 200
    written = [r["request_id"] for r in records(tmp_path) if r.get("type") != "checkpoint"]
    assert written == [f"req-{i}" for i in range(200)]
    report = verify([tmp_path], KEY)
    assert report.ok, report.describe()


async def test_close_writes_the_batch_still_being_gathered(tmp_path: Path) -> None:
    # A batch is handed over after an hour: only the close can write it.
    writer = InlineWriter(file_config(tmp_path, flush_interval=3600.0), ip_key=PSEUDONYM_KEY)
    await writer.start()
    await offer_all(writer, [facts(i) for i in range(5)])
    assert writer.queue_depth == 5 and writer.written == 0
    await writer.write({"decision": "note", "detail": "a record that is not a request's"})
    await writer.aclose()
    assert writer.written == 6 and writer.queue_depth == 0
    lines = records(tmp_path)
    assert [r.get("request_id") for r in lines[:5]] == [f"req-{i}" for i in range(5)]
    assert lines[-1]["type"] == "checkpoint" and lines[-1]["final"] is True
    report = verify([tmp_path], KEY)
    assert report.ok, report.describe()


async def test_a_gateway_with_the_inline_writer_records_each_request(
    tmp_path: Path, stack: Stack
) -> None:
    policy = default_policy(stack)
    assert policy.audit is not None
    audit = dataclasses.replace(policy.audit, writer="inline", sinks=(f"file://{tmp_path}",))
    gateway = Gateway(dataclasses.replace(policy, audit=audit))
    assert gateway.audit is not None and isinstance(gateway.audit.writer, InlineWriter)
    writer = gateway.audit.writer
    await writer.start()
    try:
        transport = httpx.ASGITransport(app=gateway)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            answered = [await client.get("/crm/v1/acme/leads") for _ in range(3)]
        await until(lambda: writer.written == 3, what="three records written")
    finally:
        await writer.aclose()
    assert [r.status_code for r in answered] == [401] * 3
    lines = []
    for file in sorted(tmp_path.rglob("audit-*.jsonl")):
        lines += [orjson.loads(x) for x in complete_lines(file)]
    requests = [r for r in lines if r.get("type") != "checkpoint"]
    assert [r["request_id"] for r in requests] == [r.headers["x-request-id"] for r in answered]
    assert {r["reason"] for r in requests} == {answered[0].json()["reason"]}
    assert lines[-1]["type"] == "checkpoint" and lines[-1]["final"] is True
    report = verify([tmp_path], None)
    assert report.ok, report.describe()


async def test_records_waiting_for_room_keep_their_order(tmp_path: Path) -> None:
    # A batch is handed over only when full, when the queue is, or at close.
    config_ = file_config(tmp_path, queue_size=4, batch_size=100, flush_interval=3600.0)
    writer = InlineWriter(config_, ip_key=PSEUDONYM_KEY)
    await writer.start()
    for i in range(4):
        assert writer.offer_facts(facts(i))
    assert not writer.offer_facts(facts(4))  # the queue is full: the next ones wait
    seal = RecordSealer("gw", PSEUDONYM_KEY).seal
    await asyncio.gather(
        writer.write_facts(facts(4)),
        writer.write_lazy(facts(5), seal),
        writer.write_facts(facts(6)),
    )
    await writer.aclose()
    written = [r["request_id"] for r in records(tmp_path) if r.get("type") != "checkpoint"]
    assert written == [f"req-{i}" for i in range(7)]
    report = verify([tmp_path], KEY)
    assert report.ok, report.describe()


@pytest.mark.parametrize("kind", ["process", "inline"])
def test_the_policy_flush_is_how_long_a_record_waits_in_its_worker(kind: str) -> None:
    text = BASE + f"audit: {{sinks: [stdout], flush: 750ms, writer: {kind}}}\n"
    policy = load_policy_text(text, "p.yaml")
    assert policy.audit is not None
    trail = AuditTrail.from_policy(policy.audit, instance="gw", worker=0)
    assert isinstance(trail.writer, InlineWriter if kind == "inline" else WriterProcess)
    assert trail.writer._send_every == 0.75
