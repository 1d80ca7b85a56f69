"""Response heads: the native writer, its pure twin and uvicorn's own loop agree.

``gateway.serve`` writes every response's head with ``gateway.response_head``
instead of uvicorn's per-header regular expressions. Hypothesis sends the
same ``http.response.start`` through uvicorn's ``RequestResponseCycle``, the
gateway's ``HeadCycle`` (which uses the selected twin) and both twins
directly: the bytes on the wire, the refusal (a header with CR/LF or another
forbidden byte must never reach the client), and the framing the cycle is
left with (chunked, expected length, keep-alive) must be the same. A missing
native module is skipped, unless FAIRGATE_REQUIRE_EXTENSIONS=1.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from gateway import _head_py
from gateway.response_head import HeadCycle
from tests.support import load_native, require_native

C_MODULE, C_IMPORT_ERROR = load_native("_head_c")

names = st.one_of(
    st.sampled_from(
        [
            b"content-type",
            b"Content-Length",
            b"content-length",
            b"TRANSFER-ENCODING",
            b"transfer-encoding",
            b"Connection",
            b"connection",
            b"x-request-id",
            b"RateLimit",
            b"set-cookie",
        ]
    ),
    st.binary(max_size=12),  # any byte: control characters, separators, non-ASCII
    st.text("abcXYZ-_:;( \t\r\n\x7f", max_size=10).map(str.encode),
)
FRAMING_VALUES = [b"12", b"0", b" 7 ", b"-1", b"12abc", b"chunked", b"Chunked", b"gzip, chunked"]
CONNECTION_VALUES = [b"close", b"keep-alive, CLOSE", b" close ,x", b"upgrade", b"\xff"]
values = st.one_of(
    st.sampled_from(FRAMING_VALUES + CONNECTION_VALUES),
    st.binary(max_size=40),  # several eight-byte words
    st.text("ab ,\t\r\n\x00\x08\x0b\x7f\x80é", max_size=12).map(lambda s: s.encode()),
)
header_lists = st.lists(st.tuples(names, values), max_size=6)
statuses = st.sampled_from([200, 201, 204, 304, 404, 429, 503, 101, 599])


class Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def cycle_result(cls: type, status: int, headers: list[Any], method: str, keep_alive: bool) -> Any:
    """What a cycle of class ``cls`` writes and keeps for one response start."""
    transport = Transport()
    scope = {"type": "http", "method": method, "http_version": "1.1"}
    cycle = cls(
        scope=scope,
        transport=transport,
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )
    message = {"type": "http.response.start", "status": status, "headers": headers}

    async def start() -> None:
        await cycle.send(message)  # an awaitable, not necessarily a coroutine

    try:
        asyncio.run(start())
    except Exception as exc:
        return ("raised", type(exc), str(exc))
    framing = (cycle.chunked_encoding, cycle.expected_content_length, cycle.keep_alive)
    return (transport.written, *framing)


def direct(fn: Any, status: int, headers: Any, method: str, keep_alive: bool) -> Any:
    try:
        return fn(STATUS_LINE[status], status, headers, method == "HEAD", None, 0, keep_alive)
    except Exception as exc:
        return ("raised", type(exc), str(exc))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    status=statuses,
    headers=header_lists,
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    keep_alive=st.booleans(),
)
def test_twins_and_head_cycle_match_uvicorn(
    status: int, headers: list[tuple[bytes, bytes]], method: str, keep_alive: bool
) -> None:
    native = require_native(C_MODULE, C_IMPORT_ERROR, "_head_c")
    expected = cycle_result(RequestResponseCycle, status, headers, method, keep_alive)
    assert cycle_result(HeadCycle, status, headers, method, keep_alive) == expected
    assert direct(_head_py.response_head, status, headers, method, keep_alive) == expected
    assert direct(native.response_head, status, headers, method, keep_alive) == expected
    # The same headers in a tuple, and as lists rather than tuples (the twin's slow path).
    as_lists = [list(h) for h in headers]
    assert direct(native.response_head, status, tuple(headers), method, keep_alive) == expected
    assert direct(native.response_head, status, as_lists, method, keep_alive) == direct(
        _head_py.response_head, status, as_lists, method, keep_alive
    )


@pytest.mark.parametrize(
    "header",
    [
        (b"x-evil", b"a\r\nset-cookie: session=stolen"),  # response splitting
        (b"x-evil", b"a\nb"),
        (b"x-evil", b"\x00"),
        (b"x-evil\r\nset-cookie", b"1"),
        (b"x evil", b"1"),
    ],
)
def test_header_injection_is_refused_by_both_twins(header: tuple[bytes, bytes]) -> None:
    """A CR/LF (or other forbidden byte) from an upstream or a policy never splits a response."""
    native = require_native(C_MODULE, C_IMPORT_ERROR, "_head_c")
    for fn in (_head_py.response_head, native.response_head):
        with pytest.raises(RuntimeError, match="Invalid HTTP header"):
            fn(STATUS_LINE[200], 200, [(b"content-length", b"0"), header], False, None, 0, True)


def test_common_head_bytes() -> None:
    native = require_native(C_MODULE, C_IMPORT_ERROR, "_head_c")
    headers = [(b"Content-Type", b"application/json"), (b"content-length", b"2")]
    for fn in (_head_py.response_head, native.response_head):
        head, chunked, expected, keep_alive = fn(
            STATUS_LINE[200], 200, headers, False, None, 0, True
        )
        assert head == (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"
        )
        assert (chunked, expected, keep_alive) == (False, 2, True)


def test_fairgate_protocol_builds_head_cycles() -> None:
    """``fairgate run``'s protocol answers through a HeadCycle, and the head it writes is right."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from gateway.serve import _protocol

    written: list[bytes] = []

    class SocketTransport(Transport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(
                name, default
            )

        def write(self, data: bytes) -> None:
            written.append(data)

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"Content-Length", b"2"), (b"RateLimit", b'"plan";r=9;t=1')]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> Any:
        config = Config(app, lifespan="off", access_log=False, server_header=False)
        config.load()
        protocol = _protocol(64 * 1024)(config=config, server_state=ServerState(), app_state={})
        protocol.connection_made(SocketTransport())
        protocol.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        cycle = protocol.cycle
        while not cycle.response_complete:
            await asyncio.sleep(0.001)
        return cycle

    cycle = asyncio.run(main())
    assert type(cycle) is HeadCycle
    assert b"".join(written).startswith(
        b'HTTP/1.1 200 OK\r\ncontent-length: 2\r\nratelimit: "plan";r=9;t=1\r\n'
    )
    assert b"".join(written).endswith(b"\r\n\r\nok")


def test_every_byte_at_every_position_of_a_value() -> None:
    """The native value check reads eight bytes at a time: every byte value, at
    every offset of a three-word value, is refused or passed as the twin does."""
    native = require_native(C_MODULE, C_IMPORT_ERROR, "_head_c")
    for byte in range(256):
        for offset in range(24):
            value = bytearray(b"a" * 24)
            value[offset] = byte
            headers = [(b"x-v", bytes(value))]
            expected = direct(_head_py.response_head, 200, headers, "GET", True)
            assert direct(native.response_head, 200, headers, "GET", True) == expected, (
                byte,
                offset,
            )


def test_arguments_that_run_python_code_are_the_twins() -> None:
    """A status whose comparison changes the header list between the native
    writer's two passes must not make it write past the head (a heap overflow
    a review found): odd arguments go to the twin, and a list is copied first."""
    native = require_native(C_MODULE, C_IMPORT_ERROR, "_head_c")

    def tricky() -> tuple[Any, list[tuple[bytes, bytes]]]:
        headers = [(b"x-a", b"1")]

        class Status(int):
            __hash__ = int.__hash__

            def __eq__(self, other: object) -> bool:
                headers[0] = (b"x-b", b"y" * 100_000)
                return int.__eq__(self, other)

            def __ne__(self, other: object) -> bool:
                headers[0] = (b"x-b", b"y" * 100_000)
                return int.__ne__(self, other)

        return Status(200), headers

    results = []
    for fn in (_head_py.response_head, native.response_head):
        status, headers = tricky()
        results.append(fn(STATUS_LINE[200], status, headers, False, None, 0, True))
    assert results[0] == results[1]
    for odd in [
        (None, 200, [], False, None, 0, True),  # no status line
        (STATUS_LINE[200], 200, [], False, None, 0, 1),  # keep_alive not a bool
        (STATUS_LINE[200], 200, [], 0, None, 0, False),  # head_request not a bool
        (STATUS_LINE[200], 200.0, [(b"a", b"b")], False, None, 0, True),
    ]:
        assert direct_args(native.response_head, odd) == direct_args(_head_py.response_head, odd)


def direct_args(fn: Any, args: tuple[Any, ...]) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        return ("raised", type(exc), str(exc))


def test_the_selected_writer_is_the_native_one_unless_disabled() -> None:
    import os

    from gateway import response_head

    expected = "c" if C_MODULE is not None else "py"
    if os.environ.get("FAIRGATE_NO_EXTENSIONS", "") not in ("", "0"):
        expected = "py"
    assert expected == response_head.IMPLEMENTATION
