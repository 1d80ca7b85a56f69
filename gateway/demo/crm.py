"""Demo CRM upstream: leads, contacts, campaigns, tickets and admin users per tenant."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import partial

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.demo._common import (
    EXCEPTION_HANDLERS,
    Collection,
    JSONResponse,
    Record,
    Tenants,
    check_fields,
    created,
    echo_routes,
    invalid,
    not_found,
    paginate,
    read_object,
    subject,
    upload,
)

SEED_TENANTS = ("acme", "globex")
FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Linus", "Margaret", "Ken")
LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Torvalds", "Hamilton", "Ritchie")
OWNERS = ("alice", "bob", "carol", "dave")
STATUSES = ("new", "contacted", "qualified", "won", "lost")
ROLES = ("admin", "agent", "viewer")
EXPORT_BATCH = 200  # lines per streamed chunk: small enough to stream, big enough to be cheap


@dataclass(frozen=True)
class Kind:
    """One resource type: where it lives, its first id and how it is created."""

    name: str
    path: str
    first_id: int
    required: tuple[str, ...] = ()  # empty: not creatable through the API
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # optional enum fields
    owner_field: str = "owner"
    defaults: Mapping[str, str] = field(default_factory=dict)


LEADS = Kind("leads", "leads", 1001, ("name", "email"), {"status": STATUSES})
KINDS = (
    LEADS,
    Kind("contacts", "contacts", 5001, ("name", "email")),
    Kind("campaigns", "campaigns", 1),
    Kind("tickets", "tickets", 1, ("subject", "body"), {}, "created_by", {"status": "open"}),
    Kind("users", "admin/users", 1, ("email",), {"role": ROLES}, "created_by", {"role": "agent"}),
)


def _name(i: int) -> str:
    return f"{FIRST[i % len(FIRST)]} {LAST[(i // len(FIRST)) % len(LAST)]}"


def seed(store: Tenants, tenant: str) -> None:
    """Deterministic data (no randomness) so tests and demos can rely on exact values."""
    leads = store(tenant, "leads")
    for i in range(2000):
        email = f"lead{leads.next_id}@example.com"
        owner, status = OWNERS[i % len(OWNERS)], STATUSES[i % len(STATUSES)]
        leads.add({"name": _name(i), "email": email, "owner": owner, "status": status})
    contacts = store(tenant, "contacts")
    for i in range(500):
        email = f"contact{contacts.next_id}@example.com"
        contacts.add({"name": _name(i + 3), "email": email, "owner": OWNERS[i % len(OWNERS)]})
    for i in range(12):
        store(tenant, "campaigns").add({"name": f"Campaign {i + 1}", "status": "draft"})
    for i in range(25):
        ticket = {"subject": f"Issue #{i + 1}", "body": "It does not work.", "status": "open"}
        store(tenant, "tickets").add({**ticket, "created_by": OWNERS[i % len(OWNERS)]})
    for i, owner in enumerate(OWNERS):
        store(tenant, "users").add({"email": f"{owner}@{tenant}.example", "role": ROLES[i % 3]})


def validate(body: Record | None, kind: Kind, required: tuple[str, ...]) -> list[str]:
    errors = check_fields(body, required, (*kind.required, *kind.choices))
    for name, allowed in kind.choices.items():
        if not errors and body and name in body and body[name] not in allowed:
            errors.append(f"{name} must be one of {', '.join(allowed)}")
    return errors


class CRM:
    def __init__(self) -> None:
        self.store = Tenants({kind.name: kind.first_id for kind in KINDS})
        for tenant in SEED_TENANTS:
            seed(self.store, tenant)

    def coll(self, request: Request, kind: Kind) -> Collection:
        return self.store(request.path_params["tenant"], kind.name)

    async def list_of(self, request: Request, kind: Kind) -> Response:
        return paginate(request, self.coll(request, kind).items.values())

    async def get_one(self, request: Request, kind: Kind) -> Response:
        record = self.coll(request, kind).get(request.path_params["item_id"])
        return JSONResponse(record) if record else not_found()

    async def create(self, request: Request, kind: Kind) -> Response:
        body = await read_object(request)
        errors = validate(body, kind, kind.required)
        if errors or body is None:
            return invalid(errors)
        # Enum fields start at their first value; the gateway's caller owns what it creates.
        defaults = {name: allowed[0] for name, allowed in kind.choices.items()}
        record = {**defaults, **kind.defaults, **body, kind.owner_field: subject(request)}
        record = self.coll(request, kind).add(record)
        return created(record, f"{request.url.path}/{record['id']}")

    async def update_lead(self, request: Request) -> Response:
        lead = self.coll(request, LEADS).get(request.path_params["item_id"])
        if lead is None:
            return not_found()
        body = await read_object(request)
        # PUT replaces the editable fields (so name/email are required); PATCH merges.
        errors = validate(body, LEADS, LEADS.required if request.method == "PUT" else ())
        if errors or body is None:
            return invalid(errors)
        if request.method == "PUT":
            body.setdefault("status", STATUSES[0])
        lead.update(body)
        return JSONResponse(lead)

    async def delete_lead(self, request: Request) -> Response:
        if self.coll(request, LEADS).items.pop(request.path_params["item_id"], None) is None:
            return not_found()
        return Response(status_code=204)

    async def send_campaign(self, request: Request) -> Response:
        campaign = self.store(request.path_params["tenant"], "campaigns").get(
            request.path_params["item_id"]
        )
        if campaign is None:
            return not_found()
        leads = self.coll(request, LEADS).items.values()
        queued = sum(1 for lead in leads if lead["status"] not in ("won", "lost"))
        campaign["status"] = "sent"
        return JSONResponse({"campaign": campaign["id"], "queued": queued}, status_code=202)

    async def export(self, request: Request) -> Response:
        # Snapshot first so concurrent writes cannot break iteration mid-stream.
        leads = list(self.coll(request, LEADS).items.values())

        async def lines() -> AsyncIterator[bytes]:
            for start in range(0, len(leads), EXPORT_BATCH):
                batch = leads[start : start + EXPORT_BATCH]
                yield b"".join(orjson.dumps(lead) + b"\n" for lead in batch)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def signup(self, request: Request) -> Response:
        body = await read_object(request)
        errors = check_fields(body, ("company", "email"))
        if errors or body is None:
            return invalid(errors)
        base = re.sub(r"[^a-z0-9]+", "-", body["company"].lower()).strip("-")
        if not base:
            return invalid(["company must contain letters or digits"])
        slug, n = base, 1
        while slug in self.store.data:  # never hand out an existing tenant
            n += 1
            slug = f"{base}-{n}"
        admin = {"email": body["email"], "role": "admin", "created_by": "signup"}
        self.store(slug, "users").add(admin)
        response = {"tenant": slug, "company": body["company"]}
        return created(response, f"/crm/v1/{slug}/admin/users")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app() -> Starlette:
    crm = CRM()
    t = "/crm/v1/{tenant}"
    item = "{item_id:int}"
    routes = [
        Route("/crm/v1/health", health),
        Route("/crm/v1/signup", crm.signup, methods=["POST"]),
        Route(f"{t}/leads/{item}", crm.update_lead, methods=["PUT", "PATCH"]),
        Route(f"{t}/leads/{item}", crm.delete_lead, methods=["DELETE"]),
        Route(f"{t}/campaigns/{item}/send", crm.send_campaign, methods=["POST"]),
        Route(f"{t}/export", crm.export),
        Route(f"{t}/import", upload, methods=["POST"]),
        *echo_routes("crm"),
    ]
    # partial() of bound async methods: Starlette unwraps partials to detect async endpoints.
    for kind in KINDS:
        routes.append(Route(f"{t}/{kind.path}", partial(crm.list_of, kind=kind)))
        routes.append(Route(f"{t}/{kind.path}/{item}", partial(crm.get_one, kind=kind)))
        if kind.required:
            create = partial(crm.create, kind=kind)
            routes.append(Route(f"{t}/{kind.path}", create, methods=["POST"]))
    app = Starlette(routes=routes, exception_handlers=dict(EXCEPTION_HANDLERS))
    # An upstream should answer the path it was given, not redirect to a "fixed" one.
    app.router.redirect_slashes = False
    return app
