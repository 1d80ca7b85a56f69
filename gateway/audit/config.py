"""Audit trail configuration: one frozen value, checked when it is built.

A bad value fails at construction (``ValueError``), at startup, never on the
first request: an audit writer that cannot write must not start serving.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

FsyncPolicy = Literal["batch", "always", "never"]
FailurePolicy = Literal["block", "deny"]

MIB = 1024 * 1024
DAY = 86_400.0

# The instance name becomes a directory name and part of the chain id, so it
# must not be able to walk out of the audit directory.
_INSTANCE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
# Short HMAC keys are guessable; a key is a secret, not a password.
MIN_KEY_BYTES = 16
DEFAULT_STREAM = "fairgate:audit"
DEFAULT_MAXLEN = 1_000_000


@dataclass(frozen=True, slots=True)
class SinkSpec:
    """One parsed sink URI."""

    kind: Literal["file", "stdout", "redis"]
    uri: str
    path: str = ""  # file: the base directory (relative to the working directory or absolute)
    url: str = ""  # redis: the connection URL without our own query parameters
    stream: str = DEFAULT_STREAM
    maxlen: int = DEFAULT_MAXLEN


def parse_sink(uri: str) -> SinkSpec:
    """``file://DIR``, ``stdout`` or ``redis://host:port/db?stream=S&maxlen=N``."""
    if uri == "stdout":
        return SinkSpec("stdout", uri)
    if uri.startswith("file://"):
        # Not urlsplit: in ``file://var/audit`` the "host" is part of a relative path.
        path = uri[len("file://") :]
        if not path or "\x00" in path:
            raise ValueError(f"audit sink {uri!r}: a file sink needs a directory")
        return SinkSpec("file", uri, path=path)
    if uri.startswith(("redis://", "rediss://")):
        parts = urlsplit(uri)
        if not parts.hostname:
            raise ValueError(f"audit sink {uri!r}: a redis sink needs a host")
        stream, maxlen, rest = DEFAULT_STREAM, DEFAULT_MAXLEN, []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name == "stream":
                if not value:
                    raise ValueError(f"audit sink {uri!r}: stream must not be empty")
                stream = value
            elif name == "maxlen":
                if not value.isdigit() or int(value) < 1:
                    raise ValueError(f"audit sink {uri!r}: maxlen must be a positive integer")
                maxlen = int(value)
            else:
                rest.append(f"{name}={value}")
        url = parts._replace(query="&".join(rest)).geturl()
        return SinkSpec("redis", uri, url=url, stream=stream, maxlen=maxlen)
    raise ValueError(f"audit sink {uri!r}: expected file://DIR, stdout or redis://HOST:PORT/DB")


def decode_key(text: str) -> bytes:
    """A key from an environment variable: ``hex:...``, ``base64:...`` or raw UTF-8."""
    try:
        if text.startswith("hex:"):
            return bytes.fromhex(text[4:])
        if text.startswith("base64:"):
            return base64.b64decode(text[7:], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"cannot decode the key: {exc}") from None
    return text.encode()


def _positive(name: str, value: float, *, integer: bool = False, zero: bool = False) -> None:
    # bool is an int subclass: ``queue_size=True`` is a typo, not a size of 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"audit {name} must be a number, not {value!r}")
    if integer and not isinstance(value, int):
        raise ValueError(f"audit {name} must be an integer, not {value!r}")
    if value < 0 or (value == 0 and not zero) or value != value:
        raise ValueError(f"audit {name} must be {'>= 0' if zero else '> 0'}, not {value!r}")


@dataclass(frozen=True, slots=True)
class AuditConfig:
    instance: str
    worker: int = 0
    sinks: tuple[str, ...] = ("file://var/audit",)
    rotate_bytes: int = 64 * MIB
    rotate_seconds: float = DAY
    retention_seconds: float = 90 * DAY
    fsync: FsyncPolicy = "batch"
    batch_size: int = 1024
    flush_interval: float = 0.2  # the policy's audit.flush
    queue_size: int = 10_000
    on_sink_failure: FailurePolicy = "block"
    checkpoint_interval: float = 60.0  # seconds between checkpoints ...
    checkpoint_every: int = 10_000  # ... or this many records, whichever comes first
    # HMAC-SHA256 key signing checkpoints; kept out of repr so logs never show it.
    checkpoint_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.instance, str) or not _INSTANCE.match(self.instance):
            raise ValueError(
                f"audit instance {self.instance!r}: 1-64 letters, digits, '.', '_', '-', "
                "not starting with '.' or '-'"
            )
        if isinstance(self.worker, bool) or not isinstance(self.worker, int) or self.worker < 0:
            raise ValueError(f"audit worker must be an integer >= 0, not {self.worker!r}")
        if not isinstance(self.sinks, tuple) or not self.sinks:
            raise ValueError("audit sinks must be a non-empty tuple of URIs")
        if len(set(self.sinks)) != len(self.sinks):
            raise ValueError("audit sinks must not repeat")
        specs = [parse_sink(s) for s in self.sinks]
        if sum(1 for s in specs if s.kind == "stdout") > 1:
            raise ValueError("audit sinks: stdout at most once")
        for name in ("rotate_bytes", "batch_size", "queue_size", "checkpoint_every"):
            _positive(name, getattr(self, name), integer=True)
        for name in ("rotate_seconds", "retention_seconds", "checkpoint_interval"):
            _positive(name, getattr(self, name))
        _positive("flush_interval", self.flush_interval, zero=True)
        if self.fsync not in ("batch", "always", "never"):
            raise ValueError(f"audit fsync must be batch, always or never, not {self.fsync!r}")
        if self.on_sink_failure not in ("block", "deny"):
            raise ValueError(
                f"audit on_sink_failure must be block or deny, not {self.on_sink_failure!r}"
            )
        if self.checkpoint_key is not None and (
            not isinstance(self.checkpoint_key, bytes) or len(self.checkpoint_key) < MIN_KEY_BYTES
        ):
            raise ValueError(f"audit checkpoint_key must be at least {MIN_KEY_BYTES} bytes")

    @property
    def chain_id(self) -> str:
        """One chain per writer: every worker of every instance has its own."""
        return f"{self.instance}-w{self.worker}"

    @property
    def sink_specs(self) -> tuple[SinkSpec, ...]:
        return tuple(parse_sink(s) for s in self.sinks)
