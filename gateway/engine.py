"""The decision engine: the request pipeline, top to bottom, in one place.

The engine knows nothing of transport. It takes a ``RequestContext`` and
returns ``None`` (forward it) or a ``Decision`` (refuse it). The standalone
proxy and the ASGI middleware both drive this same engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway import metrics, steps
from gateway.abuse.watch import AbuseWatch
from gateway.auth import Authenticator, JwksRegistry
from gateway.context import RequestContext
from gateway.decision import Decision
from gateway.policy.model import Policy
from gateway.standing import BanStore, standing
from gateway.state import IdentityState, MemoryIdentityState
from gateway.usage.meter import Meter
from gateway.usage.step import fair_usage

Clock = Callable[[], float]


class Engine:
    def __init__(
        self,
        policy: Policy,
        *,
        clock: Clock = time.time,
        state: IdentityState | None = None,
        jwks: JwksRegistry | None = None,
        meter: Meter | None = None,
        bans: BanStore | None = None,
        abuse: AbuseWatch | None = None,
    ) -> None:
        # ``is None``, not ``or``: an empty store is falsy but must be shared.
        self.bans = BanStore() if bans is None else bans
        self.abuse = AbuseWatch(self.bans) if abuse is None else abuse
        self.meter = Meter() if meter is None else meter
        self.clock = clock
        self.policy = policy
        self.state = MemoryIdentityState(policy.lockout) if state is None else state
        self.authenticator = Authenticator(policy, self.state, jwks)

    async def decide(self, req: RequestContext) -> Decision | None:
        policy = self.policy
        now = self.clock()
        # 2. The client address first: it never refuses, and every refusal
        # after it (even of a malformed target) is then attributed to a client.
        steps.client(req, policy)
        decision = (
            steps.framing(req, policy)  # size limits, body framing
            or steps.target(req)  # 1. canonical target
            or steps.route(req, policy)  # 3. route
            or steps.maintenance(req, policy, now)  # 4. maintenance
            or await steps.authenticate(req, self.authenticator, now)  # 5. authentication
            or standing(req, self.bans, now)  # 6. standing
            or steps.authorize(req, policy)  # 7. authorization
            or steps.single_use(req, self.authenticator, now)  # replay of single-use tokens
            # 9 before 8: a request the ladder refuses (throttle, suspension)
            # must not consume the plan's tokens and quotas.
            or self.abuse.observe(req, policy, now)  # 9. abuse signals and the ladder
            or fair_usage(req, policy, self.meter)  # 8. fair usage
        )
        if decision is None:
            steps.spend_single_use(req, self.authenticator)
        return decision

    def after(self, req: RequestContext) -> None:
        """Once the response is out (both adapters): count the request, and
        feed its refusal, if any, to the probing detector."""
        metrics.observe(req, time.perf_counter() - req.started)
        self.abuse.after(req, self.policy, self.clock())
