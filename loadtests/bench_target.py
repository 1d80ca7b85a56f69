"""Micro-benchmark of canonical_target: pure Python vs the native module.

    python loadtests/bench_target.py [--number N] [--repeat R]

Prints one line per (case, implementation) in ns per call (best of R runs of N
calls), then a JSON summary as the last line.  Build the native module first:
``python setup.py build_ext --inplace``.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # a source checkout

from gateway import _target_py

Canonical = Callable[[bytes, bytes], tuple[str, bytes, bytes]]

CASES: dict[str, tuple[bytes, bytes]] = {
    # The common case: no "%", forward_path is raw_path itself.
    "typical": (b"/crm/v1/acme/leads/1234", b"page=2"),
    # Longer, with escapes to decode and re-encode (the general path).
    "long_encoded": (
        b"/crm/v1/acme/contacts/98765/activities/2024-05-01/notes/caf%C3%A9-%20summary/"
        b"attachments/%5Bdraft%5D-report.pdf",
        b"page=2&per_page=50&sort=-created_at&filter=status%3Aopen&fields=id,name,email",
    ),
    # Longer but plain: the fast path over ~130 bytes.
    "long_plain": (
        b"/voip/v2/tenants/acme-corp/calls/2024/05/01/recordings/"
        b"c6f1e2d4-1b2a-4c3d-9e8f-0a1b2c3d4e5f/transcript/segments/0042",
        b"format=json&include=speakers,timestamps&lang=en-US",
    ),
}


def bench(func: Canonical, raw: bytes, query: bytes, number: int, repeat: int) -> float:
    """Best ns per call over ``repeat`` runs of ``number`` calls."""
    func(raw, query)  # warm up, and make sure the case is accepted
    timer = timeit.Timer(lambda: func(raw, query))
    best = min(timer.repeat(repeat=repeat, number=number))
    # Subtract the cost of the lambda call itself.
    empty = min(timeit.Timer(lambda: None).repeat(repeat=repeat, number=number))
    return max(best - empty, 0.0) / number * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    impls: dict[str, Canonical] = {"py": _target_py.canonical_target}
    try:
        from gateway import _target_c
    except ImportError as exc:
        print(f"native gateway._target_c not built ({exc}); timing py only", file=sys.stderr)
    else:
        impls["c"] = _target_c.canonical_target

    summary: dict[str, dict[str, float]] = {}
    for case, (raw, query) in CASES.items():
        results: dict[str, float] = {}
        for name, func in impls.items():
            results[f"{name}_ns"] = round(bench(func, raw, query, args.number, args.repeat), 1)
            print(f"{case:<14} {name:<3} {results[f'{name}_ns']:>9.1f} ns/call")
        if "c_ns" in results and results["c_ns"] > 0:
            results["speedup"] = round(results["py_ns"] / results["c_ns"], 1)
            print(f"{case:<14} speedup x{results['speedup']}")
        summary[case] = results
    print(json.dumps({"bench": "canonical_target", "number": args.number, "cases": summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
