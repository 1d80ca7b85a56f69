"""Stub for the native ``gateway._target_c`` (built from ext/_target_c.pyx)."""

from gateway._target_errors import BadTarget as BadTarget

__all__ = ["AMBIGUOUS_CODEPOINTS", "MAX_TARGET", "BadTarget", "canonical_target"]

MAX_TARGET: int
AMBIGUOUS_CODEPOINTS: frozenset[int]

def canonical_target(raw_path: bytes, query: bytes) -> tuple[str, bytes, bytes]: ...
