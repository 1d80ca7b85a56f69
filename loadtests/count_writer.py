"""Instructions per record in the audit writer process, under valgrind.

    python loadtests/count_writer.py [--records N] [--warmup W]

A ``WriterProcess`` is started with its process (``gateway.audit.sidecar``)
under valgrind's cachegrind, handed W and then, in a second run, W + N
records (a request's facts, as the proxy takes them), and closed; the
difference of the two processes' instruction totals over N is the cost of
one record in the writer: taking the batch off the socket, building and
sealing the record (canonical JSON, SHA-256, the chain), the checkpoints and
the file sink's writes and fsyncs (the kernel's share is not counted). The
worker's side is counted by ``count_server.py`` (setup ``audit``).

Valgrind hides the CPU's SHA extensions, so OpenSSL's SHA-256 takes its
generic path here: ~22 k instructions of a record's (callgrind, with
libcrypto's unnamed block function at its address), against a few hundred
cycles with the CPU's own. Debian's libcrypto is stripped, and cachegrind
lumps its code with orjson's, so it is not subtracted here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The gateway counted: this checkout, or a snapshot's (bench_proxy.py --gateway-root).
ROOT = Path(os.environ.get("FAIRGATE_GATEWAY_ROOT") or HERE.parent)
sys.path.insert(0, str(ROOT))


def facts(i: int) -> tuple[object, ...]:
    """The facts of a proxied request on plan ``pro`` (what ``bench_proxy.py`` sends)."""
    return (
        0,
        1234,
        "127.0.0.0/24",
        "127.0.0.1",
        "allow",
        False,
        0.000812 + i * 1e-9,
        "GET",
        "enforce",
        f"/t/acme/items/{i % 1000}",
        "pro",
        "4f1c2a9d0b7e",
        None,
        f"{i:032x}",
        ("agent",),
        "authed",
        None,
        "sess-1",
        (),
        200,
        "alice",
        "acme",
        time.time(),
        "up",
        200,
    )


async def run(count: int, work: Path, wrapper: Path) -> None:
    from gateway.audit.config import AuditConfig
    from gateway.audit.remote import WriterProcess

    config = AuditConfig(instance="count", sinks=(f"file://{work}",), checkpoint_key=b"k" * 32)
    # The writer process imports the same gateway as this one.
    os.environ["PYTHONPATH"] = str(ROOT)
    writer = WriterProcess(config, ip_key=b"p" * 32, python=str(wrapper))
    await writer.start()
    for i in range(count):
        if not writer.offer_facts(facts(i)):
            await writer.write_facts(facts(i))
    await writer.aclose()
    if writer.written != count:
        raise SystemExit(f"the writer wrote {writer.written} of {count} records")


def total(path: Path) -> int:
    """The instruction total of a cachegrind output."""
    for line in path.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise SystemExit(f"{path}: no summary line")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=2_000)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("counting needs valgrind (apt-get install valgrind)")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    work = Path(tempfile.mkdtemp(prefix="fairgate-writer-"))
    totals: dict[str, Path] = {}
    for label, count in (("w", args.warmup), ("n", args.warmup + args.records)):
        out = work / f"{label}.cachegrind"
        wrapper = work / f"python-{label}"
        wrapper.write_text(
            "#!/bin/sh\nexec valgrind --tool=cachegrind --cache-sim=no "
            f'--cachegrind-out-file={out} {sys.executable} "$@"\n'
        )
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
        asyncio.run(run(count, work / label, wrapper))
        totals[label] = out
    per = (total(totals["n"]) - total(totals["w"])) / args.records
    print(f"writer process: {per / 1000:.1f} kinstr per record (valgrind)")


if __name__ == "__main__":
    main()
