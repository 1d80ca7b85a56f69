"""Batch frames between a worker and its audit writer process.

Record bodies travel as the worker wrote them; anything else (a record given
to ``write``, facts whose body could not be written) as JSON entries, in
their place. A frame that does not add up is refused, never half-read.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.audit import frames
from gateway.audit.channel import READ_AHEAD, FrameChannel, connect
from gateway.audit.sealer import RecordSealer
from tests.test_audit_helpers import until

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


@pytest.fixture
async def pair() -> AsyncIterator[tuple[FrameChannel, socket.socket]]:
    """The writer process's channel on one end of a real socket pair, the
    worker's end (a plain non-blocking socket) the other."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    channel = await connect(theirs)
    yield channel, ours
    channel.close()
    ours.close()


async def send(sock: socket.socket, data: bytes, piece: int) -> None:
    """``data`` in pieces of ``piece`` bytes, each reaching the other end
    before the next is sent (a frame read in as many goes as it takes)."""
    loop = asyncio.get_running_loop()
    for start in range(0, len(data), piece):
        await loop.sock_sendall(sock, data[start : start + piece])
        await asyncio.sleep(0)  # let the channel read this piece alone


async def test_a_batch_keeps_bodies_and_json_entries_in_order() -> None:
    items = [body(0), {"decision": "note"}, body(1), body(2), [1, "two", None], body(3)]
    # Each run of bodies comes as one Bodies (sealed in one call; equal to
    # the tuple of its bodies).
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


MESSAGES = [
    frames.encode(("open", {"instance": "gw"}, "00ff", None)),
    frames.encode_batch([body(0), {"decision": "note"}, body(1), body(2), [1, None]]),
    frames.encode_batch([]),
    frames.encode_batch([body(i) for i in range(50)]),
    frames.encode(("close", None, True)),
]


@pytest.mark.parametrize("piece", [1, 3, 4, 5, 4096, 1 << 20])
async def test_the_writer_process_reads_what_a_stream_reads(
    pair: tuple[FrameChannel, socket.socket], piece: int
) -> None:
    """Whatever pieces the frames arrive in (a header split, a header and
    its frame together, several frames at once), the writer process's
    channel reads the messages a stream reads, in order."""
    channel, ours = pair
    expected = [await read(frame) for frame in MESSAGES]
    sending = asyncio.create_task(send(ours, b"".join(MESSAGES), piece))
    assert [await channel.read() for _ in MESSAGES] == expected
    await sending
    # A run of bodies is read where the frame holds them: sealed alike.
    run = expected[3][1][0]
    assert type(run) is frames.Bodies and list(run) == [body(i) for i in range(50)]


async def test_more_frames_than_it_reads_ahead_all_arrive_in_order(
    pair: tuple[FrameChannel, socket.socket],
) -> None:
    """Frames the writer process has not read yet wait in the socket past
    ``READ_AHEAD``, not in memory; reading them lets the rest in."""
    channel, ours = pair
    count = READ_AHEAD * 4
    batches = [frames.encode_batch([body(i)]) for i in range(count)]
    sending = asyncio.create_task(asyncio.get_running_loop().sock_sendall(ours, b"".join(batches)))
    await until(lambda: channel.paused, what="the channel to stop reading ahead")
    await sending  # all of them sent: the rest wait in the socket
    assert channel.waiting == READ_AHEAD
    for i in range(count):
        assert await channel.read() == ["batch", [(body(i),)]]
        assert channel.waiting <= READ_AHEAD
    assert not channel.paused


async def test_the_end_of_the_stream_after_the_frames_it_completed(
    pair: tuple[FrameChannel, socket.socket],
) -> None:
    """A worker that dies mid-frame (or mid-header): its whole frames are
    read, then the end (as a stream's ``IncompleteReadError``), never half
    a frame."""
    channel, ours = pair
    whole = frames.encode_batch([body(0)])
    await asyncio.get_running_loop().sock_sendall(ours, whole + whole[:-5])
    ours.close()
    assert await channel.read() == ["batch", [(body(0),)]]
    with pytest.raises(asyncio.IncompleteReadError):
        await channel.read()
    with pytest.raises(asyncio.IncompleteReadError):
        await channel.read()  # and again: the end stays the end


async def test_the_end_of_the_stream_mid_header() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    channel = await connect(theirs)
    whole = frames.encode_batch([body(0)])
    await asyncio.get_running_loop().sock_sendall(ours, whole + whole[:2])
    ours.close()
    assert await channel.read() == ["batch", [(body(0),)]]
    with pytest.raises(asyncio.IncompleteReadError):
        await channel.read()
    channel.close()


async def test_a_frame_too_large_ends_the_reading_after_the_frames_before_it(
    pair: tuple[FrameChannel, socket.socket],
) -> None:
    """Nothing after a corrupt header can be framed: the frames before it
    are read, then the error (again on each read), and the socket is left
    open for the writer process's last reports."""
    channel, ours = pair
    loop = asyncio.get_running_loop()
    corrupt = frames.HEADER.pack((frames.MAX_FRAME + 1) | frames.BATCH)
    await loop.sock_sendall(ours, MESSAGES[0] + corrupt + MESSAGES[4])
    assert (await channel.read())[0] == "open"
    for _ in range(2):
        with pytest.raises(frames.FrameError, match="bytes"):
            await channel.read()
    assert channel.paused and not channel.is_closing()
    closed = frames.encode(("closed", 1, 0, 0, True, 1, "gw-w0"))
    channel.write(closed)
    await channel.drain()
    assert await loop.sock_recv(ours, 1024) == closed


async def test_a_frame_that_does_not_decode_is_an_error_and_the_next_still_reads(
    pair: tuple[FrameChannel, socket.socket],
) -> None:
    channel, ours = pair
    empty_json = frames.HEADER.pack(0)
    bad_json = frames.HEADER.pack(3) + b"{x}"
    await asyncio.get_running_loop().sock_sendall(ours, empty_json + bad_json + MESSAGES[4])
    for _ in range(2):
        with pytest.raises(frames.FrameError, match="does not decode"):
            await channel.read()
    assert await channel.read() == ["close", None, True]


async def test_a_cancelled_drain_leaves_the_others_waiting(
    pair: tuple[FrameChannel, socket.socket],
) -> None:
    """Reports the worker does not read fill the socket: a drain waits (one
    cancelled does not cancel the others), and returns once it reads."""
    channel, ours = pair
    loop = asyncio.get_running_loop()
    reports = frames.encode(("status", 1, 0, 0, True, 1, "gw-w0")) * 200_000  # ~8 MB
    channel.write(reports)  # more than the socket takes: the rest waits in the transport
    first = asyncio.create_task(channel.drain())
    second = asyncio.create_task(channel.drain())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    assert first.cancelled() and not second.done()
    received = 0
    while not second.done():
        received += len(await loop.sock_recv(ours, 1 << 20))
    await second  # did not raise
    assert received > len(reports) // 2


async def test_reports_reach_the_worker_and_a_closed_socket_is_a_connection_error(
    pair: tuple[FrameChannel, socket.socket],
) -> None:
    channel, ours = pair
    loop = asyncio.get_running_loop()
    report = frames.encode(("status", 1, 0, 0, True, 1, "gw-w0"))
    channel.write(report)
    await channel.drain()
    assert await loop.sock_recv(ours, 1024) == report
    ours.close()
    with pytest.raises(asyncio.IncompleteReadError):
        await channel.read()  # the channel learns of the close by reading
    assert channel.is_closing()
    with pytest.raises(ConnectionError):
        await channel.drain()
