"""verify on real trails: each kind of tampering is named at its first bad record."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from gateway.audit import record_hash, verify
from gateway.audit.verify import AuditPathError
from tests.test_audit_helpers import KEY, build_trail, chain_files

# 25 records, checkpoint_every=10: lines 1-10 records, 11 checkpoint, 12-21
# records, 22 checkpoint, 23-27 records, 28 the final checkpoint.
N = 25


@pytest.fixture
async def trail(tmp_path: Path) -> tuple[Path, Path, list[bytes]]:
    await build_trail(tmp_path, N)
    [file] = chain_files(tmp_path)
    lines = file.read_bytes().splitlines(keepends=True)
    assert len(lines) == 28
    return tmp_path, file, lines


def rewrite(file: Path, lines: list[bytes]) -> None:
    file.write_bytes(b"".join(lines))


def only_problem(base: Path, key: bytes | None = KEY) -> tuple[str, str, int, int | None, str]:
    report = verify([base], key)
    assert not report.ok
    [p] = report.problems
    return p.kind, p.path, p.line, p.seq, p.detail


async def test_an_untouched_trail_of_two_workers_passes(tmp_path: Path) -> None:
    await build_trail(tmp_path, N, worker=0)
    await build_trail(tmp_path, 7, worker=1)
    report = verify([tmp_path], KEY)
    assert report.ok, report.describe()
    assert set(report.chains) == {"gw-w0", "gw-w1"}
    assert (report.chains["gw-w0"].records, report.chains["gw-w0"].checkpoints) == (25, 3)
    assert (report.chains["gw-w1"].records, report.chains["gw-w1"].last_seq) == (7, 8)
    assert "gw-w0: ok, 25 records, 3 checkpoints, seq 1..28" in report.describe()
    unchecked = verify([tmp_path])
    assert unchecked.ok and "not checked" in unchecked.describe()


async def test_an_edited_record(trail: tuple[Path, Path, list[bytes]]) -> None:
    base, file, lines = trail
    assert b'"subject":"bob"' in lines[4]
    lines[4] = lines[4].replace(b'"subject":"bob"', b'"subject":"eve"')
    rewrite(file, lines)
    assert only_problem(base)[:4] == ("edit", str(file), 5, 5)


async def test_an_edited_record_with_its_hash_recomputed(
    trail: tuple[Path, Path, list[bytes]],
) -> None:
    base, file, lines = trail
    record = orjson.loads(lines[4])
    record["status"] = 200 if record["status"] != 200 else 201
    record["hash"] = record_hash(record)
    lines[4] = orjson.dumps(record) + b"\n"
    rewrite(file, lines)
    kind, _path, line, seq, detail = only_problem(base)
    assert (kind, line, seq) == ("edit", 6, 6) and "prev does not match" in detail


async def test_a_deleted_record(trail: tuple[Path, Path, list[bytes]]) -> None:
    base, file, lines = trail
    del lines[4]
    rewrite(file, lines)
    kind, path, line, seq, detail = only_problem(base)
    assert (kind, path, line, seq) == ("deletion", str(file), 5, 6)
    assert "seq 5..5" in detail


async def test_two_swapped_records(trail: tuple[Path, Path, list[bytes]]) -> None:
    base, file, lines = trail
    lines[4], lines[5] = lines[5], lines[4]
    rewrite(file, lines)
    kind, _, line, seq, _ = only_problem(base)
    assert (kind, line, seq) == ("reorder", 5, 6)


async def test_a_record_moved_far_back(trail: tuple[Path, Path, list[bytes]]) -> None:
    base, file, lines = trail
    moved = lines.pop(2)
    lines.insert(15, moved)
    rewrite(file, lines)
    kind, _, line, seq, detail = only_problem(base)
    assert (kind, line, seq) == ("reorder", 3, 4) and "seq 3 comes later" in detail


async def test_a_truncated_tail(trail: tuple[Path, Path, list[bytes]]) -> None:
    base, file, lines = trail
    rewrite(file, lines[:-3])  # the final checkpoint and two records
    kind, path, line, seq, detail = only_problem(base)
    assert (kind, path, line, seq) == ("truncation", str(file), 23, 23)
    assert "3 record(s) after the last checkpoint (seq 22)" in detail
    assert "SIGKILL" in detail


async def test_no_checkpoint_at_all(trail: tuple[Path, Path, list[bytes]]) -> None:
    base, file, lines = trail
    rewrite(file, lines[:4])
    kind, _, line, _, detail = only_problem(base)
    assert (kind, line) == ("truncation", 1) and "no checkpoint at all" in detail


@pytest.mark.parametrize("rehash", [True, False])
async def test_a_corrupt_checkpoint_signature(
    trail: tuple[Path, Path, list[bytes]], rehash: bool
) -> None:
    base, file, lines = trail
    checkpoint = orjson.loads(lines[10])
    assert checkpoint["type"] == "checkpoint"
    checkpoint["sig"] = ("0" if checkpoint["sig"][0] != "0" else "1") + checkpoint["sig"][1:]
    if rehash:
        checkpoint["hash"] = record_hash(checkpoint)
    lines[10] = orjson.dumps(checkpoint) + b"\n"
    rewrite(file, lines)
    assert only_problem(base)[:4] == ("bad_signature", str(file), 11, 11)


async def test_the_wrong_key_and_an_unsigned_trail(tmp_path: Path) -> None:
    await build_trail(tmp_path / "signed", 3)
    assert only_problem(tmp_path / "signed", b"another-key-" + b"x" * 20)[0] == "bad_signature"
    await build_trail(tmp_path / "unsigned", 3, checkpoint_key=None)
    assert verify([tmp_path / "unsigned"]).ok
    kind, _, _, _, detail = only_problem(tmp_path / "unsigned", KEY)
    assert (kind, detail) == ("bad_signature", "unsigned checkpoint")


async def test_a_partial_last_line(trail: tuple[Path, Path, list[bytes]]) -> None:
    base, file, lines = trail
    rewrite(file, [*lines, b'{"seq":29,"chain":"gw-w0","pr'])
    kind, path, line, seq, detail = only_problem(base)
    assert (kind, path, line, seq) == ("malformed", str(file), 29, None)
    assert "partial" in detail


async def test_garbage_in_the_middle(trail: tuple[Path, Path, list[bytes]]) -> None:
    base, file, lines = trail
    lines.insert(3, b"not json\n")
    rewrite(file, lines)
    assert only_problem(base)[:3] == ("malformed", str(file), 4)


async def test_only_the_first_problem_per_chain_is_reported(tmp_path: Path) -> None:
    await build_trail(tmp_path, N, worker=0)
    await build_trail(tmp_path, N, worker=1)
    for chain, index in (("gw-w0", 2), ("gw-w1", 7)):
        [file] = chain_files(tmp_path, chain)
        lines = file.read_bytes().splitlines(keepends=True)
        lines[index] = lines[index].replace(b'"status":', b'"status":1')
        del lines[index + 3]
        rewrite(file, lines)
    report = verify([tmp_path], KEY)
    assert [(p.kind, p.line) for p in report.problems] == [("edit", 3), ("edit", 8)]
    assert len(report.problem_lines()) == 2


async def test_rotated_files_are_read_in_name_order(tmp_path: Path) -> None:
    await build_trail(tmp_path, 60, rotate_bytes=3000, batch_size=4)
    files = chain_files(tmp_path)
    assert len(files) > 3
    # Files given one by one, in any order, are still read in name order.
    assert verify([str(f) for f in reversed(files)], KEY).ok
    files[1].unlink()  # a whole rotated file removed
    kind, path, *_ = only_problem(tmp_path)
    assert (kind, path) == ("deletion", str(files[2]))


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(AuditPathError, match="no such file"):
        verify([tmp_path / "nope"])
    with pytest.raises(AuditPathError, match="no audit files"):
        verify([tmp_path])
