"""Messages between a worker and its audit writer process.

A frame is a 4-byte big-endian length and a JSON array (orjson): the first
element names the message. A frame is plain data, so nothing a frame holds
can run code in the other process.

A batch of records is a binary frame instead (the length's top bit set): its
entries one after another, each a big-endian u32 length and that many bytes.
A worker writes it with ``RecordBatch`` (``encode_batch`` is its plain form).
Most are record bodies (``RecordSealer.body``: the worker wrote the record's
canonical JSON, the writer process splices in its place in the chain and
hashes it, so no record is serialised twice or decoded at all). An entry
with the length's top bit set is JSON instead: the facts of a request whose
body could not be written (the writer process seals them, or records why it
cannot), or a record given to ``write``. Tuples arrive as lists. The writer
process gets each run of bodies as ``Bodies``, read where the frame holds them.

Worker to writer:  ["open", config fields, ip key (hex)], a batch frame,
                   ["close", timeout or null, final]
Writer to worker:  ["ready", chain id, seq written, records to skip or null],
                   ["failed", message],
                   ["status", written, checkpoints, failures, sinks ok, seq, chain id],
                   ["closed", written, checkpoints, failures, sinks ok, seq, chain id]
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import orjson

from gateway.audit.config import AuditConfig
from gateway.native import select

_records = select("_records")[0]
_decode_batch: Callable[[bytes | bytearray], list[Any]] = _records.decode_batch
# A run of record bodies as ``decode_batch`` gives it (natively: read where
# the frame holds them, without a copy of each).
Bodies: type = _records.Bodies

HEADER = struct.Struct("!I")
MAX_FRAME = 256 * 1024 * 1024  # a frame this large is corruption, not a batch
BATCH = 0x8000_0000  # in a frame's length: a batch frame (entries, not JSON)
JSON_ENTRY = 0x8000_0000  # in an entry's length: JSON, not a record body
SIZE = 0x7FFF_FFFF


class FrameError(ValueError):
    """A frame that is too large or does not decode."""


def encode(message: Any) -> bytes:
    """The frame of ``message``; ``TypeError`` for a value JSON cannot hold."""
    payload = orjson.dumps(message)
    return HEADER.pack(len(payload)) + payload


def encode_batch(items: list[Any]) -> bytes:
    """The batch frame of ``items``: record bodies (bytes) as they are, anything
    else as JSON; ``TypeError`` for a value JSON cannot hold."""
    try:
        payload = b"".join(items)  # all bodies: they carry their own lengths
    except TypeError:
        parts: list[bytes] = []
        for item in items:
            if type(item) is bytes:
                parts.append(item)
            else:
                data = orjson.dumps(item)
                parts.append(HEADER.pack(len(data) | JSON_ENTRY))
                parts.append(data)
        payload = b"".join(parts)
    return HEADER.pack(len(payload) | BATCH) + payload


def drop_entries(frame: bytes, count: int) -> bytes:
    """The batch frame ``frame`` without its first ``count`` entries (records
    a writer process wrote before it died: its successor is handed the rest)."""
    payload = memoryview(frame)[HEADER.size :]
    pos = 0
    for _ in range(count):
        if pos + HEADER.size > len(payload):
            raise FrameError("audit batch frame has fewer entries than dropped")
        (word,) = HEADER.unpack_from(payload, pos)
        pos += HEADER.size + (word & SIZE)
    if pos > len(payload):
        raise FrameError("audit batch frame cut short")
    rest = payload[pos:]
    return HEADER.pack(len(rest) | BATCH) + rest


def decode_batch(payload: bytes | bytearray) -> list[Any]:
    """The entries of a batch frame (bytes, or the bytearray it was read
    into, which must not change while its entries live): each run of record
    bodies as one ``Bodies`` (the writer process seals a run in one call),
    JSON entries decoded (lists and dicts), in their order (natively, or its
    twin)."""
    try:
        return _decode_batch(payload)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"audit batch entry does not decode: {exc}") from None
    except ValueError as exc:
        raise FrameError(str(exc)) from None


def config_fields(config: AuditConfig) -> dict[str, Any]:
    """``config`` as the open message carries it (JSON: keys in hex)."""
    fields = asdict(config)
    key = config.checkpoint_key
    fields["checkpoint_key"] = None if key is None else key.hex()
    return fields


def config_from(fields: dict[str, Any]) -> AuditConfig:
    key = fields.get("checkpoint_key")
    fields = {**fields, "sinks": tuple(fields["sinks"])}
    fields["checkpoint_key"] = None if key is None else bytes.fromhex(key)
    return AuditConfig(**fields)


async def read(reader: asyncio.StreamReader) -> Any:
    """The next message; ``asyncio.IncompleteReadError`` at the end of the stream."""
    batch, size = frame_size(await reader.readexactly(HEADER.size))
    return message(batch, await reader.readexactly(size))


def frame_size(header: bytes | bytearray) -> tuple[bool, int]:
    """Whether the frame of ``header`` is a batch frame, and its size."""
    (size,) = HEADER.unpack(header)
    if size & SIZE > MAX_FRAME:
        raise FrameError(f"audit frame of {size & SIZE} bytes")
    return bool(size & BATCH), size & SIZE


def message(batch: bool, payload: bytes | bytearray) -> Any:
    """The message a frame's ``payload`` holds (``batch``: a batch frame's)."""
    if batch:
        return ["batch", decode_batch(payload)]
    try:
        decoded = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"audit frame does not decode: {exc}") from None
    if not isinstance(decoded, list) or not decoded or not isinstance(decoded[0], str):
        raise FrameError("audit frame is not a message")
    return decoded
