"""Instructions per call of the fair-usage step and the audit record, in process.

    python loadtests/count_instructions.py            # every piece, 200 000 calls each
    python loadtests/count_instructions.py step seal  # some of them
    python loadtests/count_instructions.py --time step  # µs per call instead, in process

Each piece runs twice under ``perf stat -e instructions`` (Linux ``perf``):
with 0 calls and with N calls of the piece on a request as ``bench_proxy.py``
decides it (route ``authed``, plan ``pro``, every limit kind); the difference
over N is its cost per call, setup excluded. Instruction counts barely move
with the machine's load, unlike times on a shared VM, so small changes
(a native twin, a cache) show. They do not see cache misses: a piece that is
cheap in instructions can still be slow on a cold path.

Where the machine has no hardware counters (``perf`` says ``<not
supported>``, as on VMs without a virtual PMU), each run goes under
valgrind's cachegrind instead (``--cache-sim=no``: it only counts
instructions, exactly, at about 30 times slower), with 20 000 calls.

Pieces: ``step`` (the selected fair-usage step + giving back its in-flight
slots), ``step-pure`` (the pure-Python twin), ``charge`` (a bandwidth charge),
``seal`` (the selected audit sealer: record + canonical JSON + SHA-256),
``seal-pure``, ``snapshot`` (the record's facts, on the request's path),
``body`` (the record's JSON the worker writes from them for its writer
process, on the request's path too), ``batch`` (what the worker does instead
of both: the body written straight from the request into its batch frame,
and the frame taken every 256 records), ``offer`` (all the proxy's
per-request audit call does: ``AuditTrail.offer`` into the writer's batch,
a frame taken every 1024 records, nothing sent), and
``loop`` (the empty loop, already subtracted from the others).
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The gateway counted: this checkout, or a snapshot's (bench_proxy.py --gateway-root).
sys.path.insert(0, os.environ.get("FAIRGATE_GATEWAY_ROOT") or str(HERE.parent))
sys.path.insert(0, str(HERE))
PIECES = [
    "loop",
    "step",
    "step-pure",
    "charge",
    "seal",
    "seal-pure",
    "snapshot",
    "body",
    "batch",
    "offer",
]
SECRET = "count-instructions-secret-0123456789abcdef"


def prepare(piece: str) -> Callable[[int], None]:
    """Set a request up as the proxy would; returns: call ``piece`` ``n`` times."""
    os.environ.setdefault("FAIRGATE_JWT_SECRET", SECRET)
    import bench_proxy as bench

    from gateway._records_py import RecordSealer as PureSealer
    from gateway._usage_py import fair_usage as pure_step
    from gateway.asgi import context_from_scope
    from gateway.audit.chain import Chain
    from gateway.audit.sealer import RecordBatch
    from gateway.demokey import mint_token
    from gateway.policy import load_policy_text
    from gateway.proxy import Gateway
    from gateway.recording import RecordSealer, snapshot
    from gateway.usage.step import charge, fair_usage, leave

    policy = load_policy_text(bench.policy_text(9), "<bench policy>")
    gateway = Gateway(policy, audit=False)
    meter = gateway.meter
    token = mint_token(
        sub="alice",
        tenant="acme",
        roles=["agent"],
        plan=bench.PLAN,
        secret=os.environ["FAIRGATE_JWT_SECRET"],
        ttl=86400,
    )
    scope = bench.authed_scope(token)
    req = context_from_scope(scope, policy.request_id_header.encode())
    if asyncio.run(gateway.engine.decide(req)) is not None:
        raise SystemExit("the bench request was refused")
    leave(meter, req.inflight)
    req.status = req.upstream_status = 200
    chain = Chain("bench")
    facts = snapshot(req, policy)
    headers = req.response_headers

    def calls(n: int) -> None:
        if piece in ("step", "step-pure"):
            step = fair_usage if piece == "step" else pure_step
            for _ in range(n):
                headers.clear()
                step(req, policy, meter)
                leave(meter, req.inflight)
        elif piece == "charge":
            for _ in range(n):
                headers.clear()
                req.bytes_out += 100
                charge(meter, req)
        elif piece in ("seal", "seal-pure"):
            seal = (RecordSealer if piece == "seal" else PureSealer)("bench", b"k" * 32).seal
            for _ in range(n):
                headers.clear()
                seal(facts, chain)
        elif piece == "snapshot":
            for _ in range(n):
                headers.clear()
                snapshot(req, policy)
        elif piece == "body":  # what the worker writes for its writer process
            body = RecordSealer("bench", b"k" * 32).body
            for _ in range(n):
                headers.clear()
                body(facts)
        elif piece == "offer":  # the proxy's whole per-request audit call, into the batch
            from gateway.audit.config import AuditConfig
            from gateway.audit.remote import WriterProcess
            from gateway.recording import AuditTrail

            writer = WriterProcess(AuditConfig(instance="bench"), ip_key=b"k" * 32)
            writer._state = "running"  # as started, without a process: nothing is sent
            writer._batch_size = writer._room = 1 << 60
            writer._send_later = asyncio.new_event_loop().call_later(3600, lambda: None)
            offer = AuditTrail(writer).offer
            for i in range(n):
                headers.clear()
                offer(req, policy)
                if i % 1024 == 1023:  # what _send does with a batch, less the socket
                    writer._batch.take()
                    writer._pending = 0
        elif piece == "batch":  # the body straight from the request, into its batch
            batch = RecordBatch(RecordSealer("bench", b"k" * 32))
            add = batch.add
            for _ in range(n):
                headers.clear()
                if add(req, policy) == 256:
                    batch.take()
        else:
            for _ in range(n):
                headers.clear()

    return calls


def run_piece(piece: str, n: int) -> None:
    prepare(piece)(n)


def times(pieces: list[str], n: int = 20_000) -> dict[str, float]:
    """µs per call of each piece, in this process (best of 5), the empty loop subtracted."""
    per_call = {}
    for piece in ["loop", *[p for p in pieces if p != "loop"]]:
        calls = prepare(piece)
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            calls(n)
            best = min(best, time.perf_counter() - start)
        per_call[piece] = best / n * 1e6
    return {p: per_call[p] - (per_call["loop"] if p != "loop" else 0) for p in pieces}


def instructions(piece: str, n: int, counter: str) -> int:
    """User-space instructions of a whole run of ``piece`` ``n`` times."""
    run = [sys.executable, __file__, "--run", piece, str(n)]
    if counter == "valgrind":
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cachegrind.out"
            cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no"]
            done = subprocess.run(
                [*cmd, f"--cachegrind-out-file={out}", *run], capture_output=True, text=True
            )
            if done.returncode != 0 or not out.exists():
                raise SystemExit(f"cachegrind failed: {done.stderr.strip()[-300:]}")
            for line in out.read_text().splitlines():
                if line.startswith("summary:"):
                    return int(line.split()[1])
        raise SystemExit("cachegrind wrote no summary")
    cmd = ["perf", "stat", "-x,", "-e", "instructions:u"]
    done = subprocess.run([*cmd, *run], capture_output=True, text=True)
    for line in done.stderr.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("instructions") and fields[0].isdigit():
            return int(fields[0])
    raise SystemExit(f"perf stat gave no instruction count: {done.stderr.strip()[-300:]}")


def pick_counter() -> str:
    """``perf`` when the CPU's counters are there, else valgrind."""
    if shutil.which("perf") is not None:
        done = subprocess.run(
            ["perf", "stat", "-x,", "-e", "instructions:u", "true"], capture_output=True, text=True
        )
        if any(line.split(",")[0].isdigit() for line in done.stderr.splitlines()):
            return "perf"
    if shutil.which("valgrind") is not None:
        return "valgrind"
    raise SystemExit(
        "count_instructions.py needs Linux perf with hardware counters, or valgrind"
        " (apt-get install valgrind)"
    )


def main() -> int:
    if sys.argv[1:2] == ["--run"]:
        run_piece(sys.argv[2], int(sys.argv[3]))
        return 0
    if sys.argv[1:2] == ["--time"]:
        for piece, us in times(sys.argv[2:] or PIECES).items():
            print(f"{piece:<10} {us:8.3f} us per call")
        return 0
    counter = pick_counter()
    pieces = sys.argv[1:] or PIECES
    n = 200_000 if counter == "perf" else 20_000
    print(f"counting with {counter}, {n} calls per piece", flush=True)
    per_call: dict[str, float] = {}
    for piece in ["loop", *[p for p in pieces if p != "loop"]]:
        per_call[piece] = (instructions(piece, n, counter) - instructions(piece, 0, counter)) / n
    loop = per_call["loop"]
    for piece in pieces:
        extra = per_call[piece] - (loop if piece != "loop" else 0)
        print(f"{piece:<10} {extra / 1000:8.2f} kinstr per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
