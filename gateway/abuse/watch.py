"""Step 9: abuse detectors raise signals; the enforcement ladder acts on them.

Detectors watch what a gateway can observe of the behaviours the usage
policies prohibit: scraping (many distinct objects, ids walked in sequence),
account sharing (one subject from many networks or devices, more live
sessions than the plan's seats), spam (one subject fanning messages out to
many recipients), duplicate submissions (the same body again and again),
and probing (many refusals). A signal from a detector in ``mode: shadow`` is
only recorded; one in ``mode: enforce`` is an offense, and the ladder
answers offenses with warn, throttle, suspend, terminate.
"""

from __future__ import annotations

import hashlib
import math

import orjson

from gateway.abuse.windows import Distinct, Events
from gateway.buckets import BucketTable
from gateway.context import RequestContext
from gateway.decision import Decision, deny
from gateway.policy.model import Policy
from gateway.standing import BanStore

# Refusals that mean "looking where one may not": not those that answer a
# ban or a limit, or a suspended scraper would escalate itself by knocking.
PROBE_REASONS = frozenset(
    {
        "bad_request_path",
        "unauthenticated",
        "forbidden",
        "tenant_mismatch",
        "route_not_found",
        "method_not_allowed",
    }
)


class AbuseWatch:
    def __init__(self, bans: BanStore) -> None:
        self.bans = bans
        self.objects = Distinct()
        self.runs: dict[str, tuple[int, int]] = {}  # who -> (last object id, run length)
        self.networks = Distinct()
        self.devices = Distinct()
        self.sessions = Distinct()
        self.recipients = Distinct()
        self.bodies = Events()
        self.refusals = Events()
        self.offenses = Events()
        self.throttled: dict[str, float] = {}
        self.throttle = BucketTable()

    # -- the three hooks ----------------------------------------------------------------------

    def observe(self, req: RequestContext, policy: Policy, now: float) -> Decision | None:
        """Before forwarding: detectors that need no body, then the ladder."""
        d, identity, route = policy.detectors, req.identity, req.route
        signals: list[tuple[str, str]] = []
        if identity is not None and route is not None:
            who = identity.key
            if (
                d.scraping_mode
                and route.object_param
                and self._scraping(who, req.params[route.object_param], policy, now)
            ):
                signals.append(("scraping", d.scraping_mode))
            if d.sharing_mode and self._sharing(req, policy, now):
                signals.append(("account_sharing", d.sharing_mode))
        return self._enforce(req, policy, signals, now)

    def inspect_body(
        self, req: RequestContext, policy: Policy, body: bytes, now: float
    ) -> Decision | None:
        """Before forwarding, for routes whose body a detector reads."""
        d, identity, route = policy.detectors, req.identity, req.route
        if identity is None or route is None:
            return None
        who = identity.key
        signals: list[tuple[str, str]] = []
        if d.spam_mode and d.fan_out and route.id in d.fan_out_routes:
            recipient = _json_field(body, d.fan_out_field)
            if recipient is not None:
                count = self.recipients.add(who, recipient, now, d.fan_out.per, d.fan_out.max + 1)
                if count > d.fan_out.max:
                    signals.append(("spam", d.spam_mode))
        if d.duplicates_mode and d.duplicates and route.id in d.duplicate_routes:
            digest = hashlib.sha256(body).hexdigest()[:32]
            count = self.bodies.add(f"{who}\x1f{route.id}\x1f{digest}", now, d.duplicates.per)
            if count > d.duplicates.max:
                signals.append(("duplicate_submission", d.duplicates_mode))
        if not signals:
            return None
        return self._enforce(req, policy, signals, now, check_throttle=False)

    def after(self, req: RequestContext, policy: Policy, now: float) -> None:
        """Once the response is out: count refusals, for probing."""
        d = policy.detectors
        if not d.probing_mode or d.refusals is None or req.refusal is None:
            return
        if req.refusal.reason not in PROBE_REASONS:
            return
        who = _who(req)
        if self.refusals.add(who, now, d.refusals.per) > d.refusals.max:
            self._offend(req, policy, [("probing", d.probing_mode)], now, who)

    # -- detectors ----------------------------------------------------------------------------

    def _scraping(self, who: str, obj: str, policy: Policy, now: float) -> bool:
        d = policy.detectors
        flagged = False
        if d.distinct_objects is not None:
            w = d.distinct_objects
            flagged = self.objects.add(who, obj, now, w.per, w.max + 1) > w.max
        if d.sequential_run is not None and obj.isdigit() and len(obj) < 19:
            last, run = self.runs.get(who, (-2, 0))
            value = int(obj)
            run = run + 1 if value == last + 1 else 1
            if len(self.runs) > 200_000:
                self.runs.clear()  # bounded: losing runs only delays a signal
            self.runs[who] = (value, run)
            flagged = flagged or run >= d.sequential_run
        return flagged

    def _sharing(self, req: RequestContext, policy: Policy, now: float) -> bool:
        d, identity, client = policy.detectors, req.identity, req.client
        assert identity is not None
        who = identity.key
        flagged = False
        if d.distinct_networks is not None and client is not None:
            w = d.distinct_networks
            flagged = self.networks.add(who, client.network, now, w.per, w.max + 1) > w.max
        if d.distinct_devices is not None:
            agent = next((v for k, v in req.headers if k == b"user-agent"), b"")
            device = hashlib.sha256(agent).hexdigest()[:16]
            w = d.distinct_devices
            flagged = self.devices.add(who, device, now, w.per, w.max + 1) > w.max or flagged
        plan = policy.plans.get(identity.plan) if identity.plan else None
        if plan is not None and plan.seats is not None and identity.session is not None:
            live = self.sessions.add(who, identity.session, now, d.seats_per, plan.seats + 1)
            flagged = live > plan.seats or flagged
        return flagged

    # -- the ladder ---------------------------------------------------------------------------

    def _enforce(
        self,
        req: RequestContext,
        policy: Policy,
        signals: list[tuple[str, str]],
        now: float,
        check_throttle: bool = True,
    ) -> Decision | None:
        who = _who(req)
        if signals:
            decision = self._offend(req, policy, signals, now, who)
            if decision is not None:
                return decision
        if check_throttle and self.throttled and policy.ladder is not None:
            return self._throttle(who, policy, now)
        return None

    def _offend(
        self,
        req: RequestContext,
        policy: Policy,
        signals: list[tuple[str, str]],
        now: float,
        who: str,
    ) -> Decision | None:
        enforced = [name for name, mode in signals if mode == "enforce"]
        req.signals.extend(
            name if mode == "enforce" else f"shadow:{name}" for name, mode in signals
        )
        ladder = policy.ladder
        if not enforced or ladder is None:
            return None
        offenses = self.offenses.add(who, now, ladder.window)
        rung = ladder.rung_for(offenses)
        if rung is None:
            return None
        names = ", ".join(enforced)
        target = f"subject:{who}" if req.identity else f"network:{who}"
        if rung.action == "warn":
            req.response_headers.append((b"fairgate-warning", names.encode()))
        elif rung.action == "throttle":
            assert rung.seconds is not None
            self.throttled[who] = max(self.throttled.get(who, 0.0), now + rung.seconds)
            req.response_headers.append((b"fairgate-warning", f"{names}; throttled".encode()))
        elif rung.action == "suspend":
            assert rung.seconds is not None
            self.bans.add(target, "suspend", rung.seconds, f"{names} (offense {offenses})", now)
            return deny(
                "suspended",
                f"Access is suspended for {names}.",
                retry_after=max(1, math.ceil(rung.seconds)),
                rule=f"ladder.{names}",
            )
        else:
            self.bans.add(target, "terminate", None, f"{names} (offense {offenses})", now)
            return deny("terminated", f"Access is terminated for {names}.", rule=f"ladder.{names}")
        return None

    def _throttle(self, who: str, policy: Policy, now: float) -> Decision | None:
        until = self.throttled.get(who)
        if until is None:
            return None
        if until <= now:
            del self.throttled[who]
            return None
        ladder = policy.ladder
        assert ladder is not None
        verdict = self.throttle.acquire(
            [f"throttle\x1f{who}"], [ladder.throttle_rate], [ladder.throttle_burst], 1
        )
        if verdict.allowed:
            return None
        return deny(
            "rate_limited",
            "Throttled after repeated policy violations.",
            retry_after=max(1, math.ceil(verdict.retry_after)),
            rule="ladder.throttle",
        )


def _who(req: RequestContext) -> str:
    if req.identity is not None:
        return req.identity.key
    return req.client.network if req.client else "?"


def _json_field(body: bytes, field: str) -> str | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = data.get(field) if isinstance(data, dict) else None
    return str(value)[:256] if isinstance(value, str | int) else None
