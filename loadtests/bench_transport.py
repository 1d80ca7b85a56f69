"""Microbenchmark: sequential GETs through gateway.transport vs aiohttp, same run, same upstream.

The upstream is uvicorn (httptools parser) in a child process serving an 11-byte body, so the
client under test has a core to itself on a 2-core machine. Prints one JSON line, e.g.::

    {"requests": 20000, "loop": "uvloop", "transport_us": 55.0, "aiohttp_us": 125.4, ...}

``*_us`` is wall time per request (min over rounds), ``*_cpu_us`` the client process's CPU
time per request, i.e. the client's own overhead without the upstream's share.

Usage: python loadtests/bench_transport.py [--requests N] [--loop asyncio|uvloop] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BODY = b"hello world"


async def hello_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"11")],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(
        hello_app,
        host="127.0.0.1",
        port=port,
        http="httptools",
        loop="auto",
        lifespan="off",
        log_level="warning",
        access_log=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("upstream did not start")


async def bench_transport(url: str, n: int) -> tuple[float, float]:
    from gateway.transport import UpstreamPool

    pool = UpstreamPool(url)
    request = pool.request
    headers = [(b"accept", b"*/*")]

    async def one() -> None:
        resp = await request(b"GET", b"/hello", headers)
        body = b""
        async for chunk in resp.iter_body():
            body += chunk
        await resp.aclose()
        assert body == BODY

    for _ in range(500):  # warm-up: connection, caches
        await one()
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        await one()
    elapsed = time.perf_counter() - started, time.process_time() - cpu
    await pool.aclose()
    return elapsed


async def bench_aiohttp(url: str, n: int) -> tuple[float, float]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        target = url + "/hello"

        async def one() -> None:
            async with session.get(target, headers={"accept": "*/*"}) as resp:
                body = await resp.read()
            assert body == BODY

        for _ in range(500):
            await one()
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            await one()
        return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    port = free_port()
    upstream = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(port)])
    try:
        wait_listening(port)
        url = f"http://127.0.0.1:{port}"
        if args.loop == "uvloop":
            import uvloop

            runner: Any = uvloop.run
        else:
            runner = asyncio.run
        ours: list[tuple[float, float]] = []
        theirs: list[tuple[float, float]] = []
        for _ in range(args.rounds):  # alternate, so drift hits both sides alike
            ours.append(runner(bench_transport(url, args.requests)))
            theirs.append(runner(bench_aiohttp(url, args.requests)))
    finally:
        upstream.terminate()
        upstream.wait(10)
    per = 1e6 / args.requests
    t_us, t_cpu = (min(x[0] for x in ours) * per, min(x[1] for x in ours) * per)
    a_us, a_cpu = (min(x[0] for x in theirs) * per, min(x[1] for x in theirs) * per)
    print(
        json.dumps(
            {
                "requests": args.requests,
                "rounds": args.rounds,
                "loop": args.loop,
                "body_bytes": len(BODY),
                "transport_us": round(t_us, 1),
                "aiohttp_us": round(a_us, 1),
                "transport_rps": round(1e6 / t_us),
                "aiohttp_rps": round(1e6 / a_us),
                # Client-process CPU per request: the client's own cost, minus the upstream.
                "transport_cpu_us": round(t_cpu, 1),
                "aiohttp_cpu_us": round(a_cpu, 1),
                "speedup": round(a_us / t_us, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
