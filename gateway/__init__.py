"""Fairgate: a fair-usage and access-control API gateway.

The decision engine (``gateway.engine``) knows nothing of transport. Two
adapters serve it: the standalone reverse proxy (``gateway.proxy``) and the
ASGI middleware below, which guards an in-process app.
"""

from __future__ import annotations

from gateway.middleware import Fairgate
from gateway.policy import Policy, PolicyError, load_policy

__all__ = ["Fairgate", "Policy", "PolicyError", "__version__", "load_policy"]
__version__ = "0.1.0"
