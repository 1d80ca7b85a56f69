"""A/B the gateway's cost per request between versions or variants of it.

    python loadtests/bench_ab.py --seconds 4 --rounds 3 \\
        f=/tmp/old:authed h=/tmp/old:plan i=/tmp/old:audit \\
        f2=/tmp/new:authed h2=/tmp/new:plan i2=/tmp/new:audit

Each ``NAME=ROOT:KIND`` is a gateway tree (a ``git archive`` snapshot with its
native modules built, possibly patched to switch a piece off) served the way
``bench_proxy.py`` serves it, alone on core 1; the hello upstream and wrk
share core 0. KIND is ``authed`` (setup (f)), ``plan`` ((h): a token on plan
``pro``, every limit kind), ``audit`` ((i): (h) with the audit trail on, its
writer process), ``audit-inline`` (records written on the event loop), and
``+py`` forces the pure-Python twins (``plan+py``). Every server is started
once; the rounds interleave them. For each run it prints req/s, CPU µs per
request and, with Linux ``perf``, thousands of instructions and cycles per
request; then the median and minimum of each. Instructions move by well
under 1 % between runs on a machine whose CPU time per request moves by 25 %:
compare variants by them, and read the times as a check.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_proxy import free_port, perf_start, perf_stop, session_sched, wait_ready  # noqa: E402

SECRET = "bench-ab-secret-0123456789abcdef0123456789"
PATH = "/t/acme/items/42"


def token(root: str, plan: str | None) -> str:
    code = (
        "import sys; from gateway.demokey import mint_token; "
        "print(mint_token(sub='alice', tenant='acme', roles=['agent'], "
        f"plan={plan!r}, secret={SECRET!r}, ttl=86400))"
    )
    env = {**os.environ, "PYTHONPATH": root}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("variants", nargs="+", metavar="NAME=ROOT:KIND")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench_ab.py needs wrk")
    os.environ["FAIRGATE_JWT_SECRET"] = SECRET
    os.environ.setdefault("FAIRGATE_AUDIT_KEY", "bench-ab-audit-key-0123456789abcdef")
    work = Path(tempfile.mkdtemp(prefix="fairgate-ab-"))
    procs: list[subprocess.Popen[bytes]] = []
    up = free_port()
    bench = str(HERE / "bench_proxy.py")
    hello = ["taskset", "-c", "0", sys.executable, bench, "--serve", "hello", "--port", str(up)]
    hello_log = (work / "hello.log").open("wb")
    procs.append(subprocess.Popen(hello, stdout=hello_log, stderr=hello_log))
    wait_ready(up, procs[-1], work / "hello.log")
    servers: dict[str, tuple[subprocess.Popen[bytes], int, str]] = {}
    try:
        for spec in args.variants:
            name, rest = spec.split("=", 1)
            root, kind = rest.rsplit(":", 1)
            port = free_port()
            serve = "fairgate" if not kind.startswith("audit") else "fairgate_audit"
            if kind.startswith("audit-inline"):
                serve = "fairgate_audit_inline"
            env = {**os.environ, "PYTHONPATH": root}
            if kind.endswith("+py"):
                env["FAIRGATE_NO_EXTENSIONS"] = "1"
            cmd = ["taskset", "-c", "1", sys.executable, bench, "--serve", serve]
            cmd += ["--port", str(port), "--upstream", f"http://127.0.0.1:{up}"]
            cmd += ["--audit-dir", str(work / name)]
            log = (work / f"{name}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    cmd, cwd=root, env=env, stdout=log, stderr=log, start_new_session=True
                )
            )
            wait_ready(port, procs[-1], work / f"{name}.log")
            plan = None if kind.startswith("authed") else "pro"
            servers[name] = (procs[-1], port, token(root, plan))
        rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in servers}
        for round_ in range(args.rounds):
            for name, (proc, port, bearer) in servers.items():
                wrk = ["taskset", "-c", "0", "wrk", "-t1", "-c64"]
                wrk += ["-H", f"Authorization: Bearer {bearer}"]
                url = f"http://127.0.0.1:{port}{PATH}"
                subprocess.run([*wrk, "-d2", url], capture_output=True)  # warm-up
                counter = perf_start(proc.pid)
                cpu0 = session_sched(proc.pid)[0]
                out = subprocess.run(
                    [*wrk, f"-d{args.seconds}", url], capture_output=True, text=True
                ).stdout
                cpu1 = session_sched(proc.pid)[0]
                counts = perf_stop(counter)
                found = re.search(r"(\d+) requests in", out)
                if found is None:
                    raise SystemExit(f"wrk said: {out}")
                n = int(found.group(1))
                us = (cpu1 - cpu0) / n * 1e6
                kinstr = counts.get("instructions", 0) / n / 1e3
                kcycles = counts.get("cycles", 0) / n / 1e3
                rows[name].append((us, kinstr, kcycles))
                bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                print(
                    f"round {round_ + 1} {name:<10} {n / args.seconds:8.0f} req/s {us:7.1f} us/req"
                    f" {kinstr:7.1f} kinstr/req {kcycles:7.1f} kcycles/req"
                    + (f"  NON-2XX {bad.group(1)}" if bad else ""),
                    flush=True,
                )
        for name, runs in rows.items():
            us, kinstr, kcycles = (sorted(col) for col in zip(*runs, strict=True))
            print(
                f"{name:<10} us/req median {statistics.median(us):7.1f} min {us[0]:7.1f}  "
                f"kinstr/req median {statistics.median(kinstr):7.1f} min {kinstr[0]:7.1f}  "
                f"kcycles/req median {statistics.median(kcycles):7.1f}"
            )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
