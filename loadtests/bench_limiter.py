"""Benchmark of the fair-usage token buckets against the ``limits`` library.

    python loadtests/bench_limiter.py [--decisions N] [--limits-decisions M]
                                      [--repeat R] [--active K]

Decisions per second (best of R timed runs) for the native table
(``gateway._buckets_c``), its pure-Python twin (``gateway._buckets_py``) and
``limits`` 5/second on MemoryStorage with the moving-window and the
sliding-window-counter strategies; each on one hot key and on 100,000
rotating keys.  Then the resident memory per active key of K (default
1,000,000) active keys in the native table, measured two ways: the RSS delta
(/proc/self/statm) and the table's allocated slots (capacity * 16 bytes).

Prints a human table, then a JSON summary as the LAST line.  Build the native
module first: ``python setup.py build_ext --inplace``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent.parent))  # a source checkout

from gateway import _buckets_py

ROTATING_KEYS = 100_000
RATE = 5.0  # GCRA 5 tokens/s, burst 5 == limits "5/second"
BURST = 5
TARGET_SPEEDUP = 50.0  # native vs limits moving window, 100k keys
TARGET_BYTES_PER_KEY = 64.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _best_rate(run: Callable[[], None], n: int, repeat: int) -> float:
    """Best decisions/second over ``repeat`` timed runs of ``n`` decisions."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return n / best


def _key_stream(n: int, keys: int) -> list[str]:
    """``n`` keys cycling over ``keys`` distinct ones (made once, before timing)."""
    pool = [f"tenant-{i % 97}/client-{i}" for i in range(keys)]
    return [pool[i % keys] for i in range(n)]


def _bench_table(module: Any, stream: Sequence[str], repeat: int) -> float:
    # Our API takes a sequence of keys: wrap each key in a one-key list once, untimed.
    wrapped: dict[str, list[str]] = {}
    items = [wrapped.setdefault(key, [key]) for key in stream]
    rates = [RATE]
    bursts = [BURST]

    def run() -> None:
        acquire = module.BucketTable(capacity_hint=ROTATING_KEYS).acquire
        for keys in items:
            acquire(keys, rates, bursts)

    return _best_rate(run, len(items), repeat)


def _bench_limits(strategy: str, stream: Sequence[str], repeat: int) -> float:
    from limits import parse
    from limits.storage import MemoryStorage
    from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

    item = parse("5/second")

    def run() -> None:
        storage = MemoryStorage()
        limiter = (
            MovingWindowRateLimiter(storage)
            if strategy == "moving"
            else SlidingWindowCounterRateLimiter(storage)
        )
        hit = limiter.hit
        for key in stream:
            hit(item, key)

    return _best_rate(run, len(stream), repeat)


def throughput(impls: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each implementation starts from an empty limiter in every timed run."""
    results: dict[str, dict[str, float]] = {}
    for name, impl in impls.items():
        results[name] = {}
        n = args.limits_decisions if isinstance(impl, str) else args.decisions
        for label, keys in (("1_key", 1), ("100k_keys", ROTATING_KEYS)):
            stream = _key_stream(n, keys)
            if isinstance(impl, str):
                results[name][label] = _bench_limits(impl, stream, args.repeat)
            else:
                results[name][label] = _bench_table(impl, stream, args.repeat)
            del stream
            gc.collect()
    return results


def memory_per_key(module: Any, active: int) -> dict[str, float]:
    """Bytes per active key: RSS delta, and the table's slots * 16 bytes (native only)."""
    keys = [f"tenant-{i % 97}/client-{i}" for i in range(active)]
    rates = [RATE]
    bursts = [BURST]
    gc.collect()
    before = _rss_bytes()
    table = module.BucketTable(clock=lambda: 10**12, capacity_hint=0)  # time stands still
    acquire = table.acquire
    for key in keys:
        acquire([key], rates, bursts)
    gc.collect()
    after = _rss_bytes()
    assert len(table) == active, (len(table), active)
    return {
        "rss_bytes_per_key": (after - before) / active,
        "capacity": float(table.capacity),
        "slot_bytes_per_key": table.capacity * module.SLOT_BYTES / active,
    }


def memory_in_subprocess(which: str, active: int) -> dict[str, float]:
    """``memory_per_key`` in a fresh interpreter, so the RSS baseline is clean."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-of", which, "--active", str(active)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=500_000, help="per run, our tables")
    parser.add_argument("--limits-decisions", type=int, default=100_000, help="per run, limits")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--active", type=int, default=1_000_000)
    parser.add_argument("--memory-of", choices=["c", "py"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_of:  # the child of memory_in_subprocess
        module: Any = _buckets_py
        if args.memory_of == "c":
            from gateway import _buckets_c

            module = _buckets_c
        print(json.dumps(memory_per_key(module, args.active)))
        return 0

    impls: dict[str, Any] = {}
    try:
        from gateway import _buckets_c
    except ImportError as exc:
        print(f"native gateway._buckets_c not built ({exc}); no native figures", file=sys.stderr)
    else:
        impls["c"] = _buckets_c
    impls["py"] = _buckets_py
    impls["limits_moving"] = "moving"
    impls["limits_sliding"] = "sliding"

    rates = throughput(impls, args)
    print(f"{'implementation':<16} {'1 key':>14} {'100k keys':>14}   (decisions/s)")
    for name, row in rates.items():
        print(f"{name:<16} {row['1_key']:>14,.0f} {row['100k_keys']:>14,.0f}")

    summary: dict[str, Any] = {
        "bench": "bucket_limiter",
        "decisions_per_s": {k: {m: round(v) for m, v in row.items()} for k, row in rates.items()},
    }
    print()
    if "c" in rates:
        speedup = rates["c"]["100k_keys"] / rates["limits_moving"]["100k_keys"]
        speedup_1 = rates["c"]["1_key"] / rates["limits_moving"]["1_key"]
        py_speedup = rates["py"]["100k_keys"] / rates["limits_moving"]["100k_keys"]
        print(
            f"native vs limits moving window: x{speedup:.1f} on 100k keys "
            f"(target >= x{TARGET_SPEEDUP:.0f}: {'PASS' if speedup >= TARGET_SPEEDUP else 'FAIL'})"
            f", x{speedup_1:.1f} on 1 key; pure twin x{py_speedup:.1f} on 100k keys"
        )
        mem = memory_in_subprocess("c", args.active)
        worst = max(mem["rss_bytes_per_key"], mem["slot_bytes_per_key"])
        print(
            f"native memory, {args.active:,} active keys: "
            f"{mem['rss_bytes_per_key']:.1f} B/key (RSS delta), "
            f"{mem['slot_bytes_per_key']:.1f} B/key ({int(mem['capacity']):,} slots x 16 B) "
            f"(target <= {TARGET_BYTES_PER_KEY:.0f}: "
            f"{'PASS' if worst <= TARGET_BYTES_PER_KEY else 'FAIL'})"
        )
        py_mem = memory_in_subprocess("py", args.active)
        print(f"pure twin memory: {py_mem['rss_bytes_per_key']:.1f} B/key (RSS delta, a dict)")
        summary.update(
            speedup_vs_limits_moving_100k=round(speedup, 1),
            speedup_vs_limits_moving_1key=round(speedup_1, 1),
            native_bytes_per_key_rss=round(mem["rss_bytes_per_key"], 1),
            native_bytes_per_key_slots=round(mem["slot_bytes_per_key"], 1),
            py_bytes_per_key_rss=round(py_mem["rss_bytes_per_key"], 1),
            active_keys=args.active,
            targets_met=speedup >= TARGET_SPEEDUP and worst <= TARGET_BYTES_PER_KEY,
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
