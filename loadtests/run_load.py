"""Run the locust scenarios against a fresh `fairgate demo` and report.

Starts the demo on free loopback ports, runs locust headless for a bounded
time, stops everything, and prints a report: requests per scenario, and how
the gateway answered (status and reason), so abuse that got through shows.
The last line is a JSON summary.

    python loadtests/run_load.py [--users 50] [--seconds 30]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("fairgate demo exited before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/crm/v1/health", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("fairgate demo did not become ready")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    port, admin = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="fairgate-load-") as tmp:
        # The checkout first on the path, so this also runs without an install.
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, FAIRGATE_HOME=tmp, PYTHONPATH=path)
        demo = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "demo",
                "--port",
                str(port),
                "--admin-port",
                str(admin),
            ],
            cwd=tmp,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(port, demo)
            prefix = Path(tmp) / "locust"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "locust",
                    "-f",
                    str(ROOT / "loadtests" / "locustfile.py"),
                    "--headless",
                    "--host",
                    f"http://127.0.0.1:{port}",
                    "-u",
                    str(args.users),
                    "-r",
                    str(max(1, args.users // 5)),
                    "-t",
                    f"{args.seconds}s",
                    "--csv",
                    str(prefix),
                    "--only-summary",
                ],
                cwd=ROOT,
                env=env,
                check=False,
                timeout=args.seconds + 60,
            )
            rows = _read_csv(Path(f"{prefix}_stats.csv"))
            failures = _read_csv(Path(f"{prefix}_failures.csv"))
        finally:
            demo.send_signal(signal.SIGTERM)
            demo.wait(30)
    print("\nRequests by scenario:")
    for row in rows:
        print(
            f"  {row['Name']:45} {row['Request Count']:>8} req  "
            f"{row['Failure Count']:>8} refused  p50 {row['50%']:>5} ms  p99 {row['99%']:>5} ms"
        )
    print("\nRefusals (status and reason as locust saw them):")
    for row in failures:
        print(f"  {row['Name']:45} {row['Occurrences']:>8}  {row['Error'][:70]}")
    total = next((r for r in rows if r["Name"] == "Aggregated"), None)
    print(
        json.dumps(
            {
                "bench": "load",
                "users": args.users,
                "seconds": args.seconds,
                "requests": int(total["Request Count"]) if total else 0,
                "refused": int(total["Failure Count"]) if total else 0,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
