"""Seal an audit record from a request's snapshot, pure-Python implementation.

``RecordSealer(instance, ip_key).seal(facts, chain)`` builds the record of
``facts`` (``gateway.audit.records.record_from``), gives it its place in
``chain`` (``Chain.seal``: seq, chain, prev, hash) and returns its JSON line.
The native twin ``gateway._records_c`` (ext/_records_c.pyx) writes the same
bytes straight from the snapshot, without the dict and orjson's pass over it;
``gateway.recording`` picks one. Either leaves the chain as it was when the
record cannot be written (a value orjson refuses), and raises.

The work can be split in two: ``body(facts)`` writes the record without its
place in a chain (in a worker, on the request's path), and ``seal(body,
chain)`` splices the chain's values into it and hashes it (in the audit
writer process): the same line, with no object built per value on the
writer's side.
"""

from __future__ import annotations

import hashlib
import operator
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast, overload

import orjson

from gateway.audit.chain import Chain
from gateway.audit.records import Snapshot, record_from

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.policy.model import Policy

# A body's header: the length of what follows the first u32, then where the
# values of chain, prev and seq go in the JSON after the header.
BODY_HEADER = struct.Struct("!IIII")
BODY_LENGTH = struct.Struct("!I")
_GAPS = frozenset({"chain", "prev", "seq"})
# A length's top bit (``gateway.audit.frames``, which imports this module):
# a batch frame's, or a JSON entry's; the rest is the length.
FLAG = 0x8000_0000
SIZE = 0x7FFF_FFFF


class RecordSealer:
    __slots__ = ("instance", "ip_key")

    def __init__(self, instance: str, ip_key: bytes) -> None:
        self.instance = instance
        self.ip_key = ip_key

    def seal(self, facts: Snapshot | bytes, chain: Chain) -> bytes:
        if type(facts) is bytes:  # exactly, as the native twin checks
            return _seal_body(facts, chain)
        record = record_from(cast(Snapshot, facts), instance=self.instance, ip_key=self.ip_key)
        return chain.seal(record, presorted=True)

    def seal_many(self, bodies: Bodies | tuple[bytes, ...] | list[bytes], chain: Chain) -> bytes:
        if type(bodies) is Bodies:
            bodies = tuple(bodies)
        elif type(bodies) is not tuple and type(bodies) is not list:
            raise TypeError(
                f"record bodies come as Bodies, a tuple or a list, not {type(bodies).__name__}"
            )
        for body in bodies:
            if type(body) is not bytes:
                raise TypeError(f"a record body is bytes, not {type(body).__name__}")
            _check_body(body)
        return b"".join([_seal_body(body, chain) for body in bodies])

    def body(self, facts: Snapshot) -> bytes:
        record = record_from(facts, instance=self.instance, ip_key=self.ip_key)
        text = bytearray(b"{")
        gaps = []
        for key, value in record.items():  # keys in canonical order already
            if len(text) > 1:
                text += b","
            text += orjson.dumps(key) + b":"
            if key in _GAPS:
                gaps.append(len(text))
            else:
                text += orjson.dumps(value)
        text += b"}"
        return BODY_HEADER.pack(len(text) + 12, *gaps) + bytes(text)


class RecordBatch:
    """Record bodies (``RecordSealer.body``) one after another, as a batch frame
    (``gateway.audit.frames``) carries them: what a worker hands its writer
    process. ``add`` takes a finished request itself (its native twin writes
    the body straight from the request's slots, with no snapshot between)."""

    __slots__ = ("_parts", "_sealer", "count")

    def __init__(self, sealer: RecordSealer) -> None:
        if sealer is None:
            raise TypeError("a RecordBatch needs a RecordSealer")
        self._sealer = sealer
        self._parts: list[bytes] = []
        self.count = 0

    def add(
        self,
        req: RequestContext,
        policy: Policy,
        now: float | None = None,
        finished: float | None = None,
    ) -> int:
        """The record body of the finished request ``req`` into the batch: the
        number of records in it. Raises as ``body`` does, the batch as it was."""
        from gateway._facts_py import snapshot  # the request's classes: not in the writer process

        return self.add_facts(snapshot(req, policy, now=now, finished=finished))

    def add_facts(self, facts: Snapshot) -> int:
        self._parts.append(self._sealer.body(facts))
        self.count += 1
        return self.count

    def add_json(self, data: bytes) -> int:
        """A JSON entry (facts or a record, for the writer process to decode)."""
        if type(data) is not bytes:
            raise TypeError(f"a JSON entry is bytes, not {type(data).__name__}")
        if len(data) > SIZE:
            raise ValueError("audit batch entry too large")
        self._parts.append(BODY_LENGTH.pack(len(data) | FLAG) + data)
        self.count += 1
        return self.count

    def take(self) -> bytes:
        """The batch frame of what was added since the last ``take``, and a
        new, empty batch."""
        payload = b"".join(self._parts)
        self._parts = []
        self.count = 0
        return BODY_LENGTH.pack(len(payload) | FLAG) + payload


class Bodies:
    """A run of record bodies where a batch frame holds them: the writer
    process seals a run in one call (``seal_many``). A sequence of each
    body's bytes, sliced in order only. This twin copies the bodies out of
    the frame; the native one reads them in place (and refuses, rather than
    reads past, a frame written to meanwhile)."""

    __slots__ = ("_entries",)

    def __init__(self, entries: tuple[bytes, ...] = ()) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._entries)

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> Bodies: ...
    def __getitem__(self, index: int | slice) -> bytes | Bodies:
        size = len(self._entries)
        if isinstance(index, slice):
            first, last, step = index.indices(size)
            if step != 1:
                raise ValueError("a run of record bodies is sliced in order")
            if first == 0 and last >= size:
                return self
            return Bodies(self._entries[first:last])
        i = operator.index(index)
        if i < 0:
            i += size
        if not 0 <= i < size:
            raise IndexError("record body index out of range")
        return self._entries[i]

    def __eq__(self, other: object) -> bool:
        if type(other) is Bodies or type(other) is tuple:
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Bodies: {len(self._entries)} record bodies>"


def decode_batch(payload: bytes | bytearray) -> list[Any]:
    """The entries of a batch frame (``gateway.audit.frames``; bytes, or the
    bytearray it was read into): each run of record bodies as ``Bodies``
    (the writer process seals a run in one call), JSON entries decoded
    (lists and dicts), in their order. ``ValueError``
    (``orjson.JSONDecodeError`` for JSON) if it does not add up."""
    items: list[Any] = []
    run: list[bytes] = []
    unpack = BODY_LENGTH.unpack_from
    pos = 0
    end = len(payload)
    while pos < end:
        if pos + 4 > end:
            raise ValueError("audit batch frame cut short")
        (word,) = unpack(payload, pos)
        stop = pos + 4 + (word & SIZE)
        if stop > end:
            raise ValueError("audit batch frame cut short")
        if word & FLAG:
            if run:
                items.append(Bodies(tuple(run)))
                run = []
            items.append(orjson.loads(bytes(payload[pos + 4 : stop])))
        else:
            run.append(bytes(payload[pos:stop]))
        pos = stop
    if run:
        items.append(Bodies(tuple(run)))
    return items


def _check_body(entry: bytes) -> tuple[int, int, int]:
    """Whether ``entry`` is what ``body`` writes: its gaps."""
    if len(entry) < 17:
        raise ValueError("not an audit record body")
    size, at_chain, at_prev, at_seq = BODY_HEADER.unpack_from(entry)
    if size != len(entry) - 4 or not at_chain <= at_prev <= at_seq <= len(entry) - 16:
        raise ValueError("not an audit record body")
    if not entry.endswith(b"}"):
        raise ValueError("not an audit record body")
    return at_chain, at_prev, at_seq


def _seal_body(entry: bytes, chain: Chain) -> bytes:
    at_chain, at_prev, at_seq = _check_body(entry)
    text = entry[BODY_HEADER.size :]
    seq = chain.seq + 1
    prev = chain.prev
    body = b"".join(
        (
            text[:at_chain],
            orjson.dumps(chain.chain_id),
            text[at_chain:at_prev],
            orjson.dumps(prev),
            text[at_prev:at_seq],
            str(seq).encode(),
            text[at_seq:],
        )
    )
    digest = hashlib.sha256(prev.encode("ascii", "replace") + body).hexdigest()
    line = b"".join((body[:-1], b',"hash":"', digest.encode(), b'"}\n'))
    chain.seq = seq
    chain.prev = digest
    return line
