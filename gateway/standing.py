"""Standing (step 6): suspensions and terminations.

A ban names a subject (``subject:alice``) or a client network
(``network:203.0.113.0/24``, for anonymous traffic). A suspension ends; a
termination does not. Operators set them through the admin API or
``fairgate bans``; the enforcement ladder will set them too.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from gateway.context import RequestContext
from gateway.decision import Decision, deny


@dataclass(frozen=True, slots=True)
class Ban:
    target: str
    action: str  # suspend | terminate
    until: float | None  # None: until lifted (terminations)
    reason: str
    created: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class BanStore:
    def __init__(self) -> None:
        self._bans: dict[str, Ban] = {}

    def add(
        self, target: str, action: str, seconds: float | None, reason: str, now: float | None = None
    ) -> Ban:
        if not target.startswith(("subject:", "network:")) or len(target) > 300:
            raise ValueError("a target of subject:NAME or network:CIDR")
        if action not in ("suspend", "terminate"):
            raise ValueError("an action of suspend or terminate")
        if action == "suspend" and (seconds is None or seconds <= 0):
            raise ValueError("a positive duration for a suspension")
        now = time.time() if now is None else now
        until = None if action == "terminate" else now + float(seconds or 0)
        ban = Ban(target, action, until, reason[:500], now)
        self._bans[target] = ban
        return ban

    def __len__(self) -> int:
        return len(self._bans)

    def lift(self, target: str) -> bool:
        return self._bans.pop(target, None) is not None

    def active(self, now: float) -> list[Ban]:
        self._bans = {k: b for k, b in self._bans.items() if b.until is None or b.until > now}
        return list(self._bans.values())

    def find(self, target: str, now: float) -> Ban | None:
        ban = self._bans.get(target)
        if ban is not None and ban.until is not None and ban.until <= now:
            del self._bans[target]
            return None
        return ban


def standing(req: RequestContext, bans: BanStore, now: float) -> Decision | None:
    if not bans:  # the common case: nobody is banned, so no string building
        return None
    identity, client = req.identity, req.client
    if identity is not None:
        # An operator may ban a name everywhere (subject:alice) or in one
        # tenant (subject:acme/alice, which is what the ladder sets).
        ban = bans.find(f"subject:{identity.key}", now) or bans.find(
            f"subject:{identity.subject}", now
        )
    else:
        ban = bans.find(f"network:{client.network}", now) if client else None
    if ban is None:
        return None
    if ban.action == "terminate":
        return deny("terminated", f"Access is terminated: {ban.reason}", rule="standing")
    assert ban.until is not None
    return deny(
        "suspended",
        f"Access is suspended: {ban.reason}",
        retry_after=max(1, math.ceil(ban.until - now)),
        rule="standing",
    )
