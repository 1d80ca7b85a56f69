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
from gateway.native import select

__all__ = ["IMPLEMENTATION", "MAX_TARGET", "BadTarget", "canonical_target"]

CanonicalTarget = Callable[[bytes, bytes], tuple[str, bytes, bytes]]


_module, _implementation = select("_target")
canonical_target: CanonicalTarget = _module.canonical_target
MAX_TARGET: Final[int] = _module.MAX_TARGET
IMPLEMENTATION: Final[str] = _implementation  # "c" or "py"
