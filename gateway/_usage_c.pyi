"""Stub for the native ``gateway._usage_c`` (built from ext/_usage_c.pyx)."""

from gateway.context import RequestContext
from gateway.decision import Decision
from gateway.policy.model import Policy
from gateway.usage.meter import Meter

def fair_usage(req: RequestContext, policy: Policy, meter: Meter) -> Decision | None: ...
def charge(meter: Meter, req: RequestContext) -> None: ...
def leave(meter: Meter, keys: tuple[str, ...]) -> None: ...
