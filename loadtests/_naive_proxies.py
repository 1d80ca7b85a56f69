"""The servers that ``bench_proxy.py`` measures Fairgate against.

Each factory returns an ASGI app; ``bench_proxy.py --serve KIND`` runs one of them under
uvicorn (uvloop + httptools, one worker) in its own pinned process.

* :func:`hello_app` - raw ASGI, a fixed 11-byte ``hello world``. It is both the upstream of
  every proxy and, on the server core, the ceiling for any Python ASGI server here.
* :func:`httpx_proxy` - a naive Starlette + httpx reverse proxy (one shared ``AsyncClient``).
* :func:`aiohttp_proxy` - a naive raw-ASGI + aiohttp reverse proxy (one shared
  ``ClientSession``).

"Naive" means the obvious code, not sabotaged code: both pools keep as many idle upstream
connections as the benchmark opens client connections, so neither pays a TCP handshake per
request. Neither does header hygiene, identity or policy work; they forward the path, query,
body and the client's end-to-end headers, and relay status, headers and body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HELLO = b"hello world"
_HELLO_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"11")]

# Hop-by-hop headers (RFC 9110 7.6.1) plus the framing each client library sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "host",
        "content-length",
    }
)
_HOP_BY_HOP_BYTES = frozenset(h.encode() for h in HOP_BY_HOP)


async def _lifespan(
    receive: Receive,
    send: Send,
    startup: Callable[[], Awaitable[None]] | None = None,
    shutdown: Callable[[], Awaitable[None]] | None = None,
) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if startup is not None:
                await startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if shutdown is not None:
                await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def hello_app() -> ASGIApp:
    """Raw ASGI: ``200 hello world`` on any method and path; the request body is ignored."""
    start = {"type": "http.response.start", "status": 200, "headers": _HELLO_HEADERS}
    body = {"type": "http.response.body", "body": HELLO}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await send(start)
            await send(body)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    return app


def _target(scope: Scope) -> str:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    return (raw + b"?" + query if query else raw).decode("latin-1")


def httpx_proxy(upstream: str, pool_size: int = 256) -> ASGIApp:
    """Starlette + one shared ``httpx.AsyncClient``: the obvious proxy in a few lines."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=pool_size)
        async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
            state["client"] = client
            yield

    async def proxy(request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1") not in HOP_BY_HOP]
        upstream_response = await state["client"].request(
            request.method,
            upstream + _target(request.scope),
            headers=headers,
            content=await request.body(),
        )
        return Response(
            upstream_response.content,
            status_code=upstream_response.status_code,
            headers={
                k: v for k, v in upstream_response.headers.items() if k.lower() not in HOP_BY_HOP
            },
        )

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", proxy, methods=methods)], lifespan=lifespan)


def aiohttp_proxy(upstream: str, pool_size: int = 256) -> ASGIApp:
    """Raw ASGI + one shared ``aiohttp.ClientSession``."""
    import aiohttp
    from yarl import URL

    state: dict[str, aiohttp.ClientSession] = {}

    async def startup() -> None:
        # aiohttp keeps every released connection idle, bounded only by `limit`.
        connector = aiohttp.TCPConnector(limit=pool_size, limit_per_host=pool_size)
        state["session"] = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=30.0),
        )

    async def shutdown() -> None:
        await state["session"].close()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, startup, shutdown)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k not in _HOP_BY_HOP_BYTES
        ]
        url = URL(upstream + _target(scope), encoded=True)
        async with state["session"].request(
            scope["method"], url, headers=headers, data=body or None
        ) as response:
            payload = await response.read()
            out = [(k, v) for k, v in response.raw_headers if k.lower() not in _HOP_BY_HOP_BYTES]
            status = response.status
        out.append((b"content-length", b"%d" % len(payload)))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": payload})

    return app
