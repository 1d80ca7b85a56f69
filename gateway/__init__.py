"""Fairgate: a fair-usage and access-control API gateway.

The decision engine (``gateway.engine``) knows nothing of transport. Two
adapters serve it: the standalone reverse proxy (``gateway.proxy``) and the
ASGI middleware below, which guards an in-process app.

The names below are imported on first use, so that a process needing only a
part of the package (the audit writer process) does not load the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.middleware import Fairgate
    from gateway.policy import Policy, PolicyError, load_policy

__all__ = ["Fairgate", "Policy", "PolicyError", "__version__", "load_policy"]
__version__ = "0.1.0"

_LAZY = {
    "Fairgate": "gateway.middleware",
    "Policy": "gateway.policy",
    "PolicyError": "gateway.policy",
    "load_policy": "gateway.policy",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
