"""Helpers shared by the demo upstreams: JSON responses, an in-memory store, pagination,
body validation and the echo / digest endpoints the gateway's tests rely on."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

Record = dict[str, Any]

DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 200


class JSONResponse(Response):
    """orjson-backed JSON response: the demo serves big pages, so the fast encoder matters."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error(status: int, code: str, detail: Any = None) -> JSONResponse:
    body: Record = {"error": code}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


def not_found() -> JSONResponse:
    return error(404, "not_found")


def invalid(detail: Any) -> JSONResponse:
    return error(422, "invalid", detail)


async def http_exception(request: Request, exc: Exception) -> Response:
    """Router 404/405s as JSON too, so clients never have to special-case plain text."""
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return JSONResponse(
        {"error": codes.get(exc.status_code, "http_error")},
        status_code=exc.status_code,
        headers=exc.headers,
    )


EXCEPTION_HANDLERS: Mapping[Any, Callable[[Request, Exception], Any]] = {
    404: http_exception,
    405: http_exception,
}


def subject(request: Request) -> str:
    """The caller as authenticated by the gateway; the demo apps never authenticate."""
    return request.headers.get("x-fairgate-subject") or "anonymous"


class Collection:
    """Insertion-ordered id -> record map with its own id sequence."""

    def __init__(self, first_id: int) -> None:
        self.items: dict[int, Record] = {}
        self.next_id = first_id

    def add(self, record: Record) -> Record:
        record = {"id": self.next_id, **record}
        self.items[self.next_id] = record
        self.next_id += 1
        return record

    def get(self, item_id: int) -> Record | None:
        return self.items.get(item_id)


class Tenants:
    """Per-tenant collections. Unknown tenants get empty collections on first use, because
    the gateway (not this demo) decides which tenants exist."""

    def __init__(self, first_ids: Mapping[str, int]) -> None:
        self.first_ids = dict(first_ids)
        self.data: dict[str, dict[str, Collection]] = {}

    def __call__(self, tenant: str, kind: str) -> Collection:
        colls = self.data.setdefault(tenant, {})
        if kind not in colls:
            colls[kind] = Collection(self.first_ids[kind])
        return colls[kind]


def paginate(request: Request, records: Iterable[Record]) -> Response:
    """`?page=N&per_page=M` over a collection; `next` is a relative link or null."""
    try:
        page = int(request.query_params.get("page", "1"))
        per_page = int(request.query_params.get("per_page", str(DEFAULT_PER_PAGE)))
    except ValueError:
        return invalid("page and per_page must be integers")
    if page < 1 or per_page < 1:
        return invalid("page and per_page must be >= 1")
    per_page = min(per_page, MAX_PER_PAGE)
    items = list(records)
    start = (page - 1) * per_page
    next_link = None
    if start + per_page < len(items):
        next_link = f"{request.url.path}?page={page + 1}"
        if per_page != DEFAULT_PER_PAGE:
            next_link += f"&per_page={per_page}"
    return JSONResponse(
        {
            "items": items[start : start + per_page],
            "page": page,
            "per_page": per_page,
            "total": len(items),
            "next": next_link,
        }
    )


async def read_object(request: Request) -> Record | None:
    """The body as a JSON object, or None when it is not one."""
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else None


def check_fields(
    body: Record | None, required: Iterable[str], optional: Iterable[str] = ()
) -> list[str]:
    """Validation errors for a flat object of non-empty string fields (empty list = valid)."""
    if body is None:
        return ["body must be a JSON object"]
    required = list(required)
    allowed = {*required, *optional}
    errors = [f"{name} is required" for name in required if name not in body]
    for name, value in body.items():
        if name not in allowed:
            errors.append(f"unknown field {name}")
        elif not isinstance(value, str) or not value.strip():
            errors.append(f"{name} must be a non-empty string")
        elif name == "email" and ("@" not in value or " " in value):
            errors.append("email is not an email address")
    return errors


def created(record: Record, location: str) -> JSONResponse:
    return JSONResponse(record, status_code=201, headers={"location": location})


async def digest_body(request: Request) -> tuple[int, str]:
    """Stream the body (never buffering it whole) and return its length and sha256."""
    sha = hashlib.sha256()
    length = 0
    async for chunk in request.stream():
        length += len(chunk)
        sha.update(chunk)
    return length, sha.hexdigest()


async def upload(request: Request) -> Response:
    length, sha = await digest_body(request)
    return JSONResponse({"bytes": length, "sha256": sha})


class Echo:
    """ASGI app reporting exactly what reached the upstream, for the gateway's tests.

    A class (not a function) so Starlette routes it as raw ASGI: every method is accepted,
    including ones the gateway should have rejected, so tests can see what leaked through."""

    def __init__(self, service: str) -> None:
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        length, sha = await digest_body(Request(scope, receive))
        # Report the raw, un-normalized request: raw bytes decoded latin-1, headers in order.
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        report = {
            "service": self.service,
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": raw_path.decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "headers": headers,
            "body_length": length,
            "body_sha256": sha,
        }
        await JSONResponse(report)(scope, receive, send)


def echo_routes(service: str) -> list[Route]:
    prefix = f"/{service}/v1"
    paths = ["/echo", f"{prefix}/echo", f"{prefix}/{{tenant}}/echo"]
    return [Route(path, Echo(service)) for path in [*paths, f"{paths[-1]}/{{rest:path}}"]]
