"""The writer: order, backpressure, failure policies, rotation, retention, fsync,
and cancellation. Real files in tmp_path; waits are on conditions."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.audit import AuditClosedError, AuditWriter, verify
from gateway.audit.sinks import ChainBusyError, FileSink, StdoutSink
from gateway.audit.writer import sealing
from tests.test_audit_helpers import (
    KEY,
    FlakySink,
    GateSink,
    MemorySink,
    chain_files,
    file_config,
    make_record,
    read_records,
    until,
)


async def test_records_keep_call_order_and_get_seq_chain_prev_hash(tmp_path: Path) -> None:
    sink = MemorySink()
    writer = AuditWriter(file_config(tmp_path, checkpoint_every=1000), sinks=[sink])
    await writer.start()
    await asyncio.gather(*(writer.write(make_record(i)) for i in range(100)))
    await writer.aclose()
    records = sink.records()
    assert [r["request_id"] for r in records[:-1]] == [f"req-{i}" for i in range(100)]
    assert [r["seq"] for r in records] == list(range(1, 102))
    assert {r["chain"] for r in records} == {"gw-w0"}
    assert records[-1]["type"] == "checkpoint" and records[-1]["covers"] == 100
    assert (writer.written, writer.checkpoints, writer.queue_depth) == (100, 1, 0)
    assert sink.closed


async def test_a_full_queue_makes_write_wait_and_drops_nothing(tmp_path: Path) -> None:
    gate = GateSink()
    writer = AuditWriter(file_config(tmp_path, queue_size=2, batch_size=1), sinks=[gate])
    await writer.start()
    done: list[int] = []

    async def produce() -> None:
        for i in range(10):
            await writer.write(make_record(i))
            done.append(i)

    producer = asyncio.create_task(produce())
    await until(lambda: gate.entered.is_set() and writer.queue_depth == 2 and len(done) == 2)
    # Nothing moves while the sink is stalled: the third write waits.
    await asyncio.wait({producer}, timeout=0.05)
    assert not producer.done() and len(done) == 2 and writer.queue_depth == 2
    late = asyncio.gather(*(writer.write(make_record(i)) for i in range(10, 20)))
    gate.release.set()
    await producer
    await late
    await writer.aclose()
    records = gate.records()
    assert [r["seq"] for r in records] == list(range(1, writer.seq + 1))
    ids = [int(r["request_id"][4:]) for r in records if r.get("type") != "checkpoint"]
    # All there, and each writer's records in its own order (parked writers are FIFO).
    assert sorted(ids) == list(range(20))
    assert [i for i in ids if i < 10] == list(range(10))
    assert [i for i in ids if i >= 10] == list(range(10, 20))
    assert writer.written == 20


async def test_deny_mode_is_unhealthy_while_a_sink_fails_and_loses_nothing(
    tmp_path: Path,
) -> None:
    flaky = FlakySink(broken=True)
    files = FileSink(tmp_path, "gw-w0")
    config = file_config(tmp_path, on_sink_failure="deny", checkpoint_every=1000)
    writer = AuditWriter(config, sinks=[files, flaky])
    await writer.start()
    assert writer.healthy
    for i in range(5):
        await writer.write(make_record(i))  # deny mode still queues: the gateway refuses
    await until(lambda: not writer.healthy and flaky.attempts >= 2)
    assert writer.failures >= 1 and writer.written == 0 and writer.queue_depth == 5
    await writer.write(make_record(5))  # refusals are audited too
    flaky.broken = False
    await until(lambda: writer.healthy and writer.written == 6)
    await writer.aclose()
    assert [r["seq"] for r in flaky.records()] == list(range(1, 8))
    # The file sink took each batch once, however often the other one was retried.
    assert [r["seq"] for r in read_records(chain_files(tmp_path))] == list(range(1, 8))
    assert verify([tmp_path], KEY).ok


async def test_block_mode_makes_write_wait_until_the_sink_recovers(tmp_path: Path) -> None:
    flaky = FlakySink(broken=True)
    writer = AuditWriter(file_config(tmp_path, on_sink_failure="block"), sinks=[flaky])
    await writer.start()
    await writer.write(make_record(0))
    await until(lambda: not writer.healthy)
    blocked = asyncio.create_task(writer.write(make_record(1)))
    await asyncio.wait({blocked}, timeout=0.05)
    assert not blocked.done() and writer.queue_depth == 1
    flaky.broken = False
    await blocked
    await until(lambda: writer.written == 2)
    assert writer.healthy
    await writer.aclose()
    assert [r.get("request_id") for r in flaky.records()][:2] == ["req-0", "req-1"]


async def test_checkpoints_every_n_records_and_every_interval(tmp_path: Path) -> None:
    sink = MemorySink()
    writer = AuditWriter(
        file_config(tmp_path, checkpoint_every=4, checkpoint_interval=0.05), sinks=[sink]
    )
    await writer.start()
    for i in range(9):
        await writer.write(make_record(i))
    # 4 + cp + 4 + cp, then one record left: the interval checkpoints it.
    await until(lambda: writer.checkpoints == 3)
    records = sink.records()
    kinds = ["c" if r.get("type") == "checkpoint" else "r" for r in records]
    assert "".join(kinds) == "rrrrcrrrrcrc"
    cp = records[-1]
    assert cp["covers"] == cp["seq"] - 1 and cp["count"] == 1 and len(cp["sig"]) == 64
    assert cp["alg"] == "hmac-sha256" and "final" not in cp
    await asyncio.sleep(0.12)  # idle: no new records, so no more checkpoints
    assert writer.checkpoints == 3
    await writer.aclose()
    assert sink.records()[-1]["final"] is True


async def test_rotation_by_size_makes_several_files_and_verify_passes(tmp_path: Path) -> None:
    config = file_config(tmp_path, rotate_bytes=4000, batch_size=4)
    writer = AuditWriter(config)
    await writer.start()
    for i in range(60):
        await writer.write(make_record(i))
    await writer.aclose()
    files = chain_files(tmp_path)
    assert len(files) >= 4
    assert all(f.stat().st_size <= 4000 for f in files)
    assert [r["seq"] for r in read_records(files)] == list(range(1, writer.seq + 1))
    report = verify([tmp_path], KEY)
    assert report.ok, report.describe()


async def test_retention_deletes_old_files(tmp_path: Path) -> None:
    offset = [0.0]
    config = file_config(tmp_path, rotate_seconds=3600, retention_seconds=86_400)
    writer = AuditWriter(config, clock=lambda: time.time() + offset[0])
    await writer.start()
    for i in range(5):
        await writer.write(make_record(i))
    await until(lambda: writer.written == 5)
    [old] = chain_files(tmp_path)
    offset[0] = 2 * 86_400  # two days later: rotate by age, and the old file expires
    for i in range(5, 10):
        await writer.write(make_record(i))
    await until(lambda: writer.written == 10)
    await writer.aclose()
    files = chain_files(tmp_path)
    assert not old.exists() and len(files) == 1
    report = verify([tmp_path], KEY)
    assert report.ok, report.describe()
    assert report.chains["gw-w0"].first_seq == 6  # the head went with retention


async def test_files_are_private(tmp_path: Path) -> None:
    writer = AuditWriter(file_config(tmp_path, worker=1))
    await writer.start()
    await writer.write(make_record(0))
    await writer.aclose()
    [file] = chain_files(tmp_path, "gw-w1")
    assert stat.S_IMODE(file.stat().st_mode) & 0o007 == 0


async def test_one_writer_per_chain(tmp_path: Path) -> None:
    """Two live writers continuing one chain would fork it: the second one
    writes a chain of its own, and the first chain is continued after it."""
    first = AuditWriter(file_config(tmp_path))
    await first.start()
    with pytest.raises(ChainBusyError, match=r"gw-w0 .* already being written"):
        await FileSink(tmp_path, "gw-w0").open()
    second = AuditWriter(file_config(tmp_path))
    await second.start()
    assert (first.chain_id, second.chain_id) == ("gw-w0", "gw-w0.2")
    for i in range(3):
        await first.write(make_record(i))
        await second.write(make_record(i))
    await first.aclose()
    await second.aclose()
    third = AuditWriter(file_config(tmp_path))
    await third.start()  # the lock went with the first writer: its chain goes on
    await third.write(make_record(9))
    await third.aclose()
    assert (third.chain_id, third.seq) == ("gw-w0", first.seq + 2)
    report = verify([tmp_path], KEY)
    assert report.ok, report.describe()
    assert sorted(report.chains) == ["gw-w0", "gw-w0.2"]


@pytest.mark.parametrize("threaded", [True, False], ids=["thread", "on-the-loop"])
@pytest.mark.parametrize(
    ("policy", "per_batch", "on_close"), [("always", 5, 1), ("batch", 1, 1), ("never", 0, 0)]
)
async def test_fsync_policy(
    tmp_path: Path, policy: str, per_batch: int, on_close: int, threaded: bool
) -> None:
    """The same on the sink's thread and on the loop (a writer process's files)."""
    calls: list[int] = []

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        os.fsync(fd)

    sink = FileSink(
        tmp_path,
        "gw-w0",
        fsync=policy,  # type: ignore[arg-type]
        fsync_fn=counting_fsync,
        threaded=threaded,
    )
    await sink.open()
    lines = [orjson.dumps(make_record(i)) + b"\n" for i in range(5)]
    await sink.write_batch(lines)  # creates the file (and syncs its directory)
    before = len(calls)
    # A run of records sealed at once comes as one chunk: "always" is still
    # one fsync per record.
    await sink.write_batch([lines[0], b"".join(lines[1:4]), lines[4]])
    assert len(calls) - before == per_batch
    before = len(calls)
    await sink.aclose()
    assert len(calls) - before >= on_close
    assert len(chain_files(tmp_path)[0].read_bytes().splitlines()) == 10


@pytest.mark.parametrize("threaded", [True, False], ids=["thread", "on-the-loop"])
async def test_a_failed_file_write_is_taken_back_whole(tmp_path: Path, threaded: bool) -> None:
    failing = [True]

    def fsync_fails_once(fd: int) -> None:
        if failing[0] and stat.S_ISREG(os.fstat(fd).st_mode):
            failing[0] = False
            raise OSError(28, "No space left on device")

    sink = FileSink(tmp_path, "gw-w0", fsync="batch", fsync_fn=fsync_fails_once, threaded=threaded)
    writer = AuditWriter(file_config(tmp_path), sinks=[sink])
    await writer.start()
    for i in range(3):
        await writer.write(make_record(i))
    await writer.aclose()
    assert writer.failures == 1
    assert [r["seq"] for r in read_records(chain_files(tmp_path))] == [1, 2, 3, 4]
    assert verify([tmp_path], KEY).ok


async def test_aclose_survives_being_cancelled_and_can_be_awaited_again(tmp_path: Path) -> None:
    gate = GateSink()
    writer = AuditWriter(file_config(tmp_path), sinks=[gate])
    await writer.start()
    for i in range(20):
        await writer.write(make_record(i))
    await until(gate.entered.is_set)
    closing = asyncio.create_task(writer.aclose())
    await asyncio.wait({closing}, timeout=0.02)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert not writer.healthy  # closing: the gateway should not start requests
    await writer.write(make_record(20))  # a request that ends during the drain: kept
    gate.release.set()
    await writer.aclose()
    records = gate.records()
    assert [r["seq"] for r in records] == list(range(1, writer.seq + 1))
    assert records[-1]["final"] is True and writer.written == 21
    with pytest.raises(AuditClosedError):
        await writer.write(make_record(99))


def test_a_cancelled_writer_leaves_only_whole_lines(tmp_path: Path) -> None:
    """The event loop ends mid-batch (the consumer task is cancelled while its
    batch is on the file thread): the file still holds only whole lines, and
    verify calls it what it is, a missing final checkpoint."""
    in_fsync, release, finished = threading.Event(), threading.Event(), threading.Event()

    def stalled_fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode) and not finished.is_set():
            in_fsync.set()
            release.wait(5)
            finished.set()

    async def scenario() -> None:
        sink = FileSink(tmp_path, "gw-w0", fsync="batch", fsync_fn=stalled_fsync)
        writer = AuditWriter(file_config(tmp_path, batch_size=64), sinks=[sink])
        await writer.start()
        for i in range(25):  # the last 5 after the checkpoint at 20
            await writer.write(make_record(i))
        while not in_fsync.is_set():
            await asyncio.sleep(0.002)
        # Return without aclose: asyncio.run cancels the consumer mid-batch.

    asyncio.run(scenario())
    release.set()
    assert finished.wait(5)
    [file] = chain_files(tmp_path)
    data = file.read_bytes()
    assert data.endswith(b"\n")
    assert all(orjson.loads(line) for line in data.splitlines())
    [problem] = verify([tmp_path], KEY).problems
    assert problem.kind == "truncation" and "5 record(s)" in problem.detail


async def test_write_refuses_reserved_fields_and_closed_writers(tmp_path: Path) -> None:
    writer = AuditWriter(file_config(tmp_path), sinks=[MemorySink()])
    with pytest.raises(AuditClosedError):
        await writer.write(make_record(0))  # not started
    await writer.start()
    for field in ("seq", "hash", "prev", "chain", "type"):
        with pytest.raises(ValueError):
            await writer.write({**make_record(0), field: "x"})
    await writer.aclose()
    assert not writer.healthy
    with pytest.raises(AuditClosedError):
        await writer.write(make_record(1))
    await writer.aclose()  # twice is fine


async def test_relative_file_sink_and_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = io.BytesIO()
    config = file_config(tmp_path, sinks=("file://var/audit",))
    writer = AuditWriter(config)
    await writer.start()
    await writer.write(make_record(0))
    await writer.aclose()
    assert verify(["var/audit"], KEY).ok
    stdout = StdoutSink(out)
    echo = AuditWriter(file_config(tmp_path, worker=1), sinks=[stdout])
    await echo.start()
    await echo.write(make_record(1))
    await echo.aclose()
    assert [orjson.loads(line)["seq"] for line in out.getvalue().splitlines()] == [1, 2]


async def test_lazy_records_are_built_when_sealed_and_a_failed_build_keeps_its_place(
    tmp_path: Path,
) -> None:
    """``write_lazy`` queues what a record is made from; the consumer builds it
    in queue order. A build that raises still takes a seq (the trail shows a
    record failed) and the chain verifies."""
    writer = AuditWriter(file_config(tmp_path))
    await writer.start()
    built: list[int] = []

    def build(i: int) -> dict[str, object]:
        built.append(i)
        if i == 2:
            raise RuntimeError("a bug in a record builder")
        return make_record(i)

    for i in range(5):
        await writer.write_lazy(i, sealing(build))
    await writer.aclose()
    assert built == [0, 1, 2, 3, 4]
    records = read_records(chain_files(tmp_path))
    assert [r["seq"] for r in records] == list(range(1, 7))
    assert [r.get("request_id") for r in records[:5]] == ["req-0", "req-1", None, "req-3", "req-4"]
    assert records[2]["error"] == "audit record not built: RuntimeError"
    assert verify([tmp_path], KEY).ok


async def test_aclose_while_starting_leaves_the_writer_closed(tmp_path: Path) -> None:
    """A shutdown that comes while the sinks open must win: the writer must not
    come up afterwards and take records nobody will ever seal."""

    class SlowToOpen(MemorySink):
        def __init__(self) -> None:
            super().__init__()
            self.opening = asyncio.Event()
            self.release = asyncio.Event()

        async def open(self) -> None:
            self.opening.set()
            await self.release.wait()

    sink = SlowToOpen()
    writer = AuditWriter(file_config(tmp_path), sinks=[sink])
    starting = asyncio.create_task(writer.start())
    await sink.opening.wait()
    await writer.aclose()
    sink.release.set()
    with pytest.raises(AuditClosedError):
        await starting
    assert writer.state == "closed" and not writer.healthy and sink.closed
    with pytest.raises(AuditClosedError):
        await writer.write(make_record(0))


@pytest.mark.parametrize(
    ("queue_size", "checkpoint_every", "batch_size", "record_every"),
    [(40, 7, 16, 0), (40, 7, 16, 11), (5, 3, 2, 4), (300, 100, 64, 50), (10_000, 10_000, 256, 0)],
)
async def test_a_batch_handed_over_is_queued_as_one_write_per_record_would_be(
    tmp_path: Path, queue_size: int, checkpoint_every: int, batch_size: int, record_every: int
) -> None:
    """The writer process queues a worker's batch a run of record bodies at a
    time, each run sealed in one call (``offer_bodies``): the same lines,
    seqs and checkpoints as one ``offer_facts`` or ``write`` per item, across
    a full queue, checkpoint boundaries, records and facts among the bodies,
    and a body that is not one (its record says it failed, in its place)."""
    from gateway.audit import frames, sidecar
    from gateway.audit.sealer import RecordSealer
    from tests.test_records_parity import _proxied

    sealer = RecordSealer("gw", KEY)

    async def one_by_one(writer: AuditWriter, items: list[Any]) -> None:
        for item in items:
            if type(item) is dict:
                await writer.write(item)
            elif not writer.offer_facts(item if type(item) is bytes else tuple(item)):
                await writer.write_facts(item if type(item) is bytes else tuple(item))

    items: list[Any] = []
    for i in range(600):
        facts = list(_proxied(i / 1e5))
        facts[13] = f"req-{i}"
        if record_every and i % record_every == 3:
            items.append(make_record(i))
        elif record_every and i % record_every == 5:
            items.append(facts)  # a request whose body could not be written
        elif i == 100:
            items.append(b"\x00\x00\x00\x0enot a body!!!}")
        else:
            items.append(sealer.body(tuple(facts)))

    async def lines(queue: Any, handed: list[Any]) -> tuple[list[bytes], int, int]:
        sink = MemorySink()
        config = file_config(
            tmp_path,
            queue_size=queue_size,
            checkpoint_every=checkpoint_every,
            batch_size=batch_size,
            flush_interval=0,
        )
        writer = AuditWriter(
            config,
            sinks=[sink],
            clock=lambda: 1_700_000_000.5,
            facts_sealer=RecordSealer("gw", KEY).seal,
            bodies_sealer=RecordSealer("gw", KEY).seal_many,
        )
        await writer.start()
        for start in range(0, len(handed), 256):
            await queue(writer, handed[start : start + 256])
        await writer.aclose()
        return sink.lines, writer.written, writer.checkpoints

    expected = await lines(one_by_one, items)
    assert expected[1] == 600
    assert sum(b"audit record not built: ValueError" in line for line in expected[0]) == 1
    # As the writer process gets them: runs of bodies, facts as lists.
    handed = [
        entry
        for start in range(0, len(items), 256)
        for entry in frames.decode_batch(frames.encode_batch(items[start : start + 256])[4:])
    ]
    assert any(type(entry) is frames.Bodies and len(entry) > 1 for entry in handed)
    assert await lines(sidecar.queue, handed) == expected
