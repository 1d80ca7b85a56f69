"""Messages between a worker and its audit writer process.

A frame is a 4-byte big-endian length and a JSON array (orjson): the first
element names the message. orjson writes a batch of facts for fewer
instructions than marshal or pickle (about 2.7 k per request's facts, against
3.5 k for marshal), floats round-trip exactly, and a frame is plain data, so
nothing a frame holds can run code in the other process. Tuples arrive as
lists; the writer process turns a request's facts back into a tuple.

Worker to writer:  ["open", config fields, ip key (hex)], ["batch", [facts or record, ...]],
                   ["close", timeout or null, final]
Writer to worker:  ["ready", chain id, seq, request id of the chain's last record],
                   ["failed", message],
                   ["status", written, checkpoints, failures, sinks ok, seq, chain id],
                   ["closed", written, checkpoints, failures, sinks ok, seq, chain id]
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import asdict
from typing import Any

import orjson

from gateway.audit.config import AuditConfig

HEADER = struct.Struct("!I")
MAX_FRAME = 256 * 1024 * 1024  # a frame this large is corruption, not a batch


class FrameError(ValueError):
    """A frame that is too large or does not decode."""


def encode(message: Any) -> bytes:
    """The frame of ``message``; ``TypeError`` for a value JSON cannot hold."""
    payload = orjson.dumps(message)
    return HEADER.pack(len(payload)) + payload


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
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > MAX_FRAME:
        raise FrameError(f"audit frame of {size} bytes")
    try:
        message = orjson.loads(await reader.readexactly(size))
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"audit frame does not decode: {exc}") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise FrameError("audit frame is not a message")
    return message
