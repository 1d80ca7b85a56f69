"""The audit writer process: ``python -m gateway.audit.sidecar FD``.

Each worker starts one (``gateway.audit.remote.WriterProcess``) and hands it
the record body of every finished request (its canonical JSON, written by the
worker without its place in the chain), a batch at a time, over the socket
``FD``. Here an ``AuditWriter`` seals each into the worker's chain (the
chain's values spliced in, SHA-256, checkpoints) and writes it to every sink,
each hand-over as it comes, files on this process's own loop; the worker
hears back what was written and whether the sinks are healthy. The worker's
requests never wait for any of it.

It ignores SIGINT, SIGTERM and SIGHUP: a signal meant for the gateway (a
Ctrl-C reaches the whole process group) must not cut the trail short. It ends
when the worker says ``close`` (drained, a final checkpoint) or when the
worker's end of the socket closes (the worker died: what reached this process
is still written, but without a final checkpoint, so ``verify`` reports the
truncation of whatever the worker had not handed over yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import socket
import sys
from typing import Any

from gateway.audit import frames
from gateway.audit.channel import FrameChannel, connect
from gateway.audit.sealer import RecordSealer
from gateway.audit.writer import AuditClosedError, AuditWriter

log = logging.getLogger("gateway.audit")

GC_THRESHOLD = (20_000, 20, 20)  # gateway.serve.GC_THRESHOLD
ORPHAN_DRAIN = 60.0  # seconds to write what a worker that died had handed over


def report(out: FrameChannel, writer: AuditWriter) -> None:
    if not out.is_closing():  # a worker that died hears nothing more
        out.write(status("status", writer))


def status(kind: str, writer: AuditWriter) -> bytes:
    return frames.encode(
        (
            kind,
            writer.written,
            writer.checkpoints,
            writer.failures,
            writer.sinks_ok,
            writer.written_seq,
            writer.chain_id,
        )
    )


async def serve(sock: socket.socket) -> int:
    out = await connect(sock)
    try:
        kind, fields, ip_key, after = await out.read()
    except (asyncio.IncompleteReadError, ConnectionError, frames.FrameError, ValueError):
        return 2  # the worker went away before it said what to write
    if kind != "open":
        log.critical("audit writer process: expected open, got %r", kind)
        return 2
    try:
        # The worker hands records over a batch at a time already (when
        # ``batch_size`` are waiting, or after ``flush_interval``): waiting
        # here for a fuller one would only delay them, so each hand-over is
        # written (and fsynced) as it comes.
        config = dataclasses.replace(frames.config_from(fields), flush_interval=0.0)
        sealer = RecordSealer(config.instance, bytes.fromhex(ip_key))
        writer = AuditWriter(
            config,
            facts_sealer=sealer.seal,
            bodies_sealer=sealer.seal_many,
            on_progress=lambda: report(out, writer),
            # Files are written on this process's loop: a thread would only
            # add its hand-overs, as nothing else here needs the loop meanwhile.
            threaded_io=False,
        )
        await writer.start()
    except Exception as exc:
        out.write(frames.encode(("failed", str(exc) or type(exc).__name__)))
        with contextlib.suppress(ConnectionError):
            await out.drain()
        return 1
    # A worker whose previous writer process died says where that one last
    # reported (its chain, the seq written): the records it wrote after that
    # are the first of those it had not reported, and are not to be written again.
    skip = None
    if after is not None and after[0] == writer.chain_id:
        skip = await writer.records_after(after[1])
    out.write(frames.encode(("ready", writer.chain_id, writer.written_seq, skip)))
    # As gateway.serve.run does for a worker: every object of a record dies by
    # reference counting, so the collector's young passes, at CPython's
    # default of one per 700 allocations, only walk the batches in flight
    # (~4 k instructions per record). Rarer passes, start-up objects frozen.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    timeout: float | None = None
    final = False
    code = 0
    try:
        while True:
            message = await out.read()
            if message[0] == "batch":
                await queue(writer, message[1])
            elif message[0] == "close":
                _, timeout, final = message
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        log.error(
            "audit: the worker of chain %s ended without closing its trail; "
            "writing what it handed over, without a final checkpoint",
            writer.chain_id,
        )
        # Bounded: an orphan must not hold the chain's lock for ever behind a
        # sink that stays down.
        timeout = ORPHAN_DRAIN
    except (frames.FrameError, AuditClosedError, ValueError, TypeError) as exc:
        log.critical("audit writer process for %s stops: %s", writer.chain_id, exc)
        code = 1
    except Exception as exc:  # MemoryError for a frame, say: what came is still written
        log.critical("audit writer process for %s stops", writer.chain_id, exc_info=exc)
        code = 1
    await writer.aclose(timeout, final=final)
    if not out.is_closing():
        out.write(status("closed", writer))
        with contextlib.suppress(ConnectionError):
            await out.drain()
    out.close()
    return code


async def queue(writer: AuditWriter, items: list[Any]) -> None:
    # As decode_batch gives them: a run of record bodies (Bodies) a run at a
    # time; facts (a list: the sealer takes it as it takes a snapshot tuple)
    # and records one at a time; with no room, one at a time, waiting.
    for item in items:
        kind = type(item)
        if kind is frames.Bodies:
            start = 0
            end = len(item)
            while start < end:
                start += writer.offer_bodies(item, start)
                if start < end:
                    await writer.write_facts(item[start])
                    start += 1
        elif kind is dict:
            await writer.write(item)
        elif not writer.offer_facts(item):
            await writer.write_facts(tuple(item))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m gateway.audit.sidecar FD", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sock = socket.socket(fileno=int(argv[1]))
    return asyncio.run(serve(sock))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
