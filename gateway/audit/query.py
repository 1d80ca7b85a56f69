"""Read records back: filter a trail, or export everything about one subject.

Queries read the same files as verify, in the same order, and skip
checkpoints and lines that are not records; they do not verify (run
``fairgate audit verify`` for that). Everything streams: nothing is held
in memory beyond the current line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

import orjson

from gateway.audit.chain import CHECKPOINT, Record
from gateway.audit.timefmt import parse_ts
from gateway.audit.verify import audit_files, read_lines

Moment = str | datetime


def _moment(value: Moment) -> datetime:
    if isinstance(value, datetime):
        return parse_ts(value.isoformat())  # naive means UTC, as for strings
    return parse_ts(value)


def records(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Record]:
    """Every request record under ``paths`` (checkpoints and bad lines skipped).
    A missing path raises ``AuditPathError`` here, not at the first ``next``."""
    return _records(audit_files(list(paths)))


def _records(files: list[Path]) -> Iterator[Record]:
    for file in files:
        for _, line, complete in read_lines(file):
            if not complete:
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("type") != CHECKPOINT:
                yield record


def query(
    paths: Iterable[str | os.PathLike[str]],
    *,
    subject: str | None = None,
    tenant: str | None = None,
    decision: str | None = None,
    reason: str | None = None,
    since: Moment | None = None,
    until: Moment | None = None,
) -> Iterator[Record]:
    """Records matching every given filter; ``since`` inclusive, ``until``
    exclusive (ISO 8601 strings or datetimes; without a zone, UTC). A bad
    time raises ``ValueError`` and a missing path ``AuditPathError``, both
    before anything is read."""
    start = _moment(since) if since is not None else None
    end = _moment(until) if until is not None else None
    wanted = {"subject": subject, "tenant": tenant, "decision": decision, "reason": reason}
    filters = {k: v for k, v in wanted.items() if v is not None}
    return _matching(records(paths), filters, start, end)


def _matching(
    found: Iterator[Record],
    filters: dict[str, str],
    start: datetime | None,
    end: datetime | None,
) -> Iterator[Record]:
    for record in found:
        if any(record.get(k) != v for k, v in filters.items()):
            continue
        if start is not None or end is not None:
            try:
                ts = parse_ts(str(record.get("ts")))
            except ValueError:
                continue  # no usable time: cannot be inside a time window
            if (start is not None and ts < start) or (end is not None and ts >= end):
                continue
        yield record


def export_subject(paths: Iterable[str | os.PathLike[str]], subject: str) -> Iterator[Record]:
    """Every record of ``subject``: the answer to a GDPR data-access request."""
    if not subject:
        raise ValueError("export needs a subject")
    return query(paths, subject=subject)
