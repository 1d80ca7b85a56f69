"""The audit writer process's CPU per record, alone, at a fixed rate.

    python loadtests/bench_writer.py [--rate 12000] [--seconds 6] [--rounds 2]
                                     [--writers process,inline] [ROOT ...]

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

Each run also gives the CPU of the driving process with it (``total``): the
worker's side of the hand-over, and the driver's own work (making each
record's facts), which is the same in every run. ``--writers inline`` has no
writer process: the worker seals and writes itself (``writer: inline``, the
driver on core 1), so only its total compares, with the process's total.
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
from typing import Any

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


async def measure(rate: float, seconds: float, mode: str = "process") -> dict[str, float]:
    """In a process whose ``gateway`` is the ROOT measured."""
    from count_writer import facts

    from gateway.audit.config import AuditConfig
    from gateway.audit.remote import WriterProcess

    work = Path(tempfile.mkdtemp(prefix="fairgate-bench-writer-"))
    try:
        config = AuditConfig(instance="bench", sinks=(f"file://{work}",), checkpoint_key=b"k" * 32)
        writer: Any
        if mode == "inline":
            from gateway.audit.inline import InlineWriter

            writer = InlineWriter(config, ip_key=b"p" * 32)
        else:
            writer = WriterProcess(config, ip_key=b"p" * 32)
        await writer.start()
        pid = writer.pid if mode == "process" else None
        pinned = hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1
        if pinned and pid is not None:
            os.sched_setaffinity(pid, {1})
            os.sched_setaffinity(0, {0})
        elif pinned:  # the writer is this process (its file thread too): core 1
            os.sched_setaffinity(0, {1})
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
        me = os.getpid()
        user0, sys0 = cpu_seconds(pid or me)
        cpu0 = cpu_time(pid) if pid else 0.0
        own0 = cpu_time(me)
        sleeps0 = sleeps(pid or me)
        first = sent
        await drive(seconds)
        # The last hand-over written before the reading: its CPU is counted.
        deadline = time.monotonic() + 10
        while writer.written < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        cpu1 = cpu_time(pid) if pid else 0.0
        own1 = cpu_time(me)
        sleeps1 = sleeps(pid or me)
        user1, sys1 = cpu_seconds(pid or me)
        count = sent - first
        await writer.aclose()
        if writer.written != sent:
            raise SystemExit(f"the writer wrote {writer.written} of {sent} records")
        return {
            "records": count,
            "us_per_record": round((cpu1 - cpu0) / count * 1e6, 3),
            # This process's too: the driver, and in inline mode the writer.
            "total_us_per_record": round((cpu1 - cpu0 + own1 - own0) / count * 1e6, 3),
            "user_us": round((user1 - user0) / count * 1e6, 2),
            "sys_us": round((sys1 - sys0) / count * 1e6, 2),
            "sleeps_per_s": round((sleeps1 - sleeps0) / seconds, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_one(root: str, rate: float, seconds: float, mode: str) -> dict[str, float]:
    env = {**os.environ, "FAIRGATE_GATEWAY_ROOT": root, "PYTHONPATH": root}
    args = ["--one", "--rate", str(rate), "--seconds", str(seconds), "--writers", mode]
    out = subprocess.run(
        [sys.executable, __file__, *args],
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
    parser.add_argument(
        "--writers",
        default="process",
        help="process, inline, or both (process,inline): each measured on each ROOT",
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    modes = [m.strip() for m in args.writers.split(",") if m.strip()]
    if not modes or any(m not in ("process", "inline") for m in modes):
        parser.error("--writers: process, inline, or process,inline")
    if args.one:
        root = os.environ.get("FAIRGATE_GATEWAY_ROOT") or str(HERE.parent)
        sys.path[:0] = [root, str(HERE)]
        print(json.dumps(asyncio.run(measure(args.rate, args.seconds, modes[0]))))
        return
    roots = args.roots or [str(HERE.parent)]
    cases = [(root, mode) for root in roots for mode in modes]
    runs: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    totals: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    for n in range(args.rounds):
        for root, mode in cases:
            result = run_one(root, args.rate, args.seconds, mode)
            runs[root, mode].append(result["us_per_record"])
            totals[root, mode].append(result["total_us_per_record"])
            own = "writer process" if mode == "process" else "worker, its writer inline"
            print(
                f"round {n + 1}  {root} ({mode}): "
                + (
                    f"{result['us_per_record']} us/record in the writer process, "
                    if mode == "process"
                    else ""
                )
                + f"{result['total_us_per_record']} with the driver's "
                f"(the {own}, /proc, in 10 ms ticks: user {result['user_us']}, "
                f"sys {result['sys_us']}; {result['sleeps_per_s']} waits a second; "
                f"{result['records']} records)",
                flush=True,
            )
    # The writer process's own CPU compares only between process runs.
    process_cases = [case for case in cases if case[1] == "process"]
    base = statistics.median(runs[process_cases[0]]) if process_cases else 0.0
    base_total = statistics.median(totals[cases[0]])
    summary = {}
    for root, mode in cases:
        median = statistics.median(runs[root, mode])
        total = statistics.median(totals[root, mode])
        summary[f"{root}:{mode}"] = {
            "runs": runs[root, mode],
            "median": median,
            "vs_first": round(median / base, 2) if base and mode == "process" else None,
            "total_runs": totals[root, mode],
            "total_median": total,
            "total_vs_first": round(total / base_total, 2),
        }
        own = (
            f"median {median} us/record in the writer process ({median / base:.2f}x the first "
            "process run), "
            if base and mode == "process"
            else "median "
        )
        print(
            f"{root} ({mode}): {own}{total} with the driver's ({total / base_total:.2f}x the first)"
        )
    print(json.dumps({"bench": "writer", "rate": args.rate, "results": summary}))


if __name__ == "__main__":
    main()
