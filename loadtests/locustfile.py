"""Locust scenarios: legitimate CRM/VoIP users mixed with abusive ones.

Run against `fairgate demo` (see loadtests/run_load.py, which starts both and
writes a report). Tokens are minted with the demo key, so the demo accepts
them. Each user class is one kind of traffic; the weights set the mix.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080
"""

from __future__ import annotations

import itertools
import random
import uuid

from locust import FastHttpUser, between, task

from gateway.demokey import mint_token

_ids = itertools.count(1)


def _token(
    roles: list[str], plan: str = "pro", tenant: str = "acme", sub: str | None = None
) -> str:
    return mint_token(
        sub=sub or f"load-{next(_ids)}", tenant=tenant, roles=roles, plan=plan, ttl=6 * 3600
    )


class Agent(FastHttpUser):
    """A CRM agent: browses leads, opens some, writes tickets, places calls."""

    weight = 10
    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        self.auth = {"Authorization": f"Bearer {_token(['agent'])}"}

    @task(6)
    def list_leads(self) -> None:
        self.client.get(
            f"/crm/v1/acme/leads?page={random.randint(1, 40)}",
            headers=self.auth,
            name="/crm/v1/acme/leads",
        )

    @task(4)
    def get_lead(self) -> None:
        self.client.get(
            f"/crm/v1/acme/leads/{random.randint(1001, 3000)}",
            headers=self.auth,
            name="/crm/v1/acme/leads/{id}",
        )

    @task(1)
    def ticket(self) -> None:
        self.client.post(
            "/crm/v1/acme/tickets",
            headers=self.auth,
            # Each ticket its own: the same body again and again is what the
            # duplicate-submission detector is for (the Spammer's behaviour).
            json={"subject": "help", "body": f"printer on fire, case {uuid.uuid4().hex[:12]}"},
        )

    @task(1)
    def call(self) -> None:
        # Call origination is single-use: a fresh token per call.
        fresh = {"Authorization": f"Bearer {_token(['agent'], sub='caller')}"}
        self.client.post("/voip/v1/acme/calls", headers=fresh, json={"to": "+15551234567"})


class Scraper(FastHttpUser):
    """Walks lead ids in sequence as fast as it is allowed to (free plan)."""

    weight = 2
    wait_time = between(0, 0.01)

    def on_start(self) -> None:
        self.auth = {"Authorization": f"Bearer {_token(['viewer'], plan='free')}"}
        self.next_id = 1001

    @task
    def walk(self) -> None:
        self.client.get(
            f"/crm/v1/acme/leads/{self.next_id}",
            headers=self.auth,
            name="/crm/v1/acme/leads/{id} (scraper)",
        )
        self.next_id += 1


class BruteForcer(FastHttpUser):
    """Forged tokens, over and over: the lockout should answer 429."""

    weight = 1
    wait_time = between(0, 0.05)

    @task
    def forge(self) -> None:
        forged = mint_token(
            sub="victim",
            tenant="acme",
            roles=["admin"],
            secret="guessed-secret-" + uuid.uuid4().hex,
        )
        self.client.get(
            "/crm/v1/acme/leads",
            headers={"Authorization": f"Bearer {forged}"},
            name="/crm/v1/acme/leads (forged)",
        )


class Prober(FastHttpUser):
    """Another tenant's data, admin routes, and ambiguous paths."""

    weight = 1
    wait_time = between(0.01, 0.1)
    targets = (
        "/crm/v1/globex/leads",
        "/crm/v1/acme/admin/users",
        "/crm/v1/acme/leads/..%2Fadmin",
        "/crm/v1/acme/leads;x=1",
        "/crm/v1/acme/%2e%2e/admin/users",
        "/crm/v1/acme/Admin/users",
    )

    def on_start(self) -> None:
        self.auth = {"Authorization": f"Bearer {_token(['agent'])}"}

    @task
    def probe(self) -> None:
        self.client.get(random.choice(self.targets), headers=self.auth, name="probe")


class Spammer(FastHttpUser):
    """Fans SMS out to many numbers on a free plan."""

    weight = 1
    wait_time = between(0, 0.02)

    def on_start(self) -> None:
        self.auth = {"Authorization": f"Bearer {_token(['agent'], plan='free')}"}

    @task
    def sms(self) -> None:
        self.client.post(
            "/voip/v1/acme/sms",
            headers=self.auth,
            json={"to": f"+1555{random.randint(1000000, 9999999)}", "text": "WIN!"},
        )
