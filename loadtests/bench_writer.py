"""The audit writer process's CPU per record, alone, at a fixed rate.

    python loadtests/bench_writer.py [--rate 12000] [--seconds 6] [--rounds 2] [ROOT ...]

Each ROOT (a checkout or snapshot with its extensions built; default: this
one) is measured in turn, round after round, in a fresh process: a worker's
``WriterProcess`` (its writer process on core 1, the driver on core 0) is
handed records at ``--rate`` per second, in ticks of 256, as a worker under
that load hands them over (a batch when ``batch`` records wait, or every
``flush_interval``), to a ``file://`` sink in a temporary directory with the
default policy (``fsync: batch``). After a 2 s warm-up, the writer process's
user and system CPU over ``--seconds`` is divided by the records handed over.

No server and no wrk: the writer's own cost, steadier than a wrk run's share
of it on a shared machine, kernel time included (its writes, fsyncs and
socket reads), which valgrind's counts (``count_writer.py``) leave out. The
first ROOT is the baseline: each other's median is also given as a ratio to
it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TICK = 256


def cpu_time(pid: int) -> float:
    """CPU seconds (user and system) of process ``pid`` so far, to the
    nanosecond: Linux's CPU-time clock of another process (``CPUCLOCK_SCHED``
    of the process id; /proc's stat counts in 10 ms ticks, ~0.14 us a
    record over a 6 s run)."""
    return time.clock_gettime((~pid << 3) | 2)


def sleeps(pid: int) -> int:
    """How many times process ``pid`` has waited so far (voluntary context
    switches, all threads): on a VM each wake-up costs ~0.1 ms of CPU."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` so far (in ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def measure(rate: float, seconds: float) -> dict[str, float]:
    """In a process whose ``gateway`` is the ROOT measured."""
    from count_writer import facts

    from gateway.audit.config import AuditConfig
    from gateway.audit.remote import WriterProcess

    work = Path(tempfile.mkdtemp(prefix="fairgate-bench-writer-"))
    try:
        config = AuditConfig(instance="bench", sinks=(f"file://{work}",), checkpoint_key=b"k" * 32)
        writer = WriterProcess(config, ip_key=b"p" * 32)
        await writer.start()
        pid = writer.pid
        assert pid is not None
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(pid, {1})
            os.sched_setaffinity(0, {0})
        sent = 0

        async def drive(duration: float) -> None:
            nonlocal sent
            start = time.monotonic()
            ticks = 0
            while time.monotonic() - start < duration:
                for _ in range(TICK):
                    record = facts(sent)
                    if not writer.offer_facts(record):
                        await writer.write_facts(record)
                    sent += 1
                ticks += 1
                await asyncio.sleep(max(0.0, start + ticks * TICK / rate - time.monotonic()))

        await drive(2.0)  # warm-up: files opened, allocator and caches settled
        user0, sys0 = cpu_seconds(pid)
        cpu0 = cpu_time(pid)
        sleeps0 = sleeps(pid)
        first = sent
        await drive(seconds)
        # The last hand-over written before the reading: its CPU is counted.
        deadline = time.monotonic() + 10
        while writer.written < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        cpu1 = cpu_time(pid)
        sleeps1 = sleeps(pid)
        user1, sys1 = cpu_seconds(pid)
        count = sent - first
        await writer.aclose()
        if writer.written != sent:
            raise SystemExit(f"the writer wrote {writer.written} of {sent} records")
        return {
            "records": count,
            "us_per_record": round((cpu1 - cpu0) / count * 1e6, 3),
            "user_us": round((user1 - user0) / count * 1e6, 2),
            "sys_us": round((sys1 - sys0) / count * 1e6, 2),
            "sleeps_per_s": round((sleeps1 - sleeps0) / seconds, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_one(root: str, rate: float, seconds: float) -> dict[str, float]:
    env = {**os.environ, "FAIRGATE_GATEWAY_ROOT": root, "PYTHONPATH": root}
    out = subprocess.run(
        [sys.executable, __file__, "--one", "--rate", str(rate), "--seconds", str(seconds)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{root}: {out.stderr.strip().splitlines()[-1:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="*", help="checkouts to measure (default: this one)")
    parser.add_argument("--rate", type=float, default=12_000, help="records per second")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured, after 2 s")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        root = os.environ.get("FAIRGATE_GATEWAY_ROOT") or str(HERE.parent)
        sys.path[:0] = [root, str(HERE)]
        print(json.dumps(asyncio.run(measure(args.rate, args.seconds))))
        return
    roots = args.roots or [str(HERE.parent)]
    runs: dict[str, list[float]] = {root: [] for root in roots}
    for n in range(args.rounds):
        for root in roots:
            result = run_one(root, args.rate, args.seconds)
            runs[root].append(result["us_per_record"])
            print(
                f"round {n + 1}  {root}: {result['us_per_record']} us/record "
                f"(/proc, in 10 ms ticks: user {result['user_us']}, sys {result['sys_us']}; "
                f"{result['sleeps_per_s']} waits a second; "
                f"{result['records']} records)",
                flush=True,
            )
    base = statistics.median(runs[roots[0]])
    summary = {}
    for root in roots:
        median = statistics.median(runs[root])
        summary[root] = {"runs": runs[root], "median": median, "vs_first": round(median / base, 2)}
        print(f"{root}: median {median} us/record, {median / base:.2f}x the first")
    print(json.dumps({"bench": "writer", "rate": args.rate, "results": summary}))


if __name__ == "__main__":
    main()
