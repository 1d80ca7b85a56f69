"""The canonical request target: pick the native or the pure-Python implementation.

``canonical_target(raw_path, query) -> (path, forward_path, forward_query)``
decides, from the RAW request target (ASGI ``scope["raw_path"]`` and
``scope["query_string"]``), the decoded path that routing and authorization
use and the exact bytes forwarded upstream; anything malformed or ambiguous
raises :class:`BadTarget` (the gateway answers 400 ``bad_request_path``).
The rules are documented in ``gateway/_target_py.py``.

The native ``gateway._target_c`` is used unless ``FAIRGATE_NO_EXTENSIONS`` is
set to a non-empty value other than ``"0"``, or it cannot be imported.  Both
implementations raise the same :class:`BadTarget` class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from gateway._target_errors import BadTarget
from gateway.native import native

__all__ = ["IMPLEMENTATION", "MAX_TARGET", "BadTarget", "canonical_target"]

CanonicalTarget = Callable[[bytes, bytes], tuple[str, bytes, bytes]]


def _select() -> tuple[CanonicalTarget, int, str]:
    module = native("_target_c")
    if module is not None:
        return module.canonical_target, module.MAX_TARGET, "c"
    from gateway import _target_py

    return _target_py.canonical_target, _target_py.MAX_TARGET, "py"


_SELECTED = _select()
canonical_target: CanonicalTarget = _SELECTED[0]
MAX_TARGET: Final[int] = _SELECTED[1]
IMPLEMENTATION: Final[str] = _SELECTED[2]  # "c" or "py"
del _SELECTED
