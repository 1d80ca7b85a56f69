"""Stub for the native ``gateway._facts_c`` (built from ext/_facts_c.pyx)."""

from gateway.audit.records import Snapshot
from gateway.context import RequestContext
from gateway.policy.model import Policy

def snapshot(
    req: RequestContext,
    policy: Policy,
    *,
    degraded: bool = False,
    now: float | None = None,
    finished: float | None = None,
) -> Snapshot: ...
