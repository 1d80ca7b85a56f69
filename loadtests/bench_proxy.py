"""Proxy throughput benchmark: Fairgate against naive Python proxies, nginx and a ceiling.

    python loadtests/bench_proxy.py [--duration 10] [--connections 64] [--only a,e,f]
                                    [--warmup 2] [--rounds 1] [--skip-half] [--json-only]
                                    [--gateway-root DIR] [--micro-iterations 100000]
                                    [--skip-micro]

Not a pytest test. Needs ``wrk`` (and ``nginx`` for setup d; it is skipped if missing), and
uvicorn, uvloop, httptools, starlette, httpx, aiohttp and pyjwt in the running interpreter.
Run from a source checkout: the servers get the repo root (or ``--gateway-root``) on PYTHONPATH.

Setups, each measured with ``wrk -t1 -c<connections> --latency`` after a warm-up run:

  a  the upstream directly: raw ASGI ``hello world`` (11 bytes) under uvicorn
  b  a naive Starlette + httpx proxy (one shared AsyncClient)
  c  a naive raw-ASGI + aiohttp proxy (one shared ClientSession)
  d  nginx as a reverse proxy (1 worker, keepalive to the upstream)
  e  Fairgate, a public route (no JWT)
  f  Fairgate, an authenticated route (JWT + verified-token cache, RBAC, tenant check);
     the token names no plan, so the fair-usage step has nothing to evaluate
  g  the raw ASGI app on the server core with no upstream: the ceiling for uvicorn here
  h  (f) with a token on plan "pro": every limit kind (rate, quota, concurrency, bandwidth)
     is evaluated on every request, with limits so high that none ever refuses
  i  (h) plus the audit trail: a file sink in the run's temporary directory, the writer
     started by the ASGI lifespan. Afterwards the records written are counted against the
     requests wrk reported (no loss).

(e), (f) and (h) are one Fairgate process (the same policy; only the request differs), so
(h) - (f) is the fair-usage step and (f) - (e) the identity steps. (i) is a second process.

Before the servers start, the fair-usage step (and the audit record) are also timed
in-process, on the server core: ``Engine.decide`` on a context built by
``gateway.asgi.context_from_scope`` with and without the plan, and ``fair_usage`` alone on
contexts that ``decide`` filled in.

Pinning (2 cores): wrk and the upstream share core 0 (``taskset -c 0``); the server under
test runs alone on core 1. So (a) is the upstream's capacity *while sharing its core with
wrk*, which caps every proxy's rate; (g) is the same app on core 1.

For Fairgate, latency is also measured at about half its peak rate. With ``wrk2`` on PATH
that is an open-loop ``wrk2 -R``; otherwise wrk connections pause a random (exponential) time
in a Lua ``delay()`` between requests (still a closed loop: no coordinated-omission
correction), and a ``-c4`` run is reported too. The ceiling app (g) gets the same paced load as
a control: its tail is what the machine alone adds.

The machine is assumed shared and noisy. Each run also records the server's CPU (% of a core,
and us per request: steadier than req/s under contention) and its run-queue wait (time it was
runnable while another task had its core: a few % or more means a disturbed run). With
``--rounds N`` the setups are measured N times, interleaved, and the best run of each is kept.
The last line printed is a JSON summary of every figure and ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SETUPS: dict[str, tuple[str, str]] = {
    "a": ("upstream", "upstream direct (core 0, with wrk)"),
    "b": ("httpx", "naive Starlette + httpx proxy"),
    "c": ("aiohttp", "naive raw ASGI + aiohttp proxy"),
    "d": ("nginx", "nginx reverse proxy, 1 worker"),
    "e": ("fairgate_public", "fairgate, public route"),
    "f": ("fairgate_authed", "fairgate, authenticated route"),
    "g": ("ceiling", "uvicorn raw ASGI, no upstream"),
    "h": ("fairgate_plan", "fairgate, authed + plan (fair usage)"),
    "i": ("fairgate_audit", "fairgate, authed + plan + audit"),
}
FAIRGATE_SETUPS = "efh"  # one Fairgate process serves these; (i) gets its own
AUTHED_PATH = "/t/acme/items/42"
PUBLIC_PATH = "/public"
POOL_SIZE = 256  # idle upstream connections every proxy may keep
SECRET_ENV = "FAIRGATE_JWT_SECRET"
TARGET_VS_AIOHTTP = 1.2
TARGET_VS_HTTPX = 10.0
TARGET_HALF_P99_MS = 2.0
TARGET_FAIR_USAGE_US = 3.0  # issue 4: the whole fair-usage step, per request
TARGET_AUDIT_RATIO = 0.95  # issue 5: the audit trail costs at most 5 % of throughput
TARGET_TOKEN_CACHE_US = 2.0  # issue 3: a verified-token cache hit (loadtests/bench_auth.py)
AUDIT_KEY_ENV = "FAIRGATE_AUDIT_KEY"
PLAN = "pro"
PACE_CYCLE_MS = 10.0  # paced runs: each connection sends one request per this period

POLICY = """\
version: 1
upstreams:
  up: {{url: "http://127.0.0.1:{port}", max_idle: {pool}}}
auth:
  issuers:
    - {{issuer: https://id.fairgate.example, audiences: [crm-voip-api], algorithms: [HS256],
       secret_env: {secret_env}}}
roles:
  agent: [bench.read]
plans:
  # Every limit kind, set so high that none ever refuses: all are evaluated on every request.
  {plan}: {{rate: 1000000/second, burst: 1000000, quotas: [1000000000/day], concurrent: 100000,
         bandwidth: 1000TB/hour}}
routes:
  - {{id: public, methods: [GET], path: {public}, upstream: up, public: true}}
  - {{id: authed, methods: [GET], path: "/t/{{tenant}}/items/{{item_id}}", upstream: up,
     permission: bench.read}}
"""
AUDIT_POLICY = """audit:
  sinks: ["file://{directory}"]
  ip_key_env: {key_env}
  writer: {writer}
"""
AUDIT_EXTRA_ENV = "FAIRGATE_BENCH_AUDIT_SETTINGS"
# Server kinds with the audit trail, and where each seals and writes records.
AUDIT_WRITERS = {"fairgate_audit": "process", "fairgate_audit_inline": "inline"}


def policy_text(port: int, audit_dir: str = "", writer: str = "process") -> str:
    text = POLICY.format(
        port=port, pool=POOL_SIZE, secret_env=SECRET_ENV, public=PUBLIC_PATH, plan=PLAN
    )
    if audit_dir:
        text += AUDIT_POLICY.format(directory=audit_dir, key_env=AUDIT_KEY_ENV, writer=writer)
        # More audit settings, one "key: value" a line (bench_race.py --audit-setting).
        for line in os.environ.get(AUDIT_EXTRA_ENV, "").splitlines():
            if line.strip():
                text += f"  {line.strip()}\n"
    return text


# -- the servers (child processes) --------------------------------------------------------------


def build_app(kind: str, upstream: str, audit_dir: str = "") -> Any:
    sys.path.insert(0, str(HERE))
    import _naive_proxies as naive

    if kind == "hello":
        return naive.hello_app()
    if kind == "httpx":
        return naive.httpx_proxy(upstream, POOL_SIZE)
    if kind == "aiohttp":
        return naive.aiohttp_proxy(upstream, POOL_SIZE)
    if kind == "fairgate" or kind in AUDIT_WRITERS:
        from gateway.policy import load_policy_text
        from gateway.proxy import Gateway

        port = int(upstream.rsplit(":", 1)[1])
        writer = AUDIT_WRITERS.get(kind, "process")
        text = policy_text(port, audit_dir if kind in AUDIT_WRITERS else "", writer)
        return Gateway(load_policy_text(text, "<bench policy>"))
    raise SystemExit(f"unknown server kind {kind!r}")


def serve(kind: str, port: int, upstream: str, audit_dir: str = "") -> None:
    app = build_app(kind, upstream, audit_dir)
    fairgate = kind == "fairgate" or kind in AUDIT_WRITERS
    if fairgate:
        try:
            from gateway.serve import run, serve_all, server
        except ImportError:
            pass
        else:
            # What `fairgate run` ships: its own uvicorn protocol and settings, on uvloop.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(4096)
            print("fairgate: gateway.serve.server()", file=sys.stderr, flush=True)
            # gateway.serve.run freezes the start-up objects out of the GC, as in production.
            run(serve_all([(server(app), sock)]))
            return
    import uvicorn

    if fairgate:
        # What gateway.serve.run does in production: keep the collector off start-up objects.
        gc.collect()
        gc.freeze()

    # proxy_headers=False everywhere, as `fairgate run` does: uvicorn's X-Forwarded-For
    # middleware would otherwise wrap every app here for nothing.
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        log_level="warning",
        lifespan="on",
        backlog=4096,
    )
    uvicorn.Server(config).run()


# -- in-process timings (a child process on the server core) -------------------------------------


def authed_scope(token: str) -> dict[str, Any]:
    """The ASGI scope of the (f)/(h) request, as uvicorn and gateway.serve make it."""
    from gateway.asgi import RAW_TARGET

    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 40000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": AUTHED_PATH,
        "raw_path": AUTHED_PATH.encode(),
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8080"), (b"authorization", b"Bearer " + token.encode())],
        "extensions": {RAW_TARGET: AUTHED_PATH.encode()},
    }


def micro(iterations: int, repeats: int = 5) -> dict[str, Any]:
    """µs per call of the fair-usage step and of the audit record, in this process.

    Contexts are built the way the proxy builds them (``context_from_scope`` on a scope like
    uvicorn's), for the same request as (f) and (h). Each figure is the best of ``repeats``
    runs of ``iterations`` calls, the variants interleaved. The in-flight slots that fair
    usage takes are given back inside the timed loop, as the proxy does after each response.
    """
    from gateway._records_py import RecordSealer as PureSealer
    from gateway._usage_py import fair_usage as pure_fair_usage
    from gateway.asgi import context_from_scope
    from gateway.audit.chain import Chain
    from gateway.demokey import mint_token
    from gateway.policy import load_policy_text
    from gateway.proxy import Gateway
    from gateway.recording import SEALER_IMPLEMENTATION, RecordSealer, snapshot
    from gateway.usage.step import IMPLEMENTATION, fair_usage

    secret = os.environ[SECRET_ENV]
    policy = load_policy_text(policy_text(9), "<bench policy>")
    gateway = Gateway(policy, audit=False)
    engine, meter = gateway.engine, gateway.meter
    rid = policy.request_id_header.encode()

    def scope(plan: str | None) -> dict[str, Any]:
        token = mint_token(
            sub="alice", tenant="acme", roles=["agent"], plan=plan, secret=secret, ttl=86400
        )
        return authed_scope(token)

    scopes = {"noplan": scope(None), "plan": scope(PLAN)}
    loop = asyncio.new_event_loop()
    decide = engine.decide

    async def decided(sc: dict[str, Any]) -> Any:
        req = context_from_scope(sc, rid)
        if (refused := await decide(req)) is not None:
            raise RuntimeError(f"micro: the bench request was refused: {refused}")
        meter.leave(req.inflight)
        return req

    async def time_decide(sc: dict[str, Any]) -> float:
        start = time.perf_counter()
        for _ in range(iterations):
            req = context_from_scope(sc, rid)
            await decide(req)
            if req.inflight:
                meter.leave(req.inflight)
        return (time.perf_counter() - start) / iterations * 1e6

    batches = {
        name: [loop.run_until_complete(decided(sc)) for _ in range(1000)]
        for name, sc in scopes.items()
    }
    assert batches["plan"][0].identity.plan == PLAN, "the plan token was not read as on a plan"
    assert batches["noplan"][0].identity.plan is None

    def time_fair_usage(batch: list[Any], step: Any = fair_usage) -> float:
        elapsed = 0.0
        done = 0
        while done < iterations:
            for req in batch:  # untimed: as decide left them, minus the step's own output
                req.response_headers.clear()
                req.inflight = ()
            start = time.perf_counter()
            for req in batch:
                step(req, policy, meter)
                if req.inflight:
                    meter.leave(req.inflight)
            elapsed += time.perf_counter() - start
            done += len(batch)
        return elapsed / done * 1e6

    add = meter.bandwidth.add
    window = policy.plans[PLAN].rules.bandwidth.window  # type: ignore[union-attr]

    def time_bandwidth() -> float:
        start = time.perf_counter()
        for _ in range(iterations):
            add("alice", window, 11)
        return (time.perf_counter() - start) / iterations * 1e6

    record_req = batches["plan"][0]
    record_req.status = record_req.upstream_status = 200
    record_req.bytes_out = 11
    chain = Chain("bench")
    ip_key = b"k" * 32

    def time_audit(sealer: Any) -> float:
        # What the proxy pays per record: the snapshot on the request's path,
        # then (in the writer, a batch at a time) the record and its seal.
        seal = sealer.seal
        start = time.perf_counter()
        for _ in range(iterations):
            seal(snapshot(record_req, policy), chain)
        return (time.perf_counter() - start) / iterations * 1e6

    def time_snapshot() -> float:
        start = time.perf_counter()
        for _ in range(iterations):
            snapshot(record_req, policy)
        return (time.perf_counter() - start) / iterations * 1e6

    gc.collect()
    gc.freeze()
    best: dict[str, float] = {}

    def keep(name: str, value: float) -> None:
        best[name] = min(best.get(name, math.inf), value)

    for _ in range(repeats):
        for name, sc in scopes.items():
            keep(f"decide_{name}_us", loop.run_until_complete(time_decide(sc)))
            keep(f"fair_usage_{name}_us", time_fair_usage(batches[name]))
        keep("fair_usage_plan_pure_us", time_fair_usage(batches["plan"], pure_fair_usage))
        keep("bandwidth_add_us", time_bandwidth())
        keep("audit_build_and_seal_us", time_audit(RecordSealer("bench", ip_key)))
        keep("audit_build_and_seal_pure_us", time_audit(PureSealer("bench", ip_key)))
        keep("audit_snapshot_us", time_snapshot())
    loop.close()
    out: dict[str, Any] = {k: round(v, 3) for k, v in best.items()}
    out["decide_plan_minus_noplan_us"] = round(best["decide_plan_us"] - best["decide_noplan_us"], 3)
    # The whole step as the proxy pays it: the step itself, plus charging the request's bytes
    # to the bandwidth window once (a small exchange is charged once, when it ends).
    step = best["fair_usage_plan_us"] + best["bandwidth_add_us"]
    out["fair_usage_step_us"] = round(step, 3)
    out["fair_usage_implementation"] = IMPLEMENTATION  # "c" (gateway._usage_c) or "py"
    out["audit_sealer_implementation"] = SEALER_IMPLEMENTATION  # "c" (gateway._records_c)
    out["iterations"] = iterations
    out["repeats"] = repeats
    return out


# -- process management ---------------------------------------------------------------------------


class Processes:
    """Every child we start, each in its own session so a whole group can be signalled."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )
        self.procs.append((proc, log))
        return proc, log

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5) -> None:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        self.procs = [(p, log) for p, log in self.procs if p is not proc]

    def stop_all(self) -> None:
        for proc, _ in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception as exc:  # keep going: every child must be reaped
                print(f"could not stop pid {proc.pid}: {exc}", file=sys.stderr)


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def perf_start(pid: int) -> subprocess.Popen[str] | None:
    """Count the instructions and cycles of ``pid`` (all its threads) until perf_stop."""
    if shutil.which("perf") is None:
        return None
    return subprocess.Popen(
        ["perf", "stat", "-x,", "-e", "instructions,cycles", "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def perf_stop(proc: subprocess.Popen[str] | None) -> dict[str, int]:
    if proc is None:
        return {}
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {}
    counts: dict[str, int] = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit():  # "<not counted>" or "<not supported>": none
            counts[fields[2].split(":")[0]] = int(fields[0])
    return counts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    """Poll the port until it accepts a connection; fail fast if the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server on :{port} exited ({proc.returncode}):\n"
                + log.read_text(errors="replace")[-2000:]
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.25):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"server on :{port} not ready after {timeout}s") from None
            time.sleep(0.02)


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_head_fields(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    """A GET's status and response headers (names lower-cased)."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}


def count_audit_records(directory: Path) -> dict[str, int]:
    """Request records and checkpoints in every ``*.jsonl`` file under ``directory``."""
    records = checkpoints = final = files = 0
    for path in directory.rglob("*.jsonl"):
        files += 1
        with path.open("rb") as handle:
            for line in handle:
                if not line.strip():
                    continue
                if b'"type":"checkpoint"' in line:
                    checkpoints += 1
                    final += b'"final":true' in line
                else:
                    records += 1
    return {"records": records, "checkpoints": checkpoints, "final": final, "files": files}


def check(url: str, headers: dict[str, str]) -> None:
    """One request before measuring: a setup that doesn't answer 200 hello is broken."""
    status, body = http_get(url, headers)
    if status != 200 or body != b"hello world":
        raise RuntimeError(f"sanity check of {url} failed: {status} {body[:200]!r}")


# -- wrk ------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float | None
    requests: int
    non2xx: int
    socket_errors: int
    connections: int
    duration_s: float
    mode: str = "closed-loop"
    # CPU the server under test (its whole process group) used during the measured run.
    server_cpu_pct: float | None = None  # of one core; ~100 means it had the core to itself
    server_cpu_us_per_req: float | None = None  # less sensitive to a noisy machine than rps
    # Time the server (and the upstream) sat runnable while something else had its core:
    # more than a few % means other load on the machine disturbed the run.
    server_wait_pct: float | None = None
    upstream_wait_pct: float | None = None
    # Instructions and cycles the server process retired per request (``perf stat``, when
    # available): instructions barely move with the machine's load, so small differences
    # between setups show where CPU time per request is too noisy to.
    server_kinstr_per_req: float | None = None
    server_kcycles_per_req: float | None = None
    # (i): the part of server_cpu_us_per_req spent in its audit writer process.
    writer_cpu_us_per_req: float | None = None
    notes: list[str] = field(default_factory=list)


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_PCT = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_DONE = """
function done(summary, latency, requests)
  io.write(string.format("BENCH_P999_US %d\\n", latency:percentile(99.9)))
end
"""


def parse_wrk(output: str, connections: int, duration: float) -> WrkResult:
    pct = {}
    for name, value, unit in _PCT.findall(output):
        pct[float(name)] = float(value) * _UNITS_MS[unit]
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    count = re.search(r"(\d+) requests in", output)
    if not rps or not count or 50.0 not in pct or 99.0 not in pct:
        raise RuntimeError(f"could not parse wrk output:\n{output}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    p999 = re.search(r"BENCH_P999_US (\d+)", output)
    return WrkResult(
        rps=round(float(rps.group(1)), 1),
        p50_ms=round(pct[50.0], 3),
        p75_ms=round(pct.get(75.0, math.nan), 3),
        p90_ms=round(pct.get(90.0, math.nan), 3),
        p99_ms=round(pct[99.0], 3),
        p999_ms=(
            round(int(p999.group(1)) / 1000, 3)
            if p999
            else (round(pct[99.9], 3) if 99.9 in pct else None)
        ),
        requests=int(count.group(1)),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        connections=connections,
        duration_s=duration,
    )


class Wrk:
    def __init__(self, pin: list[str], workdir: Path) -> None:
        self.pin = pin
        self.workdir = workdir
        self.wrk2 = shutil.which("wrk2")

    def _script(self, name: str, body: str) -> Path:
        path = self.workdir / f"{name}.lua"
        path.write_text(body + _DONE)
        return path

    def run(
        self,
        url: str,
        *,
        duration: int,
        connections: int,
        headers: dict[str, str],
        script: Path | None = None,
        rate: float | None = None,
    ) -> WrkResult:
        binary = "wrk2" if rate is not None else "wrk"
        cmd = [*self.pin, binary, "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
        if rate is not None:
            cmd.append(f"-R{int(rate)}")
        for name, value in headers.items():
            cmd += ["-H", f"{name}: {value}"]
        cmd += ["-s", str(script or self._script("plain", ""))]
        cmd.append(url)
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=duration + 60, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
        result = parse_wrk(done.stdout, connections, duration)
        if result.non2xx or result.socket_errors:
            result.notes.append(f"{result.non2xx} non-2xx, {result.socket_errors} socket errors")
        return result

    def pace(self, rate: float, latency_ms: float) -> tuple[int, Path | None, float | None, str]:
        """How to offer about ``rate`` requests/s: (connections, script, wrk2 rate, mode).

        With wrk2, an open loop at ``-R rate``. Otherwise each of N wrk connections sends a
        request, waits for its response, then pauses in Lua ``delay()`` for a random,
        exponentially distributed time, so that a cycle averages PACE_CYCLE_MS and the N
        connections together arrive roughly as a Poisson stream at ``rate``. It is still a
        closed loop: a stall delays the requests behind it instead of queueing them, so the
        tail latency is understated (no coordinated-omission correction).
        """
        if self.wrk2:
            return max(4, min(256, math.ceil(rate / 500))), None, rate, f"wrk2 -R{int(rate)}"
        connections = max(1, round(rate * PACE_CYCLE_MS / 1000))
        mean = max(0.0, connections * 1000 / rate - latency_ms)
        script = self._script(
            "paced",
            (
                f"local mean = {mean:.4f}\n"
                "math.randomseed(os.time())\n"
                "function delay()\n"
                "  local d = -mean * math.log(1 - math.random())\n"
                "  local whole = math.floor(d)\n"  # wrk takes whole milliseconds: dither
                "  if math.random() < d - whole then return whole + 1 end\n"
                "  return whole\n"
                "end\n"
            ),
        )
        return connections, script, None, f"wrk + Lua exponential delay(), mean {mean:.2f} ms"


# -- CPU accounting -------------------------------------------------------------------------------


def session_sched(sid: int) -> tuple[float, float]:
    """(CPU seconds, run-queue wait seconds) of every thread in session ``sid``.

    A server's session is its process group (nginx: master + worker). The wait is time the
    threads were runnable but another task had the core: on a shared machine, the noise.
    """
    cpu = wait = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
            if int(stat[stat.rindex(b")") + 2 :].split()[3]) != sid:  # field 6: session
                continue
            for task in os.scandir(Path(entry.path, "task")):
                run, queued, _ = Path(task.path, "schedstat").read_text().split()
                cpu += int(run)
                wait += int(queued)
        except (OSError, ValueError):
            continue
    return cpu / 1e9, wait / 1e9


def writer_pids(server_pid: int) -> list[int]:
    """The audit writer processes (``gateway.audit.sidecar``) that ``server_pid`` started."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
            if int(stat[stat.rindex(b")") + 2 :].split()[1]) != server_pid:  # field 4: ppid
                continue
            if b"gateway.audit.sidecar" in Path(entry.path, "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return pids


def process_cpu(pids: list[int]) -> float:
    """CPU seconds of every thread of ``pids``."""
    cpu = 0
    for pid in pids:
        try:
            for task in os.scandir(f"/proc/{pid}/task"):
                cpu += int(Path(task.path, "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue
    return cpu / 1e9


def machine_busy_pct(seconds: float = 1.0) -> float:
    """How busy all cores are, before we start anything: other people's load."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values[:8]) - idle, idle

    busy0, idle0 = sample()
    time.sleep(seconds)
    busy1, idle1 = sample()
    total = (busy1 - busy0) + (idle1 - idle0)
    return round(100 * (busy1 - busy0) / total, 1) if total else 0.0


# -- the benchmark --------------------------------------------------------------------------------


@dataclass
class Config:
    duration: int
    warmup: int
    connections: int
    rounds: int
    only: list[str]
    half: bool
    pin: bool
    client_cpu: int
    server_cpu: int
    json_only: bool
    gateway_root: Path
    micro_iterations: int = 100_000
    writer_cpu: int | None = None  # (i)'s audit writer process: None leaves it on the server's
    audit_writer: str = "process"  # (i)'s policy: audit.writer


def log(cfg: Config, message: str) -> None:
    print(message, file=sys.stderr if cfg.json_only else sys.stdout, flush=True)


class Bench:
    def __init__(self, cfg: Config, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.procs = Processes(workdir)
        can_pin = cfg.pin and shutil.which("taskset") is not None
        self.client_pin = ["taskset", "-c", str(cfg.client_cpu)] if can_pin else []
        self.server_pin = ["taskset", "-c", str(cfg.server_cpu)] if can_pin else []
        self.wrk = Wrk(self.client_pin, workdir)
        self.secret = secrets.token_urlsafe(40)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(cfg.gateway_root), os.environ.get("PYTHONPATH", "")) if p
        )
        self.env[SECRET_ENV] = self.secret
        self.env[AUDIT_KEY_ENV] = secrets.token_urlsafe(32)  # 43 characters
        self.audit_dir = workdir / "audit"
        self.runs: dict[str, list[WrkResult]] = {}
        self.results: dict[str, WrkResult] = {}  # the best run (by req/s) of each setup
        self.half: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        self.background_busy: float | None = None
        self.fairgate_server: list[str] = []
        self.upstream: Server | None = None
        self.half_control: dict[str, Any] | None = None
        self.sent: dict[str, int] = {}  # responses wrk reported per server, warm-ups included
        self.micro: dict[str, Any] | None = None
        self.audit_check: dict[str, Any] | None = None
        self.bearer: dict[str, dict[str, str]] = {}

    def token(self, plan: str | None = None) -> str:
        sys.path.insert(0, str(self.cfg.gateway_root))
        from gateway.demokey import mint_token

        return mint_token(
            sub="alice",
            tenant="acme",
            roles=["agent"],
            plan=plan,
            secret=self.secret,
            ttl=24 * 3600,
        )

    def python_server(
        self, name: str, kind: str, pin: list[str], upstream: str = "", audit_dir: str = ""
    ) -> Server:
        port = free_port()
        cmd = [
            *pin,
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve",
            kind,
            "--port",
            str(port),
            "--upstream",
            upstream,
        ]
        if audit_dir:
            cmd += ["--audit-dir", audit_dir]
        proc, logfile = self.procs.start(name, cmd, self.env)
        wait_ready(port, proc, logfile)
        return Server(name, port, proc, logfile)

    def nginx(self, upstream_port: int) -> Server | None:
        binary = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)),
            None,
        )
        if binary is None:
            return None
        port = free_port()
        prefix = self.workdir / "nginx"
        prefix.mkdir(exist_ok=True)
        temp = "\n".join(
            f"  {kind}_temp_path {prefix}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = prefix / "nginx.conf"
        conf.write_text(f"""\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temp}
  upstream up {{
    server 127.0.0.1:{upstream_port};
    keepalive {POOL_SIZE};
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")
        cmd = [
            *self.server_pin,
            binary,
            "-p",
            str(prefix),
            "-c",
            str(conf),
            "-e",
            str(prefix / "error.log"),
        ]
        proc, logfile = self.procs.start("nginx", cmd)
        wait_ready(port, proc, logfile)
        return Server("nginx", port, proc, logfile)

    def run_wrk(
        self,
        server: Server,
        path: str,
        headers: dict[str, str],
        *,
        connections: int | None = None,
        script: Path | None = None,
        rate: float | None = None,
    ) -> WrkResult:
        """A warm-up run, then the measured one, with the server's CPU use around it."""
        cfg = self.cfg
        url = f"http://127.0.0.1:{server.port}{path}"
        conns = connections or cfg.connections
        if cfg.warmup > 0:
            warm = self.wrk.run(
                url,
                duration=cfg.warmup,
                connections=conns,
                headers=headers,
                script=script,
                rate=rate,
            )
            self.sent[server.name] = self.sent.get(server.name, 0) + warm.requests
        up = self.upstream if self.upstream is not None and self.upstream is not server else None
        cpu0, wait0 = session_sched(server.proc.pid)
        writers = writer_pids(server.proc.pid)
        writer0 = process_cpu(writers)
        up_wait0 = session_sched(up.proc.pid)[1] if up else 0.0
        counter = perf_start(server.proc.pid)
        t0 = time.monotonic()
        result = self.wrk.run(
            url, duration=cfg.duration, connections=conns, headers=headers, script=script, rate=rate
        )
        elapsed = time.monotonic() - t0
        counts = perf_stop(counter)
        self.sent[server.name] = self.sent.get(server.name, 0) + result.requests
        cpu1, wait1 = session_sched(server.proc.pid)
        writer_cpu = process_cpu(writers) - writer0
        cpu = cpu1 - cpu0
        result.server_cpu_pct = round(100 * cpu / elapsed, 1)
        result.server_wait_pct = round(100 * (wait1 - wait0) / elapsed, 1)
        if up:
            result.upstream_wait_pct = round(
                100 * (session_sched(up.proc.pid)[1] - up_wait0) / elapsed, 1
            )
        if result.requests:
            result.server_cpu_us_per_req = round(cpu / result.requests * 1e6, 1)
            if writers:
                result.writer_cpu_us_per_req = round(writer_cpu / result.requests * 1e6, 1)
            if "instructions" in counts:
                result.server_kinstr_per_req = round(
                    counts["instructions"] / result.requests / 1e3, 1
                )
            if "cycles" in counts:
                result.server_kcycles_per_req = round(counts["cycles"] / result.requests / 1e3, 1)
        return result

    def measure(self, letter: str, server: Server, path: str, headers: dict[str, str]) -> WrkResult:
        cfg = self.cfg
        log(cfg, f"  ({letter}) {SETUPS[letter][1]}")
        result = self.run_wrk(server, path, headers)
        self.runs.setdefault(letter, []).append(result)
        log(
            cfg,
            f"      {result.rps:>10.0f} req/s  p50 {result.p50_ms:.3f} ms  "
            f"p99 {result.p99_ms:.3f} ms  server CPU {result.server_cpu_pct}% "
            f"({result.server_cpu_us_per_req} us/req, {result.server_kinstr_per_req} kinstr/req, "
            f"waited {result.server_wait_pct}%)"
            + (
                f"  [of which the audit writer process {result.writer_cpu_us_per_req} us/req]"
                if result.writer_cpu_us_per_req is not None
                else ""
            )
            + "".join(f"  [{n}]" for n in result.notes),
        )
        return result

    def half_peak(
        self, letter: str, server: Server, path: str, headers: dict[str, str]
    ) -> tuple[int, Path | None, float | None, str]:
        cfg = self.cfg
        peak = self.results[letter].rps
        rate = peak / 2
        out: dict[str, Any] = {"peak_rps": peak, "target_rps": round(rate, 1)}
        low = self.run_wrk(server, path, headers, connections=4)
        low.mode = "closed-loop -c4"
        out["c4"] = asdict(low)
        log(
            cfg,
            f"      -c4: {low.rps:.0f} req/s ({low.rps / peak:.0%} of peak)  "
            f"p50 {low.p50_ms:.3f} ms  p99 {low.p99_ms:.3f} ms",
        )
        connections, script, wrk2_rate, mode = self.wrk.pace(rate, low.p50_ms)
        paced = self.run_wrk(
            server, path, headers, connections=connections, script=script, rate=wrk2_rate
        )
        paced.mode = mode
        out["paced"] = asdict(paced)
        log(
            cfg,
            f"      paced at ~{rate:.0f}/s: {paced.rps:.0f} req/s "
            f"({paced.rps / peak:.0%} of peak)  p50 {paced.p50_ms:.3f} ms  "
            f"p99 {paced.p99_ms:.3f} ms  ({mode}, c={connections})",
        )
        self.half[letter] = out
        return connections, script, wrk2_rate, mode

    def start_servers(self) -> dict[str, tuple[Server, str]]:
        """Every server the selected setups need, checked with one request each."""
        only = self.cfg.only
        plan: dict[str, tuple[Server, str]] = {}
        upstream = ""
        if any(x in only for x in "abcdefhi"):
            up = self.upstream = self.python_server("upstream", "hello", self.client_pin)
            upstream = f"http://127.0.0.1:{up.port}"
            plan["a"] = (up, AUTHED_PATH)
        for letter, kind in (("b", "httpx"), ("c", "aiohttp")):
            if letter in only:
                plan[letter] = (
                    self.python_server(kind, kind, self.server_pin, upstream),
                    AUTHED_PATH,
                )
        if "d" in only:
            assert self.upstream is not None
            nginx = self.nginx(self.upstream.port)
            if nginx is None:
                self.skipped["d"] = "nginx not installed"
                log(self.cfg, "(d) skipped: nginx not installed")
            else:
                plan["d"] = (nginx, AUTHED_PATH)
        if any(x in only for x in FAIRGATE_SETUPS):
            srv = self.python_server("fairgate", "fairgate", self.server_pin, upstream)
            self.expect_401(srv)
            self.fairgate_server = srv.log_text().strip().splitlines()[:1]
            plan["e"] = (srv, PUBLIC_PATH)
            plan["f"] = (srv, AUTHED_PATH)
            plan["h"] = (srv, AUTHED_PATH)
        if "g" in only:
            plan["g"] = (self.python_server("ceiling", "hello", self.server_pin), AUTHED_PATH)
        if "i" in only:
            self.audit_dir.mkdir(exist_ok=True)
            srv = self.python_server(
                "fairgate-audit",
                "fairgate_audit_inline" if self.cfg.audit_writer == "inline" else "fairgate_audit",
                self.server_pin,
                upstream,
                audit_dir=str(self.audit_dir),
            )
            self.expect_401(srv)
            if self.cfg.writer_cpu is not None:
                # The writer process inherits the server's core; give it another one.
                # Every thread: affinity is a thread's, and the sink's file
                # thread already runs.
                for pid in writer_pids(srv.proc.pid):
                    for task in os.listdir(f"/proc/{pid}/task"):
                        os.sched_setaffinity(int(task), {self.cfg.writer_cpu})
            plan["i"] = (srv, AUTHED_PATH)
        plan = {k: v for k, v in plan.items() if k in only}
        for letter, (srv, path) in plan.items():
            check(f"http://127.0.0.1:{srv.port}{path}", self.headers(letter))
            if letter in "hi":
                # The plan must really be in force: its RateLimit headers prove it.
                status, headers = http_head_fields(
                    f"http://127.0.0.1:{srv.port}{path}", self.headers(letter)
                )
                if status != 200 or "ratelimit" not in headers:
                    raise RuntimeError(f"({letter}): no RateLimit header, is plan {PLAN} on?")
        return plan

    @staticmethod
    def expect_401(srv: Server) -> None:
        status, _ = http_get(f"http://127.0.0.1:{srv.port}{AUTHED_PATH}")
        if status != 401:
            raise RuntimeError(f"fairgate answered {status} without a token, not 401")

    def headers(self, letter: str) -> dict[str, str]:
        # Every setup gets the same request as (f), except (e) (no token) and (h), (i) (the
        # same token with a plan claim): same bytes on the wire, give or take the claim.
        if letter == "e":
            return {}
        return self.bearer["plan" if letter in "hi" else "noplan"]

    def run(self) -> None:
        cfg = self.cfg
        self.bearer = {
            "noplan": {"Authorization": f"Bearer {self.token()}"},
            "plan": {"Authorization": f"Bearer {self.token(PLAN)}"},
        }
        authed = self.bearer["noplan"]
        self.background_busy = machine_busy_pct()
        log(
            cfg,
            f"wrk -t1 -c{cfg.connections} -d{cfg.duration:g}s (warm-up {cfg.warmup:g}s), "
            f"{cfg.rounds} round(s); pinning: wrk+upstream "
            f"{' '.join(self.client_pin) or 'unpinned'}, server "
            f"{' '.join(self.server_pin) or 'unpinned'}; machine busy before start: "
            f"{self.background_busy}%",
        )
        if cfg.micro_iterations > 0 and any(x in cfg.only for x in "fhi"):
            self.run_micro()
        plan = self.start_servers()
        # All servers stay up (idle ones cost nothing); rounds interleave the setups so that
        # a burst of other load on the machine hits one run of each, not every run of one.
        for round_ in range(cfg.rounds):
            if cfg.rounds > 1:
                log(cfg, f"round {round_ + 1}/{cfg.rounds}")
            for letter, (srv, path) in plan.items():
                self.measure(letter, srv, path, self.headers(letter))
        for letter, runs in self.runs.items():
            self.results[letter] = max(runs, key=lambda r: r.rps)
        if cfg.half and ("e" in plan or "f" in plan):
            pacing = None
            for letter in ("e", "f"):
                if letter in plan:
                    log(cfg, f"  ({letter}) {SETUPS[letter][1]}, at about half its peak")
                    srv, path = plan[letter]
                    pacing = self.half_peak(letter, srv, path, self.headers(letter))
            # The control: the no-upstream ceiling app, offered the same paced load. Its tail
            # is the floor this machine (its other load, its scheduler) puts under any server.
            assert pacing is not None
            connections, script, wrk2_rate, mode = pacing
            if "g" in plan:
                ceiling = plan["g"][0]
            else:
                ceiling = self.python_server("ceiling", "hello", self.server_pin)
            log(cfg, "  (g) control: the ceiling app under the same paced load")
            control = self.run_wrk(
                ceiling,
                AUTHED_PATH,
                authed,
                connections=connections,
                script=script,
                rate=wrk2_rate,
            )
            control.mode = mode
            self.half_control = asdict(control)
            log(
                cfg,
                f"      {control.rps:.0f} req/s  p50 {control.p50_ms:.3f} ms  "
                f"p99 {control.p99_ms:.3f} ms",
            )
        if "i" in plan:
            self.check_audit(plan["i"][0])

    def run_micro(self) -> None:
        """The in-process timings, in a child on the server core before any server starts."""
        cfg = self.cfg
        log(cfg, f"in-process: fair usage and audit record, {cfg.micro_iterations} calls x 5")
        cmd = [
            *self.server_pin,
            sys.executable,
            str(Path(__file__).resolve()),
            "--micro",
            str(cfg.micro_iterations),
        ]
        done = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=900, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"in-process timings failed:\n{done.stdout}\n{done.stderr}")
        self.micro = json.loads(done.stdout.strip().splitlines()[-1])
        m = self.micro
        auth = HERE / "bench_auth.py"
        if auth.is_file():
            done = subprocess.run(
                [*self.server_pin, sys.executable, str(auth)],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            if done.returncode == 0:
                result = json.loads(done.stdout.strip().splitlines()[-1])
                m["token_cache_hit_us"] = result["cache_hit_us"]
                m["token_verify_hs256_us"] = result["verify_hs256_us"]
                log(cfg, f"      token cache hit {result['cache_hit_us']} us (bench_auth.py)")
            else:
                log(cfg, f"      bench_auth.py failed: {done.stderr.strip()[-500:]}")
        log(
            cfg,
            f"      decide: {m['decide_noplan_us']} us without a plan, {m['decide_plan_us']} us "
            f"with ({m['decide_plan_minus_noplan_us']:+} us); fair_usage alone "
            f"{m['fair_usage_plan_us']} us (no plan: {m['fair_usage_noplan_us']} us), "
            f"bandwidth add {m['bandwidth_add_us']} us; audit record {m['audit_build_and_seal_us']}"
            " us",
        )

    def check_audit(self, server: Server) -> None:
        """Stop (i) as SIGTERM stops it in production (the writer drains and seals its chain),
        then count what it wrote against what wrk saw answered."""
        self.procs.stop(server.proc, timeout=60)
        counts = count_audit_records(self.audit_dir)
        answered = self.sent.get(server.name, 0)
        self.audit_check = {
            **counts,
            "wrk_requests": answered,
            "check_requests": 3,  # the 401 check, the 200 check and the RateLimit check
            "exit_code": server.proc.returncode,
            "no_loss": counts["records"] >= answered and counts["final"] >= 1,
        }
        log(
            self.cfg,
            f"  (i) audit: {counts['records']} records (+{counts['checkpoints']} checkpoints, "
            f"{counts['files']} files) for {answered} responses wrk reported: "
            + ("no loss" if self.audit_check["no_loss"] else "RECORDS MISSING"),
        )

    # -- report -----------------------------------------------------------------------------------

    def ratios(self) -> dict[str, Any]:
        res = self.results
        out: dict[str, Any] = {}

        def ratio(name: str, num: str, den: str, target: float | None = None) -> None:
            if num in res and den in res and res[den].rps > 0:
                entry: dict[str, Any] = {"value": round(res[num].rps / res[den].rps, 2)}
                if target is not None:
                    entry["target"] = target
                    entry["met"] = entry["value"] >= target
                # The same comparison in server CPU per request (higher = num is cheaper).
                a, b = res[num].server_cpu_us_per_req, res[den].server_cpu_us_per_req
                if a and b:
                    entry["cpu_per_req_ratio"] = round(b / a, 2)
                # With --rounds, each round's two runs side by side: on a shared
                # machine whose speed drifts between rounds, the median of these
                # paired ratios is steadier than the best run of each.
                runs_a, runs_b = self.runs.get(num, []), self.runs.get(den, [])
                if len(runs_a) > 1 and len(runs_a) == len(runs_b):
                    pairs = zip(runs_a, runs_b, strict=True)
                    paired = [round(x.rps / y.rps, 3) for x, y in pairs if y.rps]
                    if paired:
                        entry["rounds"] = paired
                        entry["median_of_rounds"] = round(statistics.median(paired), 3)
                out[name] = entry

        for letter, label in (("e", "public"), ("f", "authed")):
            ratio(f"fairgate_{label}_vs_aiohttp", letter, "c", TARGET_VS_AIOHTTP)
            ratio(f"fairgate_{label}_vs_httpx", letter, "b", TARGET_VS_HTTPX)
            ratio(f"fairgate_{label}_vs_nginx", letter, "d")
            ratio(f"fairgate_{label}_vs_ceiling", letter, "g")
            ratio(f"fairgate_{label}_vs_upstream", letter, "a")
            if letter in self.half:
                p99 = self.half[letter]["paced"]["p99_ms"]
                out[f"fairgate_{label}_half_peak_p99_ms"] = {
                    "value": p99,
                    "target": f"< {TARGET_HALF_P99_MS}",
                    "met": p99 < TARGET_HALF_P99_MS,
                }
        ratio("aiohttp_vs_httpx", "c", "b")
        if self.half_control is not None:
            out["ceiling_paced_p99_ms_control"] = {"value": self.half_control["p99_ms"]}

        def cpu_delta(name: str, num: str, den: str, target: float | None = None) -> None:
            """Server CPU per request, num - den, in us: what num's extra step costs.

            ``value`` compares the best run (by req/s) of each; ``min_runs`` the cheapest
            run of each; ``per_round`` the two setups' runs in the same round, paired.
            """
            if num not in res or den not in res:
                return
            a, b = res[num].server_cpu_us_per_req, res[den].server_cpu_us_per_req
            if a is None or b is None:
                return
            entry: dict[str, Any] = {"value": round(a - b, 1)}
            runs_a = [r.server_cpu_us_per_req or math.inf for r in self.runs[num]]
            runs_b = [r.server_cpu_us_per_req or math.inf for r in self.runs[den]]
            entry["min_runs"] = round(min(runs_a) - min(runs_b), 1)
            entry["per_round"] = [round(x - y, 1) for x, y in zip(runs_a, runs_b, strict=False)]
            if target is not None:
                entry["target"] = f"<= {target}"
                if entry["value"] < 0 or min(entry["per_round"], default=0) < 0:
                    # A step cannot cost less than nothing: the machine's noise is larger
                    # than the step. No verdict (count instructions: count_server.py).
                    entry["met"] = None
                else:
                    entry["met"] = entry["value"] <= target
            out[name] = entry

        def instr_delta(name: str, num: str, den: str) -> None:
            """Instructions per request, num - den (medians of the runs), and the same in
            us at den's CPU time per instruction: a noise-robust figure of num's extra step."""
            if num not in res or den not in res:
                return
            runs_a = [r.server_kinstr_per_req for r in self.runs[num] if r.server_kinstr_per_req]
            runs_b = [r.server_kinstr_per_req for r in self.runs[den] if r.server_kinstr_per_req]
            if not runs_a or not runs_b:
                return
            a, b = statistics.median(runs_a), statistics.median(runs_b)
            cpu_b = min(r.server_cpu_us_per_req or math.inf for r in self.runs[den])
            out[name] = {
                "value": f"{a - b:+.1f} kinstr/req",
                "kinstr": round(a - b, 1),
                "ratio": round(a / b, 3),
                "us_at_den_rate": round((a - b) * cpu_b / b, 1),
                "num_kinstr": round(a, 1),
                "den_kinstr": round(b, 1),
            }

        # Issue 4: fair usage on (h) vs off (f), the same process and route.
        ratio("fairgate_plan_vs_authed", "h", "f")
        cpu_delta("fair_usage_cpu_us_per_req", "h", "f", TARGET_FAIR_USAGE_US)
        instr_delta("fair_usage_instructions", "h", "f")
        # Issue 3: the identity steps (JWT from the cache, RBAC, tenant): authed - public.
        cpu_delta("identity_cpu_us_per_req", "f", "e")
        # Issue 5: the audit trail on (i) vs off (h).
        ratio("fairgate_audit_vs_plan", "i", "h", TARGET_AUDIT_RATIO)
        cpu_delta("audit_cpu_us_per_req", "i", "h")
        instr_delta("audit_instructions", "i", "h")
        for letter, label in (("h", "plan"), ("i", "audit")):
            ratio(f"fairgate_{label}_vs_aiohttp", letter, "c", TARGET_VS_AIOHTTP)
            ratio(f"fairgate_{label}_vs_httpx", letter, "b", TARGET_VS_HTTPX)
        if self.micro is not None:
            m = self.micro
            out["fair_usage_step_in_process_us"] = {
                "value": m["fair_usage_step_us"],
                "target": f"<= {TARGET_FAIR_USAGE_US}",
                "met": m["fair_usage_step_us"] <= TARGET_FAIR_USAGE_US,
            }
            out["decide_plan_minus_noplan_in_process_us"] = {
                "value": m["decide_plan_minus_noplan_us"],
                "target": f"<= {TARGET_FAIR_USAGE_US}",
                "met": m["decide_plan_minus_noplan_us"] <= TARGET_FAIR_USAGE_US,
            }
            if "token_cache_hit_us" in m:
                out["token_cache_hit_us"] = {
                    "value": m["token_cache_hit_us"],
                    "target": f"<= {TARGET_TOKEN_CACHE_US}",
                    "met": m["token_cache_hit_us"] <= TARGET_TOKEN_CACHE_US,
                }
        if self.audit_check is not None:
            out["audit_records_vs_wrk_requests"] = {
                "value": f"{self.audit_check['records']} / {self.audit_check['wrk_requests']}",
                "target": "records >= requests, a final checkpoint",
                "met": self.audit_check["no_loss"],
            }
        return out

    @staticmethod
    def _row(name: str, x: WrkResult, notes: str) -> str:
        p999 = f"{x.p999_ms:.3f}" if x.p999_ms is not None else "-"
        cpu = f"{x.server_cpu_pct:.0f}" if x.server_cpu_pct is not None else "-"
        per = f"{x.server_cpu_us_per_req:.0f}" if x.server_cpu_us_per_req is not None else "-"
        wait = f"{x.server_wait_pct:.1f}" if x.server_wait_pct is not None else "-"
        kins = f"{x.server_kinstr_per_req:.1f}" if x.server_kinstr_per_req is not None else "-"
        return (
            f"{name:<42} {x.rps:>8.0f} {x.p50_ms:>7.3f} {x.p99_ms:>7.3f} {p999:>8} "
            f"{cpu:>5} {per:>7} {kins:>8} {wait:>6}  {notes}"
        )

    def table(self, ratios: dict[str, Any]) -> str:
        lines = [
            f"{'setup':<42} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'p99.9ms':>8} "
            f"{'cpu%':>5} {'us/req':>7} {'kinstr':>8} {'wait%':>6}  notes",
            "-" * 112,
        ]
        for letter, (_, label) in SETUPS.items():
            if letter in self.skipped:
                lines.append(f"({letter}) {label:<38} skipped: {self.skipped[letter]}")
            elif letter in self.results:
                x = self.results[letter]
                notes = list(x.notes)
                if len(self.runs[letter]) > 1:
                    notes.insert(0, "runs " + "/".join(f"{r.rps:.0f}" for r in self.runs[letter]))
                lines.append(self._row(f"({letter}) {label}", x, "; ".join(notes)))
        for letter, half in self.half.items():
            label = "public" if letter == "e" else "authed"
            for key, what in (("c4", "-c4"), ("paced", "paced")):
                x = WrkResult(**half[key])
                name = f"({letter}) {label}, {what}, {x.rps / half['peak_rps']:.0%} of peak"
                lines.append(self._row(name, x, f"c={x.connections}"))
        if self.half_control is not None:
            x = WrkResult(**self.half_control)
            lines.append(
                self._row("(g) ceiling, same paced load (control)", x, f"c={x.connections}")
            )
        lines.append(
            "cpu% / us/req: the server's CPU during the run (of one core) and per "
            "request; wait%: time it was runnable\nbut another task had its core "
            "(other load on the machine; a few % or more means a disturbed run)."
        )
        lines.append("")
        for name, entry in ratios.items():
            verdict = ""
            if "met" in entry:
                met = {True: "met", False: "NOT met", None: "no verdict, below the noise"}
                verdict = f"  (target {entry['target']}: {met[entry['met']]})"
            if "cpu_per_req_ratio" in entry:
                verdict += f"  [CPU/req ratio {entry['cpu_per_req_ratio']}]"
            if "per_round" in entry:
                verdict += f"  [cheapest runs {entry['min_runs']}; by round {entry['per_round']}]"
            if "rounds" in entry:
                verdict += f"  [by round {entry['rounds']}, median {entry['median_of_rounds']}]"
            if "kinstr" in entry:
                verdict += (
                    f"  [{entry['num_kinstr']} vs {entry['den_kinstr']} kinstr/req, "
                    f"ratio {entry['ratio']}, ~{entry['us_at_den_rate']} us at the baseline's rate]"
                )
            lines.append(f"{name:<40} {entry['value']}{verdict}")
        return "\n".join(lines)

    def summary(self, ratios: dict[str, Any]) -> dict[str, Any]:
        fairgate_server = None
        if self.fairgate_server:
            fairgate_server = (
                "gateway.serve.server"
                if "gateway.serve" in self.fairgate_server[0]
                else "uvicorn.Config"
            )
        return {
            "bench": "proxy",
            "wrk": {
                "threads": 1,
                "connections": self.cfg.connections,
                "duration_s": self.cfg.duration,
                "warmup_s": self.cfg.warmup,
                "half_peak_tool": "wrk2" if self.wrk.wrk2 else "wrk+lua-delay",
            },
            "pinning": {
                "client_and_upstream": " ".join(self.client_pin) or None,
                "server": " ".join(self.server_pin) or None,
            },
            "cpus": os.cpu_count(),
            "audit_writer": self.cfg.audit_writer,
            "machine_busy_before_pct": self.background_busy,
            "python": sys.version.split()[0],
            "gateway_root": str(self.cfg.gateway_root),
            "gateway_commit": git_commit(self.cfg.gateway_root),
            "fairgate_server": fairgate_server,
            "rounds": self.cfg.rounds,
            "results": {f"{k}_{SETUPS[k][0]}": asdict(v) for k, v in self.results.items()},
            "runs_rps": {f"{k}_{SETUPS[k][0]}": [r.rps for r in v] for k, v in self.runs.items()},
            "skipped": self.skipped,
            "half_peak": {f"{k}_{SETUPS[k][0]}": v for k, v in self.half.items()},
            "half_peak_control_ceiling": self.half_control,
            "in_process": self.micro,
            "audit_check": self.audit_check,
            "ratios": ratios,
        }


def git_commit(root: Path) -> str | None:
    """The checkout's HEAD commit, with "+dirty" if gateway/ has uncommitted changes.

    For a snapshot that is not a checkout (``git archive``), the content of a COMMIT file
    in it, if any.
    """
    marker = root / "COMMIT"
    if marker.is_file():
        return marker.read_text().strip() or None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "gateway"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    # Only trust it if root is the repository's top level (not a snapshot inside another).
    top = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--show-toplevel"],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    ).stdout.strip()
    if not top or Path(top).resolve() != root.resolve():
        return None
    return head + ("+dirty" if dirty else "")


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP all unwind through ``finally`` (which stops the servers).

    SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then leaves
    it ignored.
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument(
        "--warmup", type=int, default=2, help="seconds of warm-up per run (0: none)"
    )
    parser.add_argument("--connections", type=int, default=64, help="wrk -c")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every setup this many times, interleaved; "
        "the best run (by req/s) is reported: on a shared machine noise only ever subtracts",
    )
    parser.add_argument(
        "--only", default="".join(SETUPS), help="setups to run, e.g. 'a,c,f' (default: all)"
    )
    parser.add_argument(
        "--micro-iterations",
        type=int,
        default=100_000,
        help="calls per in-process timing of the fair-usage step and audit record",
    )
    parser.add_argument("--skip-micro", action="store_true", help="skip the in-process timings")
    parser.add_argument(
        "--skip-half", action="store_true", help="skip Fairgate's half-peak latency runs"
    )
    parser.add_argument("--no-pin", action="store_true", help="don't use taskset")
    parser.add_argument("--client-cpu", type=int, default=0, help="core for wrk + upstream")
    parser.add_argument("--server-cpu", type=int, default=1, help="core for the server tested")
    parser.add_argument(
        "--writer-cpu",
        type=int,
        default=None,
        help="core for (i)'s audit writer process (default: the server's, which it inherits)",
    )
    parser.add_argument(
        "--audit-writer",
        choices=["process", "inline"],
        default="process",
        help="(i)'s audit.writer: a writer process per worker (default), or the worker itself",
    )
    parser.add_argument(
        "--gateway-root",
        default=str(ROOT),
        help="directory holding the gateway package to benchmark (default: this checkout); "
        "e.g. a `git archive` snapshot of a commit, to A/B two versions (a COMMIT file in DIR "
        "names it in the summary)",
    )
    parser.add_argument(
        "--json-only",
        action="store_true",
        help="print only the JSON summary on stdout (progress on stderr)",
    )
    parser.add_argument(
        "--valgrind",
        type=int,
        default=0,
        metavar="N",
        help="also count the instructions per request of (f), (h) and (i) under valgrind "
        "(count_server.py, N requests each) and read fair usage as time at the step's own "
        "rate in process: for machines whose CPU counters perf cannot read",
    )
    # Internal: run one server in this process.
    parser.add_argument(
        "--serve",
        choices=["hello", "httpx", "aiohttp", "fairgate", *AUDIT_WRITERS],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    parser.add_argument("--audit-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--micro", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _per_call(output: str, piece: str) -> float:
    for line in output.splitlines():
        if line.split()[:1] == [piece]:
            return float(line.split()[1])
    raise SystemExit(f"count_instructions.py printed no {piece!r} line: {output[-300:]}")


def valgrind_figures(root: Path, requests: int) -> dict[str, Any]:
    """Fair usage and the audit trail in instructions per request, counted under valgrind
    (exact where times are noise), and fair usage as time at the rate of the step's own
    code: its µs per call over its instructions per call, both in process, now."""
    import count_server

    variants = [("f", str(root), "authed"), ("h", str(root), "plan"), ("i", str(root), "audit")]
    kinstr = count_server.count(variants, requests, 300, log=sys.stderr)
    env = {**os.environ, "FAIRGATE_GATEWAY_ROOT": str(root)}
    script = [sys.executable, str(HERE / "count_instructions.py")]
    counted = subprocess.run([*script, "step"], env=env, capture_output=True, text=True)
    timed = subprocess.run([*script, "--time", "step"], env=env, capture_output=True, text=True)
    rate = _per_call(timed.stdout, "step") / _per_call(counted.stdout, "step")  # µs per kinstr
    fair = kinstr["h"] - kinstr["f"]
    # (i)'s audit writer process runs outside the server counted above: count it apart.
    writer = subprocess.run(
        [sys.executable, str(HERE / "count_writer.py"), "--records", str(requests * 4)],
        env=env,
        capture_output=True,
        text=True,
    )
    found = re.search(r"writer process: ([\d.]+) kinstr per record", writer.stdout)
    writer_kinstr = float(found.group(1)) if found else math.nan
    serving = kinstr["i"] / kinstr["h"]
    return {
        "fair_usage_instructions_valgrind": {
            "value": f"{fair:+.1f} kinstr/req = {fair * rate:.2f} us",
            "delta_kinstr": round(fair, 1),
            "us_per_kinstr": round(rate, 4),
            "us": round(fair * rate, 2),
            "target": f"<= {TARGET_FAIR_USAGE_US}",
            "met": fair * rate <= TARGET_FAIR_USAGE_US,
        },
        "audit_instructions_valgrind": {
            "value": round(serving, 3),
            "target": f"<= {1 / TARGET_AUDIT_RATIO:.3f} (the serving process)",
            "met": serving <= 1 / TARGET_AUDIT_RATIO,
            "note": "(i)/(h) in the server; its writer process apart (valgrind's SHA-256 "
            "is slower than the CPU's)",
            "writer_process_kinstr_per_record": writer_kinstr,
            "with_writer_process": round((kinstr["i"] + writer_kinstr) / kinstr["h"], 3),
            "kinstr_per_req": {k: round(v, 1) for k, v in kinstr.items()},
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.upstream, args.audit_dir)
        return 0
    if args.micro:
        print(json.dumps(micro(args.micro)), flush=True)
        return 0
    only = sorted({c for c in args.only.replace(",", "").lower() if not c.isspace()})
    if bad := [c for c in only if c not in SETUPS]:
        raise SystemExit(
            f"--only: unknown setup(s) {', '.join(bad)}; choose from {''.join(SETUPS)}"
        )
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found (apt-get install wrk)")
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and {args.client_cpu, args.server_cpu} <= set(cpus) and len(cpus) > 1
    cfg = Config(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        rounds=max(1, args.rounds),
        only=only,
        half=not args.skip_half,
        pin=pin,
        client_cpu=args.client_cpu,
        server_cpu=args.server_cpu,
        writer_cpu=args.writer_cpu,
        audit_writer=args.audit_writer,
        json_only=args.json_only,
        gateway_root=Path(args.gateway_root).resolve(),
        micro_iterations=0 if args.skip_micro else args.micro_iterations,
    )
    if not (cfg.gateway_root / "gateway" / "proxy.py").is_file():
        raise SystemExit(f"--gateway-root: no gateway/proxy.py under {cfg.gateway_root}")
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp, interruptible():
        bench = Bench(cfg, Path(tmp))
        try:
            bench.run()
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            bench.procs.stop_all()
        ratios = bench.ratios()
        if args.valgrind:
            ratios.update(valgrind_figures(cfg.gateway_root, args.valgrind))
        if not cfg.json_only:
            print()
            print(bench.table(ratios))
        print(json.dumps(bench.summary(ratios)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
