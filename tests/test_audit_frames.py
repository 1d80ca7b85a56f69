"""Batch frames between a worker and its audit writer process.

Record bodies travel as the worker wrote them; anything else (a record given
to ``write``, facts whose body could not be written) as JSON entries, in
their place. A frame that does not add up is refused, never half-read.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.audit import frames
from gateway.audit.sealer import RecordSealer

KEY = b"k" * 32


def body(i: int) -> bytes:
    facts = (0, 10, "192.0.2.0/24", "192.0.2.7", "allow", False, 0.001, "GET", "enforce",
             f"/t/acme/items/{i}", "pro", "rev", None, f"req-{i}", ("agent",), "items", None,
             None, (), 200, "alice", "acme", 1_700_000_000.0, "up", 200)  # fmt: skip
    return RecordSealer("gw", KEY).body(facts)


async def read(data: bytes) -> Any:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await frames.read(reader)


async def test_a_batch_keeps_bodies_and_json_entries_in_order() -> None:
    items = [body(0), {"decision": "note"}, body(1), body(2), [1, "two", None], body(3)]
    # Each run of bodies comes as one tuple (sealed in one call).
    runs = [(body(0),), {"decision": "note"}, (body(1), body(2)), [1, "two", None], (body(3),)]
    assert await read(frames.encode_batch(items)) == ["batch", runs]
    only_bodies = [body(i) for i in range(5)]
    assert await read(frames.encode_batch(only_bodies)) == ["batch", [tuple(only_bodies)]]
    assert await read(frames.encode_batch([])) == ["batch", []]
    # Control messages stay JSON, on the same stream.
    assert await read(frames.encode(("close", None, True))) == ["close", None, True]


async def test_a_value_json_cannot_hold_is_a_type_error_in_the_worker() -> None:
    with pytest.raises(TypeError):
        frames.encode_batch([body(0), {"x": object()}])


@pytest.mark.parametrize(
    "payload",
    [
        body(0)[:-1],  # an entry longer than the frame
        body(0) + b"\x00\x00",  # a length cut short
        frames.HEADER.pack(3 | frames.JSON_ENTRY) + b"{x}",  # JSON that does not decode
    ],
)
async def test_a_batch_frame_that_does_not_add_up_is_refused(payload: bytes) -> None:
    with pytest.raises(frames.FrameError):
        await read(frames.HEADER.pack(len(payload) | frames.BATCH) + payload)


async def test_a_frame_too_large_is_corruption() -> None:
    with pytest.raises(frames.FrameError, match="bytes"):
        await read(frames.HEADER.pack((frames.MAX_FRAME + 1) | frames.BATCH))


async def test_dropping_the_entries_a_dead_writer_process_wrote() -> None:
    """A successor is handed a frame without the records its predecessor
    reported written: the rest, in order, JSON entries included."""
    items = [body(0), {"decision": "note"}, body(1), body(2)]
    frame = frames.encode_batch(items)
    assert frames.drop_entries(frame, 0) == frame
    assert await read(frames.drop_entries(frame, 1)) == [
        "batch",
        [{"decision": "note"}, (body(1), body(2))],
    ]
    assert await read(frames.drop_entries(frame, 3)) == ["batch", [(body(2),)]]
    assert frames.drop_entries(frame, 4) == frames.encode_batch([])
    with pytest.raises(frames.FrameError):
        frames.drop_entries(frame, 5)
    with pytest.raises(frames.FrameError):
        frames.drop_entries(frame[:-3], 4)  # cut short
