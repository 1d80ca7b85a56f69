"""Parse the human units of the policy file: durations and byte sizes.

Both parsers raise ``ValueError`` with the expected form, which the policy
loader turns into an error naming the file, key path and line.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``30s``, ``15m``, ``1h``, ``90d``, ``250ms`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 30s, 15m, 1h or 90d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(value)
        if match is None:
            raise ValueError("a duration such as 30s, 15m, 1h or 90d")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if seconds < 0:
        raise ValueError("a duration that is not negative")
    return seconds


def parse_size(value: str | int) -> int:
    """Bytes from ``10MiB``, ``16KiB``, ``50MB`` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size such as 512KiB, 10MiB or 50MB")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(value)
        if match is None:
            raise ValueError("a size such as 512KiB, 10MiB or 50MB")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"])
    if size < 0:
        raise ValueError("a size that is not negative")
    return size
