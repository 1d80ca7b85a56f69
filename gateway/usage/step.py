"""Step 8, fair usage: pick the native or the pure-Python step.

``fair_usage(req, policy, meter) -> Decision | None`` checks every limit of a
request together, all or nothing (see ``gateway/_usage_py.py`` for the
order and the rules). The native ``gateway._usage_c`` (ext/_usage_c.pyx) runs
the same step in one C call on the same state, with identical results (and
``charge`` and ``leave``, which end a metered request); it is
used unless ``FAIRGATE_NO_EXTENSIONS`` is set to a non-empty value other
than ``"0"``, or it cannot be imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from gateway.context import RequestContext
from gateway.decision import Decision
from gateway.native import select
from gateway.policy.model import Policy
from gateway.usage.meter import Meter

__all__ = ["IMPLEMENTATION", "charge", "fair_usage", "leave"]

Step = Callable[[RequestContext, Policy, Meter], "Decision | None"]
Charge = Callable[[Meter, RequestContext], None]
Leave = Callable[[Meter, tuple[str, ...]], None]


_module, _implementation = select("_usage")
fair_usage: Final[Step] = _module.fair_usage
# Once the response is out (or the request failed): bytes to the bandwidth
# counter, in-flight slots given back.
charge: Final[Charge] = _module.charge
leave: Final[Leave] = _module.leave
IMPLEMENTATION: Final[str] = _implementation  # "c" or "py"
