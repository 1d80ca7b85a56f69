"""The audit writer process (``gateway.audit.remote.WriterProcess``): a real
child process per writer, real signals, real files, a real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.admin import create_admin_app
from gateway.audit import AuditClosedError, AuditWriter, verify
from gateway.audit.config import AuditConfig
from gateway.audit.remote import WriterProcess, WriterProcessError
from gateway.audit.sealer import RecordSealer
from gateway.proxy import Gateway
from gateway.recording import AuditTrail
from tests.conftest import ROOT, Stack, default_policy
from tests.test_audit_e2e import lock_free
from tests.test_audit_helpers import (
    KEY,
    PSEUDONYM_KEY,
    RedisServer,
    complete_lines,
    file_config,
    until,
)

T0 = 1_795_000_000.0


def facts(i: int, **changes: Any) -> tuple[Any, ...]:
    """A request's facts as ``gateway.recording.snapshot`` takes them."""
    values: dict[str, Any] = {
        "bytes_in": i,
        "bytes_out": 100 + i,
        "network": "203.0.113.0/24",
        "ip": f"203.0.113.{i % 250}",
        "decision": ("allow", "deny", "shadow_deny")[i % 3],
        "degraded": False,
        "latency": 0.00125 + i / 1000,  # seconds
        "method": "GET",
        "mode": "enforce",
        "path": f"/crm/v1/acme/leads/{i}",
        "plan": "pro",
        "policy_rev": "r1",
        "reason": (None, "forbidden_role", "rate_limited")[i % 3],
        "request_id": f"req-{i}",
        "roles": ("agent",),
        "route": "leads",
        "rule": None,
        "session": "s1",
        "signals": (),
        "status": (200, 403, 200)[i % 3],
        "subject": "alice",
        "tenant": "acme",
        "ts": T0 + i,
        "upstream": "crm",
        "upstream_status": 200,
    }
    values.update(changes)
    return tuple(values.values())


def config(base: Path, **overrides: Any) -> AuditConfig:
    return file_config(base, flush_interval=0.002, **overrides)


def record_lines(base: Path, chain: str = "gw-w0") -> list[bytes]:
    lines = []
    for file in sorted((base / chain).glob("audit-*.jsonl")):
        lines += [x for x in complete_lines(file) if b'"type":"checkpoint"' not in x]
    return lines


def records(base: Path, chain: str = "gw-w0") -> list[dict[str, Any]]:
    out = []
    for file in sorted((base / chain).glob("audit-*.jsonl")):
        out += [orjson.loads(x) for x in complete_lines(file)]
    return out


async def offer_all(writer: WriterProcess | AuditWriter, items: list[tuple[Any, ...]]) -> None:
    for item in items:
        if not writer.offer_facts(item):
            await writer.write_facts(item)


async def write_all(writer: Any, items: list[tuple[Any, ...]]) -> None:
    """Start ``writer``, offer it ``items`` (waiting for room), close it: all written."""
    await writer.start()
    await offer_all(writer, items)
    await writer.aclose()
    assert writer.state == "closed" and writer.written == len(items)


def parity_items() -> list[tuple[Any, ...]]:
    """Facts whose records every writer must write byte for byte alike."""
    items = [facts(i) for i in range(300)]
    items.append(facts(300, path='/crm/ünïcode/\x00"quote"', signals=("scraping", "x")))
    # Numbers must cross the process boundary exactly: the sealer rounds and
    # formats them on the other side.
    items.append(facts(301, latency=0.30000000000000004, ts=T0 + 0.0005, bytes_out=2**63 - 1))
    items.append(facts(302, latency=1e-07, ts=T0 + 0.9999, roles=(), network=None, ip=None))
    # Facts no body can hold (an int past 64 bits) go as JSON: the same line.
    items.append(facts(303, bytes_out=2**70))
    return items


async def plain_lines(base: Path, items: list[tuple[Any, ...]]) -> list[bytes]:
    """The record lines of ``items`` as the writer on the event loop seals them
    from their facts, one by one. No checkpoint before the final one: two runs'
    checkpoints carry different times, and every later record's prev with them."""
    plain = AuditWriter(
        config(base, checkpoint_every=10_000),
        facts_sealer=RecordSealer("gw", PSEUDONYM_KEY).seal,
    )
    await write_all(plain, items)
    lines = record_lines(base)
    assert len(lines) == len(items)
    return lines


async def test_the_process_writes_the_bytes_the_event_loop_writer_writes(tmp_path: Path) -> None:
    items = parity_items()
    expected = await plain_lines(tmp_path / "plain", items)
    remote_config = config(tmp_path / "remote", checkpoint_every=10_000)
    await write_all(WriterProcess(remote_config, ip_key=PSEUDONYM_KEY), items)
    assert record_lines(tmp_path / "remote") == expected
    report = verify([tmp_path / "remote"], KEY)
    assert report.ok, report.describe()


async def test_close_drains_writes_a_final_checkpoint_and_the_process_exits(
    tmp_path: Path,
) -> None:
    writer = WriterProcess(config(tmp_path), ip_key=PSEUDONYM_KEY)
    await writer.start()
    pid = writer.pid
    assert pid is not None and pid != os.getpid()
    await offer_all(writer, [facts(i) for i in range(50)])
    assert writer.queue_depth > 0  # handed over, not yet reported written
    await writer.write({"decision": "note", "detail": "a record that is not a request's"})
    await writer.aclose()
    assert writer.queue_depth == 0 and writer.written == 51
    assert writer.exit_code == 0
    last = records(tmp_path)[-1]
    assert last["type"] == "checkpoint" and last.get("final") is True
    assert writer.seq == last["seq"]
    report = verify([tmp_path], KEY)
    assert report.ok and report.chains["gw-w0"].records == 51, report.describe()
    # Closed: nothing more is taken, and the trail says so.
    assert not writer.offer_facts(facts(99))
    with pytest.raises(AuditClosedError):
        await writer.write_facts(facts(99))


async def test_reserved_fields_are_refused_in_the_worker(tmp_path: Path) -> None:
    writer = WriterProcess(config(tmp_path), ip_key=PSEUDONYM_KEY)
    await writer.start()
    try:
        with pytest.raises(ValueError, match="seq"):
            await writer.write({"decision": "x", "seq": 1})
    finally:
        await writer.aclose()
    assert verify([tmp_path], KEY).ok


async def test_a_value_json_cannot_hold_becomes_a_record_of_the_failure(tmp_path: Path) -> None:
    class Tenant(str):
        pass

    writer = WriterProcess(config(tmp_path), ip_key=PSEUDONYM_KEY)
    await writer.start()
    # A str subclass is written as the plain string; an object nothing can
    # write still takes its place in the chain, saying its record failed.
    await offer_all(writer, [facts(0, tenant=Tenant("acme")), facts(1, tenant=object())])
    await writer.aclose()
    first, second = [r for r in records(tmp_path) if r.get("type") != "checkpoint"]
    assert first["tenant"] == "acme" and first["request_id"] == "req-0"
    assert second["decision"] == "unknown" and "not built" in second["error"]
    assert verify([tmp_path], KEY).ok


async def test_facts_the_worker_cannot_write_are_recorded_as_failed_not_raised(
    tmp_path: Path,
) -> None:
    """The worker writes each record's body on the request's path: a body it
    cannot write (a time no calendar holds) must not fail the request; the
    facts go over as they are and the writer process records the failure in
    the record's place."""
    writer = WriterProcess(config(tmp_path), ip_key=PSEUDONYM_KEY)
    await writer.start()
    await offer_all(writer, [facts(0), facts(1, ts=1e300), facts(2)])
    await writer.aclose()
    written = [r for r in records(tmp_path) if r.get("type") != "checkpoint"]
    assert [r.get("request_id") for r in written] == ["req-0", None, "req-2"]
    assert written[1]["decision"] == "unknown" and "not built" in written[1]["error"]
    assert verify([tmp_path], KEY).ok


async def test_a_sink_that_cannot_open_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the audit directory should be")
    writer = WriterProcess(config(blocker), ip_key=PSEUDONYM_KEY)
    with pytest.raises(WriterProcessError, match="not-a-dir"):
        await writer.start()
    assert writer.state == "closed" and writer.pid is None


async def test_signals_for_the_gateway_do_not_cut_the_trail(tmp_path: Path) -> None:
    """A Ctrl-C reaches the whole process group; SIGTERM and SIGHUP may too.
    The writer process keeps writing until its worker closes the trail."""
    writer = WriterProcess(config(tmp_path), ip_key=PSEUDONYM_KEY)
    await writer.start()
    assert writer.pid is not None
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        os.kill(writer.pid, sig)
    await offer_all(writer, [facts(i) for i in range(20)])
    await until(lambda: writer.written == 20, what="records written after the signals")
    assert writer.healthy
    await writer.aclose()
    assert writer.exit_code == 0
    assert verify([tmp_path], KEY).ok


async def test_a_writer_process_that_dies_is_replaced_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    writer = WriterProcess(config(tmp_path, checkpoint_every=10_000), ip_key=PSEUDONYM_KEY)
    trail = AuditTrail(writer, deny_when_unhealthy=True)
    await writer.start()
    assert await trail.admit() is None
    await offer_all(writer, [facts(i) for i in range(40)])
    await until(lambda: writer.written == 40, what="the first records")
    first = writer.pid
    assert first is not None
    # Stopped, it writes nothing more; killed, it never reports what it took.
    os.kill(first, signal.SIGSTOP)
    await offer_all(writer, [facts(i) for i in range(40, 60)])
    writer._send()
    os.kill(first, signal.SIGKILL)
    await until(lambda: writer.pid not in (None, first), what="a new writer process")
    await offer_all(writer, [facts(i) for i in range(60, 80)])
    await until(lambda: writer.written == 80 and writer.healthy, timeout=10, what="the rest")
    assert await trail.admit() is None
    await writer.aclose()
    assert writer.exit_code == 0
    written = [r for r in records(tmp_path) if r.get("type") != "checkpoint"]
    # Every record exactly once, in order; the chain says where it recovered.
    assert [r["request_id"] for r in written] == [f"req-{i}" for i in range(80)]
    assert any(r.get("recovered") for r in records(tmp_path))
    report = verify([tmp_path], KEY)
    assert report.ok, report.describe()


@pytest.mark.parametrize("same_ids", [False, True], ids=["ids", "one-id-for-all"])
async def test_records_written_but_not_reported_are_not_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_ids: bool
) -> None:
    """A process may write records and die before it reports them: its
    successor counts what the chain holds after the last seq reported and
    skips exactly those, whether the chain ends on a checkpoint (every 5
    records here) and whatever the request ids (a client may send its own)."""
    from gateway.audit import remote

    real_read = remote.frames.read
    muted = False

    async def read(reader: asyncio.StreamReader) -> Any:
        while True:  # the worker misses the process's reports while muted
            message = await real_read(reader)
            if not (muted and message[0] == "status"):
                return message

    monkeypatch.setattr(remote.frames, "read", read)

    def item(i: int) -> tuple[Any, ...]:
        return facts(i, request_id="same") if same_ids else facts(i)

    writer = WriterProcess(config(tmp_path, checkpoint_every=5), ip_key=PSEUDONYM_KEY)
    await writer.start()
    await offer_all(writer, [item(i) for i in range(20)])
    await until(lambda: writer.written == 20, what="the first records")
    muted = True
    await offer_all(writer, [item(i) for i in range(20, 40)])
    writer._send()

    def on_disk() -> int:
        return sum(1 for r in records(tmp_path) if r.get("type") != "checkpoint")

    await until(lambda: on_disk() == 40, what="records written, not reported")
    assert writer.written == 20 and writer.queue_depth == 20
    first = writer.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await until(lambda: writer.pid not in (None, first) and writer.healthy, what="a successor")
    muted = False
    await offer_all(writer, [item(i) for i in range(40, 60)])
    await until(lambda: writer.written == 60, timeout=10, what="the rest")
    await writer.aclose()
    written = [r for r in records(tmp_path) if r.get("type") != "checkpoint"]
    assert [r["bytes_in"] for r in written] == list(range(60))  # each once, in order
    report = verify([tmp_path], KEY)
    assert report.ok, report.describe()


async def test_aclose_right_after_the_process_died_still_writes_everything(
    tmp_path: Path,
) -> None:
    """aclose may come while the death of the process is being noticed: the
    records it held go to a successor, which then closes the trail."""
    writer = WriterProcess(config(tmp_path), ip_key=PSEUDONYM_KEY)
    await writer.start()
    first = writer.pid
    assert first is not None
    os.kill(first, signal.SIGSTOP)
    await offer_all(writer, [facts(i) for i in range(20)])
    writer._send()
    os.kill(first, signal.SIGKILL)
    await writer.aclose(timeout=30)
    assert writer.queue_depth == 0 and writer.written == 20
    written = [r for r in records(tmp_path) if r.get("type") != "checkpoint"]
    assert [r["request_id"] for r in written] == [f"req-{i}" for i in range(20)]
    assert records(tmp_path)[-1].get("final") is True
    assert verify([tmp_path], KEY).ok


async def test_a_restart_that_fails_with_an_os_error_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors for a moment, say: the next attempt succeeds."""
    from gateway.audit import remote

    writer = WriterProcess(config(tmp_path), ip_key=PSEUDONYM_KEY)
    await writer.start()
    real = remote.socket.socketpair
    failures = [OSError(24, "Too many open files")]

    def socketpair() -> Any:
        if failures:
            raise failures.pop()
        return real()

    monkeypatch.setattr(remote.socket, "socketpair", socketpair)
    first = writer.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await until(lambda: writer.pid not in (None, first) and writer.healthy, what="a successor")
    assert not failures and writer.failures >= 1
    await offer_all(writer, [facts(i) for i in range(3)])
    await writer.aclose(timeout=30)
    assert writer.written == 3


@pytest.mark.parametrize(
    "corrupt",
    [
        b"\x00\x00\x00\x03abc",  # a frame that is not JSON
        b"\xff\xff\xff\xff",  # a header claiming a 2 GB batch: nothing after it can be framed
    ],
    ids=["not-json", "header-too-large"],
)
async def test_a_process_that_stops_itself_on_an_error_is_replaced(
    tmp_path: Path, corrupt: bytes
) -> None:
    """Whatever the corruption, it stops at once (within ``until``'s 5 s),
    its successor takes over the chain, and no record handed over before or
    after is lost."""
    writer = WriterProcess(config(tmp_path), ip_key=PSEUDONYM_KEY)
    await writer.start()
    first = writer.pid
    await offer_all(writer, [facts(i) for i in range(3)])
    await until(lambda: writer.written == 3, what="the first records")
    assert writer._child is not None
    writer._child.out.write(corrupt)
    await until(lambda: writer.pid not in (None, first), what="a new writer process")
    await offer_all(writer, [facts(i) for i in range(3, 8)])
    await until(lambda: writer.written == 8 and writer.healthy, timeout=10)
    await writer.aclose()
    assert [r["request_id"] for r in records(tmp_path) if "request_id" in r] == [
        f"req-{i}" for i in range(8)
    ]
    report = verify([tmp_path], KEY)
    assert report.ok, report.describe()


async def test_aclose_gives_up_after_its_timeout_even_with_writers_parked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.audit import remote

    monkeypatch.setattr(remote, "EXIT_GRACE", 0.5)
    writer = WriterProcess(config(tmp_path, queue_size=4), ip_key=PSEUDONYM_KEY)
    await writer.start()
    assert writer.pid is not None
    os.kill(writer.pid, signal.SIGSTOP)  # a writer process that makes no progress
    await offer_all(writer, [facts(i) for i in range(4)])
    parked = asyncio.create_task(writer.write_facts(facts(4)))
    await until(lambda: writer._waiting == 1, what="a parked writer")
    await asyncio.wait_for(writer.aclose(timeout=0.5), timeout=30)
    assert writer.state == "closed"
    with pytest.raises(AuditClosedError):
        await parked
    assert writer.exit_code is not None  # stopped for good, not left behind


WORKER = textwrap.dedent(
    """
    import asyncio, os, signal, sys, time
    from gateway.audit.remote import WriterProcess
    from tests.test_audit_process import config, facts
    from tests.test_audit_helpers import PSEUDONYM_KEY
    from pathlib import Path

    async def main():
        cfg = config(Path(sys.argv[1]), batch_size=1000, checkpoint_every=10_000)
        writer = WriterProcess(cfg, ip_key=PSEUDONYM_KEY)
        await writer.start()
        for i in range(120):
            assert writer.offer_facts(facts(i))
        writer._send()  # handed over: 120 records the process must still write
        for i in range(120, 130):
            assert writer.offer_facts(facts(i))  # still in the worker: lost with it
        print(writer.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def test_a_killed_worker_loses_only_what_it_had_not_handed_over(tmp_path: Path) -> None:
    worker = subprocess.run(
        [sys.executable, "-c", WORKER, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert worker.returncode == -signal.SIGKILL, worker.stderr
    writer_pid = int(worker.stdout.split()[0])
    # The orphaned writer process drains what it received, then lets go of the chain.
    await until(lambda: lock_free(tmp_path / "gw-w0" / ".lock"), timeout=20, what="the drain")
    await until(lambda: not Path(f"/proc/{writer_pid}").exists(), what="the process to exit")
    written = [r for r in records(tmp_path) if r.get("type") != "checkpoint"]
    assert [r["request_id"] for r in written] == [f"req-{i}" for i in range(120)]
    assert not any(r.get("final") for r in records(tmp_path))
    report = verify([tmp_path], KEY)
    assert not report.ok
    assert {p.kind for p in report.problems} == {"truncation"}, report.describe()

    # The next run continues the chain and says the last one stopped uncleanly.
    again = WriterProcess(config(tmp_path), ip_key=PSEUDONYM_KEY)
    await again.start()
    await offer_all(again, [facts(200)])
    await again.aclose()
    after = records(tmp_path)
    assert [r["seq"] for r in after] == list(range(1, len(after) + 1))
    assert any(r.get("recovered") for r in after)


async def test_backpressure_and_deny_while_the_redis_sink_is_down(tmp_path: Path) -> None:
    """Records count against the queue until the process reports them written;
    a full queue parks writers in order; the sink's health reaches the worker."""
    own = RedisServer().start()
    back = RedisServer(own.port)
    try:
        cfg = config(
            tmp_path,
            sinks=(f"{own.url}?stream=proc:audit",),
            on_sink_failure="deny",
            queue_size=5,
            batch_size=2,
        )
        writer = WriterProcess(cfg, ip_key=PSEUDONYM_KEY)
        await writer.start()
        await offer_all(writer, [facts(0)])
        await until(lambda: writer.written == 1, what="the first record")
        own.stop()
        await offer_all(writer, [facts(i) for i in range(1, 6)])  # five: the queue's bound
        await until(lambda: not writer.healthy, timeout=10, what="the failure to be reported")
        assert writer.failures >= 1 and writer.written == 1
        assert writer.queue_depth == 5
        assert not writer.offer_facts(facts(6))  # full: the caller must wait
        parked = [asyncio.create_task(writer.write_facts(facts(i))) for i in (6, 7)]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in parked)
        back.start()  # the same port, empty
        await until(lambda: writer.healthy and writer.written == 8, timeout=15, what="recovery")
        await asyncio.gather(*parked)
        await writer.aclose()
        from tests.test_audit_redis import stream_lines

        lines = await stream_lines(own.url, "proc:audit")
        ids = [orjson.loads(x).get("request_id") for x in lines]
        assert [i for i in ids if i] == [f"req-{i}" for i in range(1, 8)]  # in order
    finally:
        own.stop()
        back.stop()


async def test_records_reach_the_file_within_moments_without_a_full_batch(
    tmp_path: Path,
) -> None:
    writer = WriterProcess(config(tmp_path, batch_size=1000), ip_key=PSEUDONYM_KEY)
    await writer.start()
    try:
        await offer_all(writer, [facts(0)])
        # Handed over by the worker's timer, written by the process's flush.
        await until(lambda: len(record_lines(tmp_path)) == 1, what="the lone record on disk")
        await until(lambda: writer.written == 1 and writer.queue_depth == 0)
    finally:
        await writer.aclose()


async def test_health_and_readiness_say_whether_the_trail_can_record(stack: Stack) -> None:
    gateway = Gateway(default_policy(stack))
    assert gateway.audit is not None
    transport = httpx.ASGITransport(app=create_admin_app(gateway, None))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as admin:
        await gateway.audit.writer.start()
        assert (await admin.get("/healthz")).status_code == 200
        assert (await admin.get("/readyz")).json()["checks"]["audit"] is True
        await gateway.audit.writer.aclose()
        # A trail that stopped for good: only a restart helps.
        health = await admin.get("/healthz")
        assert health.status_code == 503 and health.json() == {"status": "audit trail stopped"}
        ready = await admin.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["audit"] is False


def test_what_the_process_reports_written_is_forgotten_frame_by_frame(tmp_path: Path) -> None:
    """The worker keeps each frame it handed over until every record of it is
    reported written (a successor is handed the rest of a frame, not all of it)."""
    from gateway.audit import frames

    sealer = RecordSealer("gw", PSEUDONYM_KEY)
    bodies = [sealer.body(facts(i)) for i in range(5)]
    first, second = frames.encode_batch(bodies[:3]), frames.encode_batch(bodies[3:])
    writer = WriterProcess(config(tmp_path), ip_key=PSEUDONYM_KEY)
    writer._handed.extend([[first, 3], [second, 2]])
    writer._handed_count = writer._pending = 5
    assert writer._done(1) == 1
    assert writer.queue_depth == 4 and writer._first_done == 1 and len(writer._handed) == 2
    assert writer._done(3) == 3  # the rest of the first frame, one of the second
    assert list(writer._handed) == [[second, 2]] and writer._first_done == 1
    assert frames.drop_entries(second, writer._first_done) == frames.encode_batch(bodies[4:])
    assert writer._done(9) == 1  # never more than was handed over
    assert writer.queue_depth == 0 and not writer._handed and writer._first_done == 0


async def test_a_successor_is_handed_the_rest_of_a_partly_written_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The worker heard that the first 10 records of a 30-record hand-over were
    written, then its writer process died: with no file to ask what else it
    wrote (a stdout sink), its successor is handed exactly the other 20."""
    from gateway.audit import remote

    real_read = remote.frames.read
    first: list[Any] = []

    async def read(reader: asyncio.StreamReader) -> Any:
        while True:  # the first process's reports stop at 10 records written
            message = await real_read(reader)
            late = message[0] == "status" and message[1] > 10
            if not (late and first and reader is first[0].reader):
                return message

    monkeypatch.setattr(remote.frames, "read", read)
    # A checkpoint every 10 records splits the run: it is written 10 at a time.
    cfg = file_config(tmp_path, sinks=("stdout",), batch_size=10, checkpoint_every=10)
    writer = WriterProcess(cfg, ip_key=PSEUDONYM_KEY)
    await writer.start()
    first.append(writer._child)
    writer._batch_size = 1000  # this worker hands the 30 records over at once
    for i in range(30):
        assert writer.offer_facts(facts(i))
    writer._send()
    await until(lambda: writer.written == 10, what="the first 10 reported")
    assert writer.queue_depth == 20
    pid = writer.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await until(lambda: writer.written == 30, timeout=10, what="the rest, by a successor")
    await writer.aclose()
    lines = [orjson.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith("{")]
    # Each process began a chain of its own at seq 1 (stdout cannot be resumed).
    successor = lines[max(i for i, r in enumerate(lines) if r["seq"] == 1) :]
    handed_again = [r["request_id"] for r in successor if r.get("type") != "checkpoint"]
    assert handed_again == [f"req-{i}" for i in range(10, 30)]
    assert writer.queue_depth == 0 and writer.written == 30
