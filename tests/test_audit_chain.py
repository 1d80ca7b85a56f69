"""The hash chain: what a hash covers, and a restart continuing the chain."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.audit import GENESIS, AuditConfig, AuditWriter, Chain, canonical, record_hash, verify
from gateway.audit.chain import _tail_lines, last_record, resume
from gateway.audit.timefmt import format_ts, parse_ts
from tests.test_audit_helpers import (
    KEY,
    build_trail,
    chain_files,
    file_config,
    make_record,
    read_records,
)


def test_canonical_json_is_sorted_and_compact() -> None:
    assert canonical({"b": 1, "a": {"d": [1, 2], "c": None}}) == b'{"a":{"c":null,"d":[1,2]},"b":1}'


def test_hash_covers_every_field_and_links_to_prev() -> None:
    chain = Chain("gw-w0")
    first, second = make_record(0), make_record(1)
    line = chain.seal(first)
    chain.seal(second)
    assert orjson.loads(line) == first and line.endswith(b"\n")
    assert (first["seq"], first["chain"], first["prev"]) == (1, "gw-w0", GENESIS)
    assert (second["seq"], second["prev"]) == (2, first["hash"])
    assert record_hash(first) == first["hash"]
    for name, value in [("decision", "allow!"), ("status", 500), ("seq", 7), ("prev", "1" * 64)]:
        changed: dict[str, Any] = {**first, name: value}
        assert record_hash(changed) != first["hash"], name
    nested = {**first, "client": {**first["client"], "network": "198.51.100.0/24"}}
    assert record_hash(nested) != first["hash"]


def test_a_record_that_cannot_be_serialised_leaves_the_chain_alone() -> None:
    chain = Chain("gw-w0")
    with pytest.raises(TypeError):
        chain.seal({"bad": object()})
    assert (chain.seq, chain.prev) == (0, GENESIS)


async def test_a_restart_continues_seq_and_prev(tmp_path: Path) -> None:
    first = await build_trail(tmp_path, 7)
    assert first.seq == 8  # 7 records and the final checkpoint
    resumed = resume(tmp_path, "gw-w0")
    assert resumed.seq == first.seq
    second = await build_trail(tmp_path, 4)
    records = read_records(chain_files(tmp_path))
    assert [r["seq"] for r in records] == list(range(1, second.seq + 1))
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["hash"]
    assert len(chain_files(tmp_path)) == 2  # each run writes a file of its own
    report = verify([tmp_path], KEY)
    assert report.ok, report.describe()
    assert report.chains["gw-w0"].recoveries == 0


async def test_a_restart_after_an_unclean_stop_says_so(tmp_path: Path) -> None:
    await build_trail(tmp_path, 12)
    [file] = chain_files(tmp_path)
    lines = file.read_bytes().splitlines(keepends=True)
    assert orjson.loads(lines[-1])["final"] is True
    file.write_bytes(b"".join(lines[:-1]))  # SIGKILL before the final checkpoint
    assert verify([tmp_path], KEY).problems[0].kind == "truncation"
    writer = AuditWriter(file_config(tmp_path))
    await writer.start()
    await writer.write(make_record(99))
    await writer.aclose()
    records = read_records(chain_files(tmp_path))
    recovery = records[len(lines) - 1]
    assert recovery["type"] == "checkpoint" and recovery["recovered"] is True
    report = verify([tmp_path], KEY)
    assert report.ok, report.describe()
    assert report.chains["gw-w0"].recoveries == 1


async def test_resume_skips_a_partial_last_line(tmp_path: Path) -> None:
    await build_trail(tmp_path, 3)
    [file] = chain_files(tmp_path)
    last = orjson.loads(file.read_bytes().splitlines()[-1])
    with file.open("ab") as f:
        f.write(b'{"chain":"gw-w0","seq":')  # a crash mid-write
    assert last_record(tmp_path, "gw-w0") == last
    writer = await build_trail(tmp_path, 2)
    assert writer.seq == last["seq"] + 3  # recovery checkpoint, 2 records, final
    problems = verify([tmp_path], KEY).problems
    assert [(p.kind, p.path, p.line) for p in problems] == [("malformed", str(file), 5)]


def test_tail_lines_reads_backwards_across_chunks(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"first\n" + b"x" * 50 + b"\nthird line\npartial")
    assert list(_tail_lines(path, chunk=7)) == [b"third line", b"x" * 50, b"first"]
    path.write_bytes(b"only partial")
    assert list(_tail_lines(path, chunk=4)) == []


def test_resume_of_nothing_starts_a_new_chain(tmp_path: Path) -> None:
    chain = resume(tmp_path / "missing", "gw-w3")
    assert (chain.chain_id, chain.seq, chain.prev) == ("gw-w3", 0, GENESIS)


def test_timestamps() -> None:
    assert format_ts(1_795_000_000.1234) == "2026-11-18T11:06:40.123Z"
    assert parse_ts("2026-11-19T08:26:40.123Z") == parse_ts("2026-11-19T09:26:40.123+01:00")
    with pytest.raises(ValueError):
        parse_ts("yesterday")


@pytest.mark.parametrize(
    "overrides",
    [
        {"instance": "../etc"},
        {"instance": ""},
        {"worker": -1},
        {"worker": True},
        {"sinks": ()},
        {"sinks": ("ftp://x",)},
        {"sinks": ("file://",)},
        {"sinks": ("redis://:6379/0",)},
        {"sinks": ("redis://h:1/0?maxlen=0",)},
        {"sinks": ("stdout", "stdout")},
        {"rotate_bytes": 0},
        {"rotate_seconds": -1},
        {"retention_seconds": 0},
        {"fsync": "sometimes"},
        {"batch_size": 0},
        {"flush_interval": -0.1},
        {"queue_size": 1.5},
        {"on_sink_failure": "drop"},
        {"checkpoint_interval": 0},
        {"checkpoint_every": 0},
        {"checkpoint_key": b"short"},
    ],
)
def test_bad_config_values_raise(overrides: dict[str, Any]) -> None:
    values: dict[str, Any] = {"instance": "gw", **overrides}
    with pytest.raises(ValueError):
        AuditConfig(**values)


def test_sink_uris_parse() -> None:
    config = AuditConfig(
        instance="gw-1",
        worker=2,
        sinks=(
            "file://var/audit",
            "file:///var/log/fairgate",
            "stdout",
            "redis://h:6380/2?stream=fg:a&maxlen=500&health_check_interval=5",
        ),
    )
    file_rel, file_abs, out, redis = config.sink_specs
    assert (file_rel.path, file_abs.path, out.kind) == ("var/audit", "/var/log/fairgate", "stdout")
    assert (redis.stream, redis.maxlen) == ("fg:a", 500)
    assert redis.url == "redis://h:6380/2?health_check_interval=5"
    assert config.chain_id == "gw-1-w2"


def _sorted_everywhere(value: Any) -> bool:
    if isinstance(value, dict):
        keys = list(value)
        return keys == sorted(keys) and all(_sorted_everywhere(v) for v in value.values())
    if isinstance(value, list):
        return all(_sorted_everywhere(v) for v in value)
    return True


@pytest.mark.parametrize("outcome", ["refused_anonymous", "allowed", "shadow", "aborted"])
def test_request_records_are_built_in_canonical_order(outcome: str) -> None:
    """build_record promises sorted keys (Chain.seal(presorted=True) skips the
    sort): the presorted line must be byte for byte the canonical one."""
    from gateway.auth import Identity
    from gateway.clientaddr import ClientAddress
    from gateway.context import RequestContext
    from gateway.decision import deny
    from gateway.policy import load_policy_text
    from gateway.recording import build_record

    policy = load_policy_text(
        "version: 1\nupstreams: {up: {url: 'http://127.0.0.1:9'}}\n"
        "routes: [{id: r, methods: [GET], path: /x, upstream: up, public: true}]\n"
    )
    req = RequestContext("GET", b"/x;evil", b"", [], "198.51.100.7", "http", "rid-1", 0.0)
    req.client = ClientAddress("198.51.100.7", "198.51.100.0/24", 4)
    if outcome == "refused_anonymous":
        req.refusal, req.status = deny("bad_request_path", "no"), 400
    else:
        req.path, req.route, req.status, req.upstream_status = "/x", policy.routes[0], 200, 200
        req.identity = Identity("alice", "acme", ("agent", "viewer"), "pro", "s1", "j1", 9e9)
        req.signals.append("scraping:warn")
        if outcome == "shadow":
            req.shadow.append("rate_limited:plan-pro")
        if outcome == "aborted":
            req.aborted = "client_disconnect"
    record = build_record(req, policy, instance="gw", ip_key=b"k" * 32, now=1e9, finished=0.5)
    assert _sorted_everywhere(record)
    # DESIGN.md's fields, less those the writer adds (hash), nothing more.
    assert set(record) == set(
        [
            "ts",
            "seq",
            "request_id",
            "instance",
            "policy_rev",
            "decision",
            "status",
            "reason",
            "rule",
            "mode",
            "subject",
            "tenant",
            "roles",
            "plan",
            "session",
            "client",
            "method",
            "path",
            "route",
            "upstream",
            "upstream_status",
            "bytes_in",
            "bytes_out",
            "latency_ms",
            "signals",
            "degraded",
            "prev",
            "chain",
        ]
    )
    fast, slow = Chain("c", 4, "ab" * 32), Chain("c", 4, "ab" * 32)
    line = fast.seal(dict(record), presorted=True)
    assert line == slow.seal(
        {k: v for k, v in record.items() if v is not None or k not in ("chain", "prev", "seq")}
    )
    assert orjson.loads(line)["hash"] == record_hash(orjson.loads(line))
