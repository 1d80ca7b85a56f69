"""An audit record from the facts of a finished request (``Snapshot``).

The pure-Python definition of the record: ``record_from`` builds it, and
``Chain.seal`` gives it its place in the chain. ``gateway/_records_py.py``
seals a snapshot this way; its native twin ``gateway._records_c``
(ext/_records_c.pyx) writes the very same line directly.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

from gateway.audit.privacy import pseudonymize

# What a record is built from: strings, numbers, None and tuples of them only.
# Such a tuple is untracked by the garbage collector once it survives a
# collection, so records waiting in the writer's queue add nothing to the
# collector's work (holding the request itself would: ~8 µs per request).
Snapshot = tuple[Any, ...]


@lru_cache(maxsize=65536)
def pseudonym(ip: str, key: bytes) -> str:
    # An HMAC per request is measurable; clients repeat, so keep the answers.
    return pseudonymize(ip, key)


_second: list[Any] = [None, ""]


def timestamp(now: float) -> str:
    """ISO 8601 UTC with milliseconds; the part up to the second is reused."""
    whole = int(now)
    if _second[0] != whole:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


def record_from(facts: Snapshot, *, instance: str, ip_key: bytes) -> dict[str, Any]:
    """The audit record of a snapshot.

    The keys are in canonical (sorted) order at every level, with ``chain``,
    ``prev`` and ``seq`` as placeholders for the writer, so sealing can skip
    the sort (``Chain.seal(presorted=True)``).
    """
    (
        bytes_in,
        bytes_out,
        network,
        ip,
        decision,
        degraded,
        latency,
        method,
        mode,
        path,
        plan,
        policy_rev,
        reason,
        request_id,
        roles,
        route,
        rule,
        session,
        signals,
        status,
        subject,
        tenant,
        ts,
        upstream,
        upstream_status,
    ) = facts
    return {
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "chain": None,
        "client": {
            "network": network,
            "pseudonym": pseudonym(ip, ip_key) if ip is not None else None,
        },
        "decision": decision,
        "degraded": degraded,
        "instance": instance,
        # Rounded here, not on the request's path: round() to 3 places
        # formats and parses the float, ~1.7 k instructions.
        "latency_ms": round(latency * 1000, 3),
        "method": method,
        "mode": mode,
        "path": path,
        "plan": plan,
        "policy_rev": policy_rev,
        "prev": None,
        "reason": reason,
        "request_id": request_id,
        "roles": roles,  # tuples: orjson writes them as arrays
        "route": route,
        "rule": rule,
        "seq": None,
        "session": session,
        "signals": signals,
        "status": status,
        "subject": subject,
        "tenant": tenant,
        "ts": timestamp(ts),
        "upstream": upstream,
        "upstream_status": upstream_status,
    }
