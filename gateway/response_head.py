"""Writing a response's head: the native or the pure-Python twin, and the uvicorn cycle using it.

``response_head`` is uvicorn's head-writing loop as one function (see
``gateway/_head_py.py``); the native ``gateway._head_c`` is chosen unless
``FAIRGATE_NO_EXTENSIONS`` is set or it was not built. ``HeadCycle`` is
uvicorn's httptools ``RequestResponseCycle`` with the head written by it:
``headers_complete`` is uvicorn's ``on_headers_complete`` making that cycle;
``gateway.serve``'s protocol calls it instead of uvicorn's.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Final

from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from gateway._head_py import Framing
from gateway.native import select

__all__ = ["IMPLEMENTATION", "HeadCycle", "headers_complete", "response_head"]


_module, _implementation = select("_head")
response_head: Final = _module.response_head
IMPLEMENTATION: Final[str] = _implementation  # "c" or "py"


class _Done:
    """An awaitable that is already done: ``await`` returns ``None`` at once."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return iter(())  # type: ignore[return-value]


_DONE = _Done()


class HeadCycle(RequestResponseCycle):  # type: ignore[misc]
    """uvicorn's cycle, writing the head of a response with ``response_head``.

    Only the first ``http.response.start`` is taken over, and only in the
    common case; every other message, and a start while the transport is
    paused or the client gone (uvicorn waits, or drops it), is uvicorn's.
    The state left behind is what uvicorn's own loop leaves, except after a
    refused header, where uvicorn has half-updated the framing and this
    updates none: either way the response is dead, the app's error is raised.

    ``send`` is a plain function returning an awaitable, not a coroutine: a
    body message gets uvicorn's own coroutine, with no frame of ours around
    it (an ``async def`` wrapper cost more per request than the head saved).
    """

    def send(self, message: Any) -> Awaitable[None]:  # type: ignore[override]
        if (
            self.response_started
            or message["type"] != "http.response.start"
            or self.disconnected
            or self.flow.write_paused
            or self.access_log
        ):
            return _uvicorn_send(self, message)  # type: ignore[no-any-return]
        self.response_started = True
        self.waiting_for_100_continue = False
        status = message["status"]
        headers = message.get("headers", [])
        if self.default_headers:
            headers = self.default_headers + list(headers)
        framing: Framing = response_head(
            STATUS_LINE[status],
            status,
            headers,
            self.scope["method"] == "HEAD",
            self.chunked_encoding,
            self.expected_content_length,
            self.keep_alive,
        )
        head, self.chunked_encoding, self.expected_content_length, self.keep_alive = framing
        self.transport.write(head)
        return _DONE


_uvicorn_send = RequestResponseCycle.send


def _headers_complete() -> Callable[[HttpToolsProtocol], None]:
    """uvicorn's ``HttpToolsProtocol.on_headers_complete``, building a ``HeadCycle``.

    The very function, its code run with ``RequestResponseCycle`` meaning
    ``HeadCycle``: uvicorn's parsing of the request stays uvicorn's. A cycle
    made as uvicorn's class and then given another (``__class__ =``) would
    cost more than the head saves: CPython 3.11 turns its attributes into a
    dictionary, and every later read of them is slower.
    """
    original = HttpToolsProtocol.on_headers_complete
    if "RequestResponseCycle" not in original.__code__.co_names:  # pragma: no cover
        raise RuntimeError("uvicorn builds its cycle differently: update gateway.response_head")
    namespace = {**original.__globals__, "RequestResponseCycle": HeadCycle}
    return types.FunctionType(  # type: ignore[no-any-return]
        original.__code__,
        namespace,
        original.__name__,
        original.__defaults__,
        original.__closure__,
    )


headers_complete: Final = _headers_complete()
