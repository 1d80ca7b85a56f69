"""Messages between a worker and its audit writer process.

A frame is a 4-byte big-endian length and a ``marshal`` payload: the records'
facts are tuples of strings, numbers and None, which marshal writes and reads
in C, far cheaper than JSON or pickle. marshal is only safe between trusted
processes; both ends here are the same program, connected by a socketpair
nobody else holds.

Worker to writer:  ("open", config fields, ip key), ("batch", [facts or record, ...]),
                   ("close", timeout or None, final)
Writer to worker:  ("ready", chain id, seq), ("failed", message),
                   ("status", written, checkpoints, failures, sinks ok, seq, chain id),
                   ("closed", written, checkpoints, failures, sinks ok, seq, chain id)
"""

from __future__ import annotations

import asyncio
import marshal
import struct
from typing import Any

HEADER = struct.Struct("!I")
MAX_FRAME = 256 * 1024 * 1024  # a frame this large is corruption, not a batch
# Version 4 shares repeated strings ("GET", "allow", a tenant) within a frame.
VERSION = 4


class FrameError(ValueError):
    """A frame that is too large or does not decode."""


def encode(message: Any) -> bytes:
    payload = marshal.dumps(message, VERSION)
    return HEADER.pack(len(payload)) + payload


async def read(reader: asyncio.StreamReader) -> Any:
    """The next message; ``asyncio.IncompleteReadError`` at the end of the stream."""
    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if size > MAX_FRAME:
        raise FrameError(f"audit frame of {size} bytes")
    payload = await reader.readexactly(size)
    try:
        return marshal.loads(payload)
    except (EOFError, ValueError, TypeError) as exc:
        raise FrameError(f"audit frame does not decode: {exc}") from None
