"""Instructions the gateway's server process retires per proxied request, under valgrind.

    python loadtests/count_server.py --requests 3000 \\
        f=/tmp/snap:authed h=/tmp/snap:plan i=/tmp/snap:audit

For machines without hardware counters (a VM without a virtual PMU, where
``perf stat`` says ``<not supported>`` and ``bench_ab.py`` can count nothing):
each ``NAME=ROOT:KIND`` (as in ``bench_ab.py``: ``authed``, ``plan``,
``audit``, ``audit-inline``, ``+py`` for the pure twins) is served the way ``bench_proxy.py``
serves it, but under valgrind's cachegrind (``--cache-sim=no``: it counts
every user-space instruction, exactly). A client on loopback sends exactly
``W`` requests, then the server stops (SIGTERM, a graceful shutdown); a second
server sends ``W + N``. The difference over ``N`` is the cost of a warm request,
start-up, warm-up and shutdown cancelled out. Eight keep-alive connections
keep requests overlapping as under wrk.

The counts are exact and repeat to a fraction of a percent, whatever else the
machine runs. Two caveats: valgrind hides some CPU features (SHA extensions,
AVX-512), so OpenSSL's hashing retires more instructions than natively, and
instructions are not time (no cache misses, no system calls). Compare variants
by them; ``--annotate`` prints each variant's top functions (cg_annotate).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TextIO

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_ab import PATH, SECRET, token  # noqa: E402
from bench_proxy import free_port, wait_ready  # noqa: E402

CONNECTIONS = 8


async def _one_connection(port: int, request: bytes, count: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    bad = 0
    try:
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            bad += status != 200
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if b"transfer-encoding: chunked" in head.lower():
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            else:
                await reader.readexactly(length)
    finally:
        writer.close()
    return bad


async def send_requests(port: int, bearer: str, total: int) -> int:
    """``total`` GETs over CONNECTIONS keep-alive connections; returns the non-200 count."""
    request = (
        f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {bearer}\r\n\r\n"
    ).encode()
    shares = [total // CONNECTIONS + (i < total % CONNECTIONS) for i in range(CONNECTIONS)]
    results = await asyncio.gather(*(_one_connection(port, request, n) for n in shares if n))
    return sum(results)


def run_once(
    root: str, kind: str, upstream: int, requests: int, work: Path, label: str
) -> tuple[int, Path]:
    """Serve ``requests`` requests under cachegrind; the server's instruction total."""
    port = free_port()
    serve = "fairgate" if not kind.startswith("audit") else "fairgate_audit"
    if kind.startswith("audit-inline"):
        serve = "fairgate_audit_inline"
    # One hash seed for every server: with random seeds, dict and set layouts
    # differ from process to process, and so do counts by up to ~1 k (set
    # PYTHONHASHSEED to count under another seed).
    seed = os.environ.get("PYTHONHASHSEED", "0")
    env = {**os.environ, "PYTHONPATH": root, "PYTHONHASHSEED": seed}
    if kind.endswith("+py"):
        env["FAIRGATE_NO_EXTENSIONS"] = "1"
    out = work / f"{label}.cachegrind"
    cmd = ["taskset", "-c", "1", "valgrind", "--tool=cachegrind", "--cache-sim=no"]
    cmd += [f"--cachegrind-out-file={out}", sys.executable, str(HERE / "bench_proxy.py")]
    cmd += ["--serve", serve, "--port", str(port), "--upstream", f"http://127.0.0.1:{upstream}"]
    cmd += ["--audit-dir", str(work / label)]
    log_path = work / f"{label}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=log)
        try:
            wait_ready(port, proc, log_path, timeout=300)
            plan = None if kind.startswith("authed") else "pro"
            bad = asyncio.run(send_requests(port, token(root, plan), requests))
            if bad:
                raise SystemExit(f"{label}: {bad} responses were not 200 (see {log_path})")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=300)
    for line in out.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1]), out
    raise SystemExit(f"{label}: cachegrind wrote no summary (see {log_path})")


def count(
    variants: list[tuple[str, str, str]],
    requests: int,
    warmup: int,
    annotate: bool = False,
    log: TextIO = sys.stdout,
) -> dict[str, float]:
    """Instructions per request of each ``(name, root, kind)``, in thousands."""
    if shutil.which("valgrind") is None:
        raise SystemExit("counting under valgrind needs valgrind (apt-get install valgrind)")
    os.environ["FAIRGATE_JWT_SECRET"] = SECRET
    os.environ.setdefault("FAIRGATE_AUDIT_KEY", "bench-ab-audit-key-0123456789abcdef")
    work = Path(tempfile.mkdtemp(prefix="fairgate-count-"))
    up = free_port()
    hello = [sys.executable, str(HERE / "bench_proxy.py"), "--serve", "hello", "--port", str(up)]
    hello_log = work / "hello.log"
    with hello_log.open("wb") as out:
        upstream = subprocess.Popen(["taskset", "-c", "0", *hello], stdout=out, stderr=out)
    counts: dict[str, float] = {}
    try:
        wait_ready(up, upstream, hello_log)
        for name, root, kind in variants:
            base, _ = run_once(root, kind, up, warmup, work, f"{name}-w")
            full, out = run_once(root, kind, up, warmup + requests, work, f"{name}-n")
            counts[name] = (full - base) / requests / 1000
            line = f"{name:<12} {counts[name]:8.1f} kinstr/request  ({root}:{kind})"
            print(line, file=log, flush=True)
            if annotate:
                shown = subprocess.run(
                    ["cg_annotate", "--auto=no", str(out)], capture_output=True, text=True
                ).stdout
                print("\n".join(shown.splitlines()[:60]))
    finally:
        upstream.terminate()
        upstream.wait()
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="N, the measured requests")
    parser.add_argument("--warmup", type=int, default=500, help="W, requests before them")
    parser.add_argument("--annotate", action="store_true", help="top functions of each variant")
    parser.add_argument("variants", nargs="+", metavar="NAME=ROOT:KIND")
    args = parser.parse_args()
    variants = []
    for spec in args.variants:
        name, rest = spec.split("=", 1)
        root, kind = rest.rsplit(":", 1)
        variants.append((name, root, kind))
    count(variants, args.requests, args.warmup, args.annotate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
