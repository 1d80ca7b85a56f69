"""Native modules or their pure-Python twins: one switch for all of them.

Each ``ext/NAME.pyx`` builds ``gateway.NAME``, and its twin lives in
``gateway/``. ``native(NAME)`` is the built module, or ``None`` (take the
twin) when ``FAIRGATE_NO_EXTENSIONS`` is set to a non-empty value other than
``"0"`` or the module was not built. ``select(STEM)`` does the choosing for
every module pair ``gateway.STEM_c`` / ``gateway.STEM_py``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def extensions_enabled() -> bool:
    flag = os.environ.get("FAIRGATE_NO_EXTENSIONS", "")
    return not flag or flag == "0"


def native(name: str) -> ModuleType | None:
    if not extensions_enabled():
        return None
    try:
        return importlib.import_module(f"gateway.{name}")
    except ImportError:
        return None


def select(stem: str) -> tuple[ModuleType, str]:
    """``(gateway.<stem>_c, "c")``, or ``(gateway.<stem>_py, "py")``: its twin."""
    module = native(f"{stem}_c")
    if module is not None:
        return module, "c"
    return importlib.import_module(f"gateway.{stem}_py"), "py"
