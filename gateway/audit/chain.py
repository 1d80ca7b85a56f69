"""The hash chain: canonical JSON, record hashes, checkpoint signatures, resume.

Every record carries ``seq``, ``chain``, ``prev`` and ``hash`` where

    hash = sha256(prev.encode("ascii") + canonical(record without "hash")).hexdigest()

``prev`` is the ``hash`` of the previous record of the same chain (64 zeros
for the first ever), and canonical JSON is orjson with sorted keys and no
spaces. Changing, removing or moving any record therefore breaks the link
to every record after it. A checkpoint's ``sig`` is an HMAC-SHA256 over the
canonical checkpoint without ``hash`` and ``sig``; it is set before the hash,
so the hash covers the signature too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

GENESIS = "0" * 64
CHECKPOINT = "checkpoint"
# Fields only the writer sets: a caller's record may not carry them, or it
# could pass itself off as a checkpoint or splice itself into another chain.
RESERVED = frozenset({"seq", "chain", "prev", "hash", "type"})
FILE_GLOB = "audit-*.jsonl"
FILE_NAME = re.compile(r"^audit-(\d{8}T\d{6}Z)-(\d+)\.jsonl$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

Record = dict[str, Any]


def canonical(record: Record) -> bytes:
    """Sorted keys, no spaces: the same record always gives the same bytes."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def record_hash(record: Record) -> str:
    """The hash a record must carry: over its ``prev`` and everything but ``hash``."""
    body = {k: v for k, v in record.items() if k != "hash"}
    prev = str(record.get("prev", ""))
    return hashlib.sha256(prev.encode("ascii", "replace") + canonical(body)).hexdigest()


def sign(key: bytes, checkpoint: Record) -> str:
    body = {k: v for k, v in checkpoint.items() if k not in ("hash", "sig")}
    return hmac.new(key, canonical(body), hashlib.sha256).hexdigest()


def signature_ok(key: bytes, checkpoint: Record) -> bool:
    sig = checkpoint.get("sig")
    return isinstance(sig, str) and hmac.compare_digest(sig, sign(key, checkpoint))


def is_hex64(value: object) -> bool:
    return isinstance(value, str) and _HEX64.match(value) is not None


class Chain:
    """The head of one chain: the last seq handed out and its hash.

    Not thread-safe and not async: the writer seals records on the event loop
    in the order it queues them, so seq order is queue order.
    """

    __slots__ = ("chain_id", "prev", "seq")

    def __init__(self, chain_id: str, seq: int = 0, prev: str = GENESIS) -> None:
        self.chain_id = chain_id
        self.seq = seq
        self.prev = prev

    def seal(
        self,
        record: Record,
        signer: Callable[[Record], str] | None = None,
        *,
        presorted: bool = False,
    ) -> bytes:
        """Give ``record`` its place in the chain (in place) and return its JSON line.

        ``presorted``: the caller built ``record`` with its keys, at every
        level, already in canonical (sorted) order, ``seq``, ``chain`` and
        ``prev`` included as placeholders, so serialising skips the sort.

        The head only moves once the line exists, so a record that cannot be
        serialised leaves the chain as it was.
        """
        record["seq"] = self.seq + 1
        record["chain"] = self.chain_id
        record["prev"] = self.prev
        record.pop("hash", None)
        if signer is not None:
            record["sig"] = signer(record)
        # One serialisation: hash the canonical body, then append the hash as
        # the last member. Readers parse the line and re-canonicalise the
        # body, so the position of "hash" in the line does not matter.
        body = orjson.dumps(record) if presorted else canonical(record)
        digest = hashlib.sha256(self.prev.encode("ascii", "replace") + body).hexdigest()
        record["hash"] = digest
        line = b"".join((body[:-1], b',"hash":"', digest.encode(), b'"}\n'))

        self.seq += 1
        self.prev = digest
        return line


def chain_files(path: str | os.PathLike[str], chain_id: str) -> list[Path]:
    """The files of one chain, oldest first: ``path`` may be the sink's base
    directory (holding ``<chain>/``), the chain's directory, or one file."""
    root = Path(path)
    if root.is_file():
        return [root]
    if (root / chain_id).is_dir():
        root = root / chain_id
    if not root.is_dir():
        return []
    return sorted(root.glob(FILE_GLOB), key=lambda p: p.name)


def _tail_lines(path: Path, chunk: int = 65_536) -> Iterator[bytes]:
    """Complete lines of ``path``, last first, reading backwards in chunks: on
    a 64 MiB file, resume costs one small read. The bytes after the last
    newline (a write cut short by a crash) are not a line and are skipped."""
    with path.open("rb") as f:
        pos = f.seek(0, os.SEEK_END)
        carry = b""  # bytes not yet split: they may begin mid-line
        skip_tail = True
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            carry = f.read(step) + carry
            parts = carry.split(b"\n")
            carry = parts[0]
            rest = parts[1:]
            if skip_tail and rest:
                rest.pop()
                skip_tail = False
            for line in reversed(rest):
                if line:
                    yield line
        if carry and not skip_tail:
            yield carry


def _records_last_first(path: str | os.PathLike[str], chain_id: str) -> Iterator[Record]:
    """The records of ``chain_id`` under ``path`` that carry a seq, last
    first; lines that do not parse, or are of another chain, are passed over."""
    for file in reversed(chain_files(path, chain_id)):
        for line in _tail_lines(file):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if (
                isinstance(record, dict)
                and record.get("chain") == chain_id
                and isinstance(record.get("seq"), int)
            ):
                yield record


def last_record(path: str | os.PathLike[str], chain_id: str) -> Record | None:
    """The last valid record of ``chain_id`` found under ``path``, or None."""
    for record in _records_last_first(path, chain_id):
        if is_hex64(record.get("hash")):
            return record
    return None


def records_after(path: str | os.PathLike[str], chain_id: str, seq: int) -> int:
    """How many records (checkpoints not counted) of ``chain_id`` under
    ``path`` have a seq above ``seq``: read from the end, back to it."""
    count = 0
    for record in _records_last_first(path, chain_id):
        if record["seq"] <= seq:
            break
        if record.get("type") != CHECKPOINT:
            count += 1
    return count


def resume(path: str | os.PathLike[str], chain_id: str) -> Chain:
    """The chain as a previous run left it, so a restart continues it
    (seq + 1, prev = the last hash) instead of starting a second seq 1."""
    found = last_record(path, chain_id)
    if found is None:
        return Chain(chain_id)
    return Chain(chain_id, int(found["seq"]), str(found["hash"]))
