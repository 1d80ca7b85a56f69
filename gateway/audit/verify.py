"""Check a trail: hashes, links, order, signatures, and a clean end.

Files are read in name order (rotation names sort in write order) and
records are grouped by ``chain`` (one chain per worker). Each chain is read
once, front to back, keeping only its head, so a trail of any size verifies
in constant memory. The FIRST problem of each chain is reported:

* ``malformed``      a line that is not a record (unparseable, a field missing,
                     a partial last line left by a crash mid-write)
* ``edit``           a record's hash does not match its content, or its
                     ``prev`` does not match the record before it
* ``deletion``       seq jumps forward and the missing seqs never appear
* ``reorder``        seq goes backwards, or jumps over seqs that appear later
* ``bad_signature``  a checkpoint that is unsigned or whose HMAC does not match
* ``truncation``     records after the last checkpoint: a cut tail, or the
                     mark an unclean stop (SIGKILL) leaves
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from gateway.audit.chain import (
    CHECKPOINT,
    FILE_GLOB,
    GENESIS,
    Record,
    is_hex64,
    record_hash,
    signature_ok,
)


class AuditPathError(ValueError):
    """A path that does not exist or holds no audit files (a user error)."""


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str  # malformed | edit | deletion | reorder | bad_signature | truncation
    path: str
    line: int
    seq: int | None
    detail: str

    def describe(self) -> str:
        where = f"{self.path}:{self.line}: "
        seq = f"seq {self.seq}: " if self.seq is not None else ""
        return f"{where}{seq}{self.kind} ({self.detail})"


@dataclass(slots=True)
class ChainResult:
    chain: str
    records: int = 0
    checkpoints: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_checkpoint: int | None = None  # seq of the last checkpoint
    recoveries: int = 0  # restarts after an unclean stop, noted by the writer
    problem: Problem | None = None
    # -- the running head, while reading --
    last_hash: str = ""
    after_checkpoint: int = 0
    first_uncovered: tuple[str, int, int] | None = None
    gap: tuple[int, int] | None = None  # seqs missing at a tentative deletion

    @property
    def ok(self) -> bool:
        return self.problem is None

    def describe(self) -> str:
        if self.problem is not None:
            return self.problem.describe()
        span = f"seq {self.first_seq}..{self.last_seq}"
        note = f", {self.recoveries} unclean restart(s)" if self.recoveries else ""
        return (
            f"{self.chain}: ok, {self.records} records, {self.checkpoints} checkpoints, "
            f"{span}{note}"
        )


@dataclass(slots=True)
class Report:
    files: list[str]
    chains: dict[str, ChainResult] = field(default_factory=dict)
    signatures_checked: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.chains) and all(c.ok for c in self.chains.values())

    @property
    def problems(self) -> list[Problem]:
        return [c.problem for c in self.chains.values() if c.problem is not None]

    def problem_lines(self) -> list[str]:
        """One line per bad chain: its first bad record."""
        return [p.describe() for p in self.problems]

    def describe(self) -> str:
        lines = [c.describe() for c in self.chains.values()]
        if not self.signatures_checked:
            lines.append("checkpoint signatures not checked (no key given)")
        return "\n".join(lines)


def audit_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The audit files under ``paths`` (``audit-*.jsonl`` in directories, any
    file named explicitly), in write order: sorted by file name
    (``audit-<UTC time>-<n>``), then by path. Raises ``AuditPathError``."""
    found: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            # Only the writer's files: other JSON lines beside them are not the trail.
            for file in path.rglob(FILE_GLOB):
                if file.is_file():
                    found.setdefault(os.path.realpath(file), file)
        elif path.is_file():
            found.setdefault(os.path.realpath(path), path)
        else:
            raise AuditPathError(f"{raw}: no such file or directory")
    if not found:
        shown = ", ".join(str(p) for p in paths)
        raise AuditPathError(f"{shown}: no audit files (audit-*.jsonl)")
    return sorted(found.values(), key=lambda p: (p.name, str(p)))


def read_lines(file: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without newline, complete) for each line of ``file``."""
    with file.open("rb") as f:
        for number, raw in enumerate(f, 1):
            complete = raw.endswith(b"\n")
            yield number, raw.rstrip(b"\n"), complete


def verify(paths: Iterable[str | os.PathLike[str]], key: bytes | None = None) -> Report:
    """Verify the trail under ``paths`` (files and directories). With ``key``,
    checkpoint signatures are checked too. Raises ``AuditPathError``."""
    files = audit_files(list(paths))
    report = Report(files=[str(f) for f in files], signatures_checked=key is not None)
    for file in files:
        name = str(file)
        file_chain = file.parent.name  # a malformed line belongs to the file's chain
        for number, line, complete in read_lines(file):
            record, error = _parse(line, complete)
            chain_id = file_chain if record is None else str(record["chain"])
            result = report.chains.setdefault(chain_id, ChainResult(chain_id))
            if record is None:
                _problem(result, "malformed", name, number, None, error)
                continue
            file_chain = chain_id
            _check(result, record, name, number, key)
    for result in report.chains.values():
        _finish(result)
    return report


def _parse(line: bytes, complete: bool) -> tuple[Record | None, str]:
    if not complete:
        return None, "partial last line, no newline: a write cut short by a crash"
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None, "not JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if not isinstance(record.get("chain"), str) or not record["chain"]:
        return None, "no chain"
    seq = record.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        return None, "no valid seq"
    if not is_hex64(record.get("prev")):
        return None, "no valid prev"
    if not is_hex64(record.get("hash")):
        return None, "no valid hash"
    return record, ""


def _problem(
    result: ChainResult, kind: str, path: str, line: int, seq: int | None, detail: str
) -> None:
    if result.problem is None:
        result.problem = Problem(kind, path, line, seq, detail)


def _check(result: ChainResult, record: Record, path: str, line: int, key: bytes | None) -> None:
    seq = int(record["seq"])
    if result.problem is not None:
        # Only one question is still open: is a tentative deletion a reorder?
        if result.gap is not None and result.gap[0] <= seq <= result.gap[1]:
            old = result.problem
            result.problem = Problem(
                "reorder", old.path, old.line, old.seq, f"seq {seq} comes later, at line {line}"
            )
            result.gap = None
        return
    checkpoint = record.get("type") == CHECKPOINT
    # A checkpoint's signature first: a forged or re-signed checkpoint is
    # reported as such even when its hash was recomputed, or not.
    if checkpoint and key is not None:
        if "sig" not in record:
            return _problem(result, "bad_signature", path, line, seq, "unsigned checkpoint")
        if not signature_ok(key, record):
            detail = "checkpoint HMAC does not match: forged, or another key"
            return _problem(result, "bad_signature", path, line, seq, detail)
    if record_hash(record) != record["hash"]:
        return _problem(result, "edit", path, line, seq, "hash mismatch")
    last = result.last_seq
    if last is None:
        if seq == 1 and record["prev"] != GENESIS:
            return _problem(result, "edit", path, line, seq, "the first record must have prev 0")
        result.first_seq = seq
    elif seq <= last:
        what = "duplicate of" if record["hash"] == result.last_hash else "after"
        return _problem(result, "reorder", path, line, seq, f"seq {seq} {what} seq {last}")
    elif seq > last + 1:
        if record["prev"] == result.last_hash:
            detail = f"seq jumps from {last} but prev links to it: seq rewritten"
            return _problem(result, "edit", path, line, seq, detail)
        missing = seq - last - 1
        detail = f"{missing} record(s) missing before it (seq {last + 1}..{seq - 1}), prev mismatch"
        _problem(result, "deletion", path, line, seq, detail)
        result.gap = (last + 1, seq - 1)
        return None
    elif record["prev"] != result.last_hash:
        detail = f"prev does not match the hash of seq {last}: a record was rewritten"
        return _problem(result, "edit", path, line, seq, detail)
    if checkpoint and record.get("covers") != seq - 1:
        detail = f"checkpoint covers {record.get('covers')!r}, expected {seq - 1}"
        return _problem(result, "malformed", path, line, seq, detail)
    result.last_seq = seq
    result.last_hash = str(record["hash"])
    if checkpoint:
        result.checkpoints += 1
        result.last_checkpoint = seq
        result.after_checkpoint = 0
        result.first_uncovered = None
        if record.get("recovered"):
            result.recoveries += 1
    else:
        result.records += 1
        result.after_checkpoint += 1
        if result.first_uncovered is None:
            result.first_uncovered = (path, line, seq)
    return None


def _finish(result: ChainResult) -> None:
    if result.problem is not None or result.first_uncovered is None:
        return
    path, line, seq = result.first_uncovered
    if result.last_checkpoint is None:
        since = "and no checkpoint at all"
    else:
        since = f"after the last checkpoint (seq {result.last_checkpoint})"
    detail = (
        f"{result.after_checkpoint} record(s) {since}, no final checkpoint: "
        "the tail was cut, or the writer stopped uncleanly (SIGKILL, crash)"
    )
    _problem(result, "truncation", path, line, seq, detail)
