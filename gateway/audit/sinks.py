"""Where audit lines go: files (the authoritative copy), stdout, a Redis stream.

A sink either accepts a whole batch or raises; the writer retries a batch
only on the sinks that raised, so a healthy sink never gets a line twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import orjson

from gateway.audit.chain import FILE_GLOB, FILE_NAME, Record, is_hex64, last_record, records_after
from gateway.audit.config import AuditConfig, FsyncPolicy, SinkSpec

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("gateway.audit")
T = TypeVar("T")


@runtime_checkable
class Sink(Protocol):
    async def write_batch(self, lines: list[bytes]) -> None:
        """Accept every line or raise. An element may hold several lines (a
        run of records sealed at once); each line ends with a newline
        (``each_line`` splits them where a sink needs them one by one)."""

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class OpenableSink(Protocol):
    async def open(self) -> None:
        """Prepare (create directories, check access) before the first batch."""


@runtime_checkable
class ChainBoundSink(Protocol):
    def bind(self, chain_id: str) -> None:
        """Serve ``chain_id`` from now on (before open; releases a held chain)."""


@runtime_checkable
class ResumableSink(Protocol):
    async def last_record(self) -> Record | None:
        """The last record this sink holds of the writer's chain, to continue it."""


def each_line(lines: list[bytes]) -> Iterator[bytes]:
    """The lines of a batch one by one (a sealed line holds no raw newline:
    JSON escapes it)."""
    for chunk in lines:
        if chunk.count(b"\n") == 1:
            yield chunk
        else:
            yield from chunk.splitlines(keepends=True)


class ChainBusyError(OSError):
    """Another writer holds this chain: two writers on one chain would fork it
    (both continuing from the same head), which verify reports as tampering."""


LOCK_NAME = ".lock"


class FileSink:
    """JSON lines, one directory per chain: ``<dir>/<chain>/audit-<UTC time>-<n>.jsonl``.

    Each run writes to a new file (a line cut short by a crash stays at the
    end of its own file, never glued to the next record). Files rotate by
    size and age; files older than the retention are deleted. All file I/O
    runs on one dedicated thread, so fsync never blocks the event loop and
    operations on the file happen strictly in order; a cancelled await does
    not stop the thread, so a batch is always written whole.

    ``threaded=False`` does the I/O on the event loop itself instead (a batch
    is then written whole because the call never suspends): for an audit
    writer process, whose loop has nothing else to do meanwhile, a thread
    would only add its hand-overs (two thread switches and a future per batch,
    about a quarter of its cost per batch). The price: while a write or an
    fsync hangs (a stalled disk), that process's loop waits with it; its
    worker, hearing nothing, holds or refuses requests as ``on_sink_failure``
    says, as for any sink that does not answer.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        chain_id: str,
        *,
        rotate_bytes: int = 64 * 1024 * 1024,
        rotate_seconds: float = 86_400.0,
        retention_seconds: float = 90 * 86_400.0,
        fsync: FsyncPolicy = "batch",
        clock: Callable[[], float] = time.time,
        fsync_fn: Callable[[int], None] = os.fsync,
        threaded: bool = True,
    ) -> None:
        self.base = Path(directory)
        self.chain_id = chain_id
        self.directory = self.base / chain_id
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.retention_seconds = retention_seconds
        self.fsync = fsync
        self._clock = clock
        self._fsync_fn = fsync_fn  # an indirection, so tests can count fsyncs
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix=f"audit-{chain_id}") if threaded else None
        )
        self._fd = -1
        self._lock_fd = -1
        self._size = 0
        self._opened_at = 0.0
        self.current: Path | None = None

    @classmethod
    def from_config(
        cls,
        spec: SinkSpec,
        config: AuditConfig,
        clock: Callable[[], float] = time.time,
        *,
        threaded: bool = True,
    ) -> FileSink:
        return cls(
            spec.path,
            config.chain_id,
            rotate_bytes=config.rotate_bytes,
            rotate_seconds=config.rotate_seconds,
            retention_seconds=config.retention_seconds,
            fsync=config.fsync,
            clock=clock,
            threaded=threaded,
        )

    def __repr__(self) -> str:
        return f"FileSink({str(self.directory)!r})"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def bind(self, chain_id: str) -> None:
        if self._fd >= 0:
            raise RuntimeError("FileSink.bind() after the first write")
        self._unlock()
        self.chain_id = chain_id
        self.directory = self.base / chain_id

    async def open(self) -> None:
        await self._run(self._open_sync)

    async def last_record(self) -> Record | None:
        return await self._run(last_record, self.base, self.chain_id)

    async def records_after(self, seq: int) -> int:
        """Records (not checkpoints) of the chain after ``seq`` (on the sink's
        thread: after every write queued before)."""
        return await self._run(records_after, self.base, self.chain_id, seq)

    async def write_batch(self, lines: list[bytes]) -> None:
        await self._run(self._write_sync, lines)

    async def flush(self) -> None:
        await self._run(self._sync_sync)

    async def aclose(self) -> None:
        try:
            await self._run(self._close_sync)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = -1

    # -- on the sink's thread ------------------------------------------------

    def _open_sync(self) -> None:
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._lock()
        self._sweep(self._clock())

    def _lock(self) -> None:
        """Hold ``<chain>/.lock`` while open: one writer per chain, across
        processes and within one (the lock belongs to this open file)."""
        if self._lock_fd >= 0:
            return
        path = self.directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ChainBusyError(
                f"audit chain {self.chain_id} in {self.base} is already being written "
                f"(pid {holder}): give every writer its own instance/worker"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _write_sync(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        now = self._clock()
        if self._fd >= 0 and self._size > 0:
            too_big = self._size + len(data) > self.rotate_bytes
            if too_big or now - self._opened_at >= self.rotate_seconds:
                self._close_sync()
        if self._fd < 0:
            self._new_file(now)
        start = self._size
        try:
            if self.fsync == "always":
                for line in each_line(lines):
                    self._write_all(line)
                    self._fsync_fn(self._fd)
            else:
                self._write_all(data)
                if self.fsync == "batch":
                    self._fsync_fn(self._fd)
        except BaseException:
            # Take back the part of the batch that got out, so the writer's
            # retry neither duplicates nor glues a record to half a line.
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                # The file may now end in half a line: leave it there, where
                # verify will show it, and continue in a fresh file.
                self._close_sync(sync=False)
            raise
        self._size = start + len(data)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _sync_sync(self) -> None:
        if self._fd >= 0 and self.fsync != "never":
            self._fsync_fn(self._fd)

    def _close_sync(self, sync: bool = True) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if sync and self.fsync != "never":
                self._fsync_fn(fd)
        finally:
            os.close(fd)

    def _new_file(self, now: float) -> None:
        self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._lock()  # when used without open()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        number = 0
        for existing in self.directory.glob(FILE_GLOB):
            match = FILE_NAME.match(existing.name)
            if match:
                # Names must sort in write order (verify reads them by name),
                # even if the clock steps back: never a stamp before the last.
                stamp = max(stamp, match.group(1))
                number = max(number, int(match.group(2)))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        while True:
            number += 1
            path = self.directory / f"audit-{stamp}-{number:06d}.jsonl"
            try:
                self._fd = os.open(path, flags, 0o640)  # records are private
                break
            except FileExistsError:
                continue
        self.current, self._size, self._opened_at = path, 0, now
        if self.fsync != "never":
            self._sync_directory()
        self._sweep(now)

    def _sync_directory(self) -> None:
        # A new file's name is only durable once its directory is synced.
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            self._fsync_fn(fd)
        finally:
            os.close(fd)

    def _sweep(self, now: float) -> None:
        """Delete this chain's files older than the retention (never the current
        file). Other chains' directories are left to their own writers: an idle
        writer's open file may be old, and deleting it would lose its records."""
        cutoff = now - self.retention_seconds
        for path in self.directory.glob(FILE_GLOB):
            if path == self.current:
                continue
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    log.info("audit: retention deleted %s", path)
            except FileNotFoundError:
                continue


class StdoutSink:
    """JSON lines on stdout, for log collectors. Keeps no state, so no resume."""

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._stream = stream

    def _target(self) -> IO[bytes]:
        return self._stream if self._stream is not None else sys.stdout.buffer

    def _write(self, data: bytes) -> None:
        target = self._target()
        target.write(data)
        target.flush()

    async def write_batch(self, lines: list[bytes]) -> None:
        # A full pipe blocks the writing thread, never the event loop.
        await asyncio.to_thread(self._write, b"".join(lines))

    async def flush(self) -> None:
        await asyncio.to_thread(self._target().flush)

    async def aclose(self) -> None:
        await self.flush()  # stdout is not ours to close


class RedisStreamSink:
    """XADD each line (field ``record``) to a stream capped by ``MAXLEN ~ N``.

    A batch goes in one MULTI/EXEC, so it lands whole or not at all. If the
    connection drops after EXEC but before its reply, the retry adds the batch
    again: readers of the stream dedupe by (chain, seq).
    """

    RESUME_SCAN = 100_000  # entries searched back for this chain's last record

    def __init__(self, url: str, chain_id: str, *, stream: str, maxlen: int) -> None:
        from redis.asyncio import Redis  # optional dependency: only when configured

        self.stream = stream
        self.maxlen = maxlen
        self.chain_id = chain_id
        self._redis: Redis = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    @classmethod
    def from_config(cls, spec: SinkSpec, config: AuditConfig) -> RedisStreamSink:
        return cls(spec.url, config.chain_id, stream=spec.stream, maxlen=spec.maxlen)

    def __repr__(self) -> str:
        return f"RedisStreamSink({self.stream!r})"

    def bind(self, chain_id: str) -> None:
        self.chain_id = chain_id

    async def write_batch(self, lines: list[bytes]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for line in each_line(lines):
                pipe.xadd(
                    self.stream,
                    {"record": line.rstrip(b"\n")},
                    maxlen=self.maxlen,
                    approximate=True,
                )
            await pipe.execute()

    async def flush(self) -> None:
        return None  # every batch is acknowledged by Redis before write_batch returns

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def last_record(self) -> Record | None:
        """Search back through the shared stream for this chain's newest record."""
        upper: bytes | str = "+"
        seen = 0
        while seen < self.RESUME_SCAN:
            entries = await self._redis.xrevrange(self.stream, max=upper, min="-", count=500)
            if not entries:
                return None
            for _entry_id, fields in entries:
                seen += 1
                raw = (fields or {}).get(b"record")
                if raw is None:
                    continue
                try:
                    record = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if (
                    isinstance(record, dict)
                    and record.get("chain") == self.chain_id
                    and isinstance(record.get("seq"), int)
                    and is_hex64(record.get("hash"))
                ):
                    return record
            last_id = entries[-1][0]
            upper = "(" + (last_id.decode() if isinstance(last_id, bytes) else str(last_id))
        log.warning("audit: no record of %s in the last %d stream entries", self.chain_id, seen)
        return None


def build_sinks(
    config: AuditConfig, clock: Callable[[], float] = time.time, *, threaded: bool = True
) -> list[Sink]:
    """The sinks of ``config``; ``threaded=False``: file I/O on the event loop
    (``FileSink``), for a process that does nothing else."""
    sinks: list[Sink] = []
    for spec in config.sink_specs:
        if spec.kind == "file":
            sinks.append(FileSink.from_config(spec, config, clock, threaded=threaded))
        elif spec.kind == "stdout":
            sinks.append(StdoutSink())
        else:
            sinks.append(RedisStreamSink.from_config(spec, config))
    return sinks
