"""A/B the gateway's cost per request between versions or variants of it.

    python loadtests/bench_ab.py --seconds 4 --rounds 3 \\
        f=/tmp/old:authed h=/tmp/old:plan i=/tmp/old:audit \\
        f2=/tmp/new:authed h2=/tmp/new:plan i2=/tmp/new:audit

Each ``NAME=ROOT:KIND`` is a gateway tree (a ``git archive`` snapshot with its
native modules built, possibly patched to switch a piece off) served the way
``bench_proxy.py`` serves it, alone on core 1; the hello upstream and wrk
share core 0. KIND is ``authed`` (setup (f)), ``plan`` ((h): a token on plan
``pro``, every limit kind), ``audit`` ((i): (h) with the audit trail on), and
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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECRET = "bench-ab-secret-0123456789abcdef0123456789"
PATH = "/t/acme/items/42"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int) -> None:
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    perf = shutil.which("perf") is not None
    os.environ["FAIRGATE_JWT_SECRET"] = SECRET
    os.environ.setdefault("FAIRGATE_AUDIT_KEY", "bench-ab-audit-key-0123456789abcdef")
    work = Path(tempfile.mkdtemp(prefix="fairgate-ab-"))
    procs: list[subprocess.Popen[bytes]] = []
    up = free_port()
    bench = str(HERE / "bench_proxy.py")
    hello = ["taskset", "-c", "0", sys.executable, bench, "--serve", "hello", "--port", str(up)]
    procs.append(subprocess.Popen(hello, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_ready(up)
    servers: dict[str, tuple[subprocess.Popen[bytes], int, str]] = {}
    try:
        for spec in args.variants:
            name, rest = spec.split("=", 1)
            root, kind = rest.rsplit(":", 1)
            port = free_port()
            serve = "fairgate_audit" if kind.startswith("audit") else "fairgate"
            env = {**os.environ, "PYTHONPATH": root}
            if kind.endswith("+py"):
                env["FAIRGATE_NO_EXTENSIONS"] = "1"
            cmd = ["taskset", "-c", "1", sys.executable, bench, "--serve", serve]
            cmd += ["--port", str(port), "--upstream", f"http://127.0.0.1:{up}"]
            cmd += ["--audit-dir", str(work / name)]
            log = (work / f"{name}.log").open("wb")
            procs.append(subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=log))
            wait_ready(port)
            plan = None if kind.startswith("authed") else "pro"
            servers[name] = (procs[-1], port, token(root, plan))
        rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in servers}
        for round_ in range(args.rounds):
            for name, (proc, port, bearer) in servers.items():
                wrk = ["taskset", "-c", "0", "wrk", "-t1", "-c64"]
                wrk += ["-H", f"Authorization: Bearer {bearer}"]
                url = f"http://127.0.0.1:{port}{PATH}"
                subprocess.run([*wrk, "-d2", url], capture_output=True)  # warm-up
                counter = None
                if perf:
                    counter = subprocess.Popen(
                        ["perf", "stat", "-x,", "-e", "instructions,cycles", "-p", str(proc.pid)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                cpu0 = cpu_seconds(proc.pid)
                out = subprocess.run(
                    [*wrk, f"-d{args.seconds}", url], capture_output=True, text=True
                ).stdout
                cpu1 = cpu_seconds(proc.pid)
                counts: dict[str, int] = {}
                if counter is not None:
                    counter.send_signal(2)
                    for line in counter.communicate()[1].splitlines():
                        f = line.split(",")
                        if len(f) > 2 and f[0].isdigit():
                            counts[f[2]] = int(f[0])
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
