"""Demo VoIP upstream: calls, SMS, phone numbers and (synthesised) call recordings."""

from __future__ import annotations

import array
import math
import re
import struct
import sys
import time
import zlib
from collections.abc import AsyncIterator
from functools import partial

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.demo._common import (
    EXCEPTION_HANDLERS,
    Collection,
    JSONResponse,
    Tenants,
    check_fields,
    created,
    echo_routes,
    invalid,
    not_found,
    paginate,
    read_object,
    subject,
    upload,
)

SEED_TENANTS = ("acme", "globex")
E164 = re.compile(r"\+[1-9][0-9]{6,14}")
MAX_SMS = 1600
CHUNK = 64 * 1024
DEFAULT_RECORDING = 8 * 1024 * 1024
MAX_RECORDING = 4 * 1024 * 1024 * 1024
SAMPLE_RATE = 8000
SEED_EPOCH = 1_700_000_000  # fixed, so seeded timestamps are deterministic


def _tone_block() -> bytes:
    """64 KiB of 16-bit mono PCM. The 64-sample period divides the block, so repeating the
    block back to back is a seamless 125 Hz tone: big downloads cost no per-byte work."""
    samples = array.array(
        "h", (int(8000 * math.sin(2 * math.pi * i / 64)) for i in range(CHUNK // 2))
    )
    if sys.byteorder == "big":  # WAV is little-endian
        samples.byteswap()
    return samples.tobytes()


BLOCK = _tone_block()


def wav_header(size: int) -> bytes:
    """A 44-byte RIFF/WAVE header for a file of `size` bytes (fields clamp at 4 GiB - 1)."""
    riff = min(max(size - 8, 0), 0xFFFFFFFF)
    data = min(max(size - 44, 0), 0xFFFFFFFF)
    fmt = struct.pack("<HHIIHH", 1, 1, SAMPLE_RATE, SAMPLE_RATE * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data)
    )


async def wav_stream(size: int) -> AsyncIterator[bytes]:
    """Yield `size` bytes in 64 KiB chunks; only the first and last chunks are new objects."""
    header = wav_header(size)
    first = header + BLOCK[len(header) :]
    offset = 0
    while offset < size:
        n = min(CHUNK, size - offset)
        chunk = first if offset == 0 else BLOCK
        yield chunk if n == CHUNK else chunk[:n]
        offset += n


def tenant_numbers(tenant: str) -> list[str]:
    # Derived from the tenant name so numbers are stable across restarts.
    area = zlib.crc32(tenant.encode()) % 900 + 100
    return [f"+1555{area}{n:04d}" for n in range(1, 6)]


def seed(store: Tenants, tenant: str) -> None:
    numbers = tenant_numbers(tenant)
    for i, number in enumerate(numbers):
        kind = "toll_free" if i == 0 else "local"
        store(tenant, "numbers").add(
            {"number": number, "type": kind, "capabilities": ["voice", "sms"]}
        )
    calls = store(tenant, "calls")
    for i in range(300):
        call = {"from": numbers[i % 5], "to": f"+1202555{i:04d}", "state": "ended"}
        calls.add(
            {
                **call,
                "duration_s": 30 + i % 600,
                "created_at": SEED_EPOCH + 60 * i,
                "created_by": "seed",
            }
        )
    for i in range(100):
        sms = {"from": numbers[i % 5], "to": f"+1202555{i:04d}", "text": f"Reminder #{i + 1}"}
        store(tenant, "sms").add({**sms, "status": "delivered", "created_by": "seed"})
    for i in range(20):
        rec = {"call_id": 5001 + i, "content_type": "audio/wav", "size": DEFAULT_RECORDING}
        store(tenant, "recordings").add(rec)


def phone_errors(body: dict[str, object], *fields: str) -> list[str]:
    return [
        f"{name} must be an E.164 number like +15551234567"
        for name in fields
        if name in body and not E164.fullmatch(str(body[name]))
    ]


class VoIP:
    def __init__(self) -> None:
        self.store = Tenants({"numbers": 1, "calls": 5001, "sms": 9001, "recordings": 1})
        for tenant in SEED_TENANTS:
            seed(self.store, tenant)

    def coll(self, request: Request, kind: str) -> Collection:
        return self.store(request.path_params["tenant"], kind)

    def default_from(self, request: Request) -> str:
        numbers = list(self.coll(request, "numbers").items.values())
        return str(numbers[0]["number"]) if numbers else "+15550000000"

    async def list_of(self, request: Request, kind: str) -> Response:
        return paginate(request, self.coll(request, kind).items.values())

    async def get_call(self, request: Request) -> Response:
        call = self.coll(request, "calls").get(request.path_params["call_id"])
        return JSONResponse(call) if call else not_found()

    async def place_call(self, request: Request) -> Response:
        body = await read_object(request)
        errors = check_fields(body, ("to",), ("from",))
        if errors or body is None or (errors := phone_errors(body, "to", "from")):
            return invalid(errors)
        call = {"from": self.default_from(request), **body, "state": "ringing", "duration_s": 0}
        call = self.coll(request, "calls").add(
            {**call, "created_at": int(time.time()), "created_by": subject(request)}
        )
        return created(call, f"{request.url.path}/{call['id']}")

    async def hang_up(self, request: Request) -> Response:
        call = self.coll(request, "calls").get(request.path_params["call_id"])
        if call is None:
            return not_found()
        call["state"] = "ended"  # idempotent: hanging up an ended call is not an error
        return JSONResponse(call)

    async def send_sms(self, request: Request) -> Response:
        body = await read_object(request)
        errors = check_fields(body, ("to", "text"), ("from",))
        if errors or body is None or (errors := phone_errors(body, "to", "from")):
            return invalid(errors)
        if len(body["text"]) > MAX_SMS:
            return invalid([f"text must be at most {MAX_SMS} characters"])
        sms = {
            "from": self.default_from(request),
            **body,
            "status": "queued",
            "created_by": subject(request),
        }
        sms = self.coll(request, "sms").add(sms)
        location = f"{request.url.path}/{sms['id']}"
        return JSONResponse(sms, status_code=202, headers={"location": location})

    async def download(self, request: Request) -> Response:
        # Any recording id streams: the audio is synthesised, so there is nothing to look up.
        try:
            size = int(request.query_params.get("size", str(DEFAULT_RECORDING)))
        except ValueError:
            return invalid(["size must be an integer"])
        if not 0 <= size <= MAX_RECORDING:
            return invalid([f"size must be between 0 and {MAX_RECORDING}"])
        filename = f"recording-{request.path_params['recording_id']}.wav"
        headers = {"content-disposition": f'attachment; filename="{filename}"'}
        if request.query_params.get("chunked") not in ("1", "true", "yes"):
            headers["content-length"] = str(size)
        if request.method == "HEAD":  # headers only; do not generate gigabytes to discard
            return Response(status_code=200, headers=headers, media_type="audio/wav")
        return StreamingResponse(wav_stream(size), headers=headers, media_type="audio/wav")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app() -> Starlette:
    voip = VoIP()
    t = "/voip/v1/{tenant}"
    # partial() of bound async methods: Starlette unwraps partials to detect async endpoints.
    routes = [
        Route("/voip/v1/health", health),
        *(
            Route(f"{t}/{kind}", partial(voip.list_of, kind=kind))
            for kind in ("calls", "sms", "recordings", "numbers")
        ),
        Route(f"{t}/calls", voip.place_call, methods=["POST"]),
        Route(f"{t}/calls/{{call_id:int}}", voip.get_call),
        Route(f"{t}/calls/{{call_id:int}}", voip.hang_up, methods=["DELETE"]),
        Route(f"{t}/sms", voip.send_sms, methods=["POST"]),
        Route(f"{t}/recordings/{{recording_id}}", voip.download),
        Route(f"{t}/upload", upload, methods=["POST"]),
        *echo_routes("voip"),
    ]
    app = Starlette(routes=routes, exception_handlers=dict(EXCEPTION_HANDLERS))
    # An upstream should answer the path it was given, not redirect to a "fixed" one.
    app.router.redirect_slashes = False
    return app
