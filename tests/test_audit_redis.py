"""The Redis stream sink, against a redis-server of the tests' own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from gateway.audit import AuditConfig, AuditWriter, verify
from tests.test_audit_helpers import (
    KEY,
    RedisServer,
    chain_files,
    file_config,
    make_record,
    redis_server,
    until,
)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as running:
        yield running


async def stream_lines(url: str, stream: str) -> list[bytes]:
    """Every ``record`` field of ``stream``, oldest first."""
    client = Redis.from_url(url)
    try:
        entries = await client.xrange(stream) or []
    finally:
        await client.aclose()
    lines: list[bytes] = []
    for _, fields in entries:
        raw = (fields or {})[b"record"]
        lines.append(raw if isinstance(raw, bytes) else raw.encode())
    return lines


def redis_config(base: Path, url: str, *extra: str, **overrides: object) -> AuditConfig:
    return file_config(base, sinks=(*extra, url), **overrides)


async def test_xadd_lands_in_the_stream_with_approximate_maxlen(
    tmp_path: Path, server: RedisServer
) -> None:
    url = f"{server.url}?stream=t1:audit&maxlen=100"
    config = redis_config(tmp_path, url, f"file://{tmp_path}", batch_size=64)
    writer = AuditWriter(config)
    await writer.start()
    for i in range(1000):
        await writer.write(make_record(i))
    await writer.aclose()
    client = Redis.from_url(server.url)
    try:
        length = await client.xlen("t1:audit")
    finally:
        await client.aclose()
    # MAXLEN ~ trims whole nodes: at least 100 kept, far fewer than written.
    assert 100 <= length < 1000
    last = (await stream_lines(server.url, "t1:audit"))[-1]
    [file] = chain_files(tmp_path)
    assert last + b"\n" == file.read_bytes().splitlines(keepends=True)[-1]
    assert orjson.loads(last)["final"] is True
    assert verify([tmp_path], KEY).ok


async def test_a_run_of_records_sealed_at_once_is_one_entry_each(
    tmp_path: Path, server: RedisServer
) -> None:
    """The writer process seals a run of record bodies in one call; the
    stream still gets one entry per record, the same lines as the file."""
    from gateway.audit.sealer import RecordSealer
    from tests.test_records_parity import _proxied

    url = f"{server.url}?stream=t3:audit&maxlen=10000"
    sealer = RecordSealer("gw", b"p" * 32)
    writer = AuditWriter(
        redis_config(tmp_path, url, f"file://{tmp_path}", batch_size=64),
        facts_sealer=sealer.seal,
        bodies_sealer=sealer.seal_many,
    )
    await writer.start()
    assert writer.offer_bodies(tuple(sealer.body(_proxied(i / 1e5)) for i in range(50))) == 50
    await writer.aclose()
    stream = await stream_lines(server.url, "t3:audit")
    [file] = chain_files(tmp_path)
    assert [line + b"\n" for line in stream] == file.read_bytes().splitlines(keepends=True)
    kinds = [orjson.loads(line).get("type") for line in stream]
    assert kinds.count(None) == 50 and kinds[-1] == "checkpoint"
    assert verify([tmp_path], KEY).ok


async def test_a_redis_only_writer_resumes_its_chain(tmp_path: Path, server: RedisServer) -> None:
    url = f"{server.url}?stream=t2:audit"
    seqs = []
    for worker in (0, 1, 0):  # another chain's records in between must be skipped
        writer = AuditWriter(redis_config(tmp_path, url, worker=worker))
        await writer.start()
        for i in range(3):
            await writer.write(make_record(i))
        await writer.aclose()
        seqs.append(writer.seq)
    assert seqs == [4, 4, 8]
    records = [orjson.loads(line) for line in await stream_lines(server.url, "t2:audit")]
    w0 = [r for r in records if r["chain"] == "gw-w0"]
    assert [r["seq"] for r in w0] == list(range(1, 9))
    assert w0[4]["prev"] == w0[3]["hash"]


async def test_redis_down_then_back_in_deny_mode(tmp_path: Path) -> None:
    own = RedisServer().start()
    back = RedisServer(own.port)
    try:
        url = f"{own.url}?stream=t3:audit"
        config = redis_config(tmp_path, url, on_sink_failure="deny", checkpoint_every=1000)
        writer = AuditWriter(config)
        await writer.start()
        await writer.write(make_record(0))
        await until(lambda: writer.written == 1)
        own.stop()
        for i in range(1, 4):
            await writer.write(make_record(i))
        await until(lambda: not writer.healthy, timeout=10)
        assert writer.failures >= 1 and writer.written == 1
        back.start()  # the same port again, empty (no persistence)
        await until(lambda: writer.healthy and writer.written == 4, timeout=10)
        await writer.aclose()
        records = [orjson.loads(line) for line in await stream_lines(own.url, "t3:audit")]
        assert [r["seq"] for r in records] == [2, 3, 4, 5]  # the retried batch, then final
    finally:
        own.stop()
        back.stop()
