"""Step 6, standing: suspensions and terminations, set through the admin API."""

from __future__ import annotations

import httpx
from starlette.testclient import TestClient

from gateway.admin import create_admin_app
from gateway.proxy import Gateway
from tests.conftest import Stack, TokenFactory, default_policy


def test_suspend_terminate_and_lift(stack: Stack, token: TokenFactory) -> None:
    gateway = Gateway(default_policy(stack, relaxed=True))
    port = stack.servers.add(gateway)
    admin = TestClient(create_admin_app(gateway, None))
    root = {"Authorization": f"Bearer {token(sub='root', roles='gateway-admin')}"}
    url = f"http://127.0.0.1:{port}/crm/v1/acme/leads"
    alice = {"Authorization": f"Bearer {token()}"}
    assert httpx.get(url, headers=alice).status_code == 200

    assert (
        admin.post(
            "/bans", json={"target": "subject:alice", "action": "suspend", "for": "1h"}
        ).status_code
        == 401
    )
    assert admin.post("/bans", headers=alice, json={"target": "subject:alice"}).status_code == 403
    created = admin.post(
        "/bans",
        headers=root,
        json={
            "target": "subject:alice",
            "action": "suspend",
            "for": "1h",
            "reason": "spam complaints",
        },
    )
    assert created.status_code == 201
    refused = httpx.get(url, headers=alice)
    assert refused.status_code == 403
    assert refused.json()["reason"] == "suspended"
    assert "spam complaints" in refused.json()["detail"]
    assert 3500 < int(refused.headers["retry-after"]) <= 3600
    # Others are unaffected.
    bob = {"Authorization": f"Bearer {token(sub='bob')}"}
    assert httpx.get(url, headers=bob).status_code == 200

    listed = admin.get("/bans", headers=root).json()["bans"]
    assert [b["target"] for b in listed] == ["subject:alice"]
    admin.post(
        "/bans",
        headers=root,
        json={"target": "subject:alice", "action": "terminate", "reason": "fraud"},
    )
    terminated = httpx.get(url, headers=alice)
    assert terminated.status_code == 403 and terminated.json()["reason"] == "terminated"
    assert "retry-after" not in terminated.headers

    assert (
        admin.delete("/bans", headers=root, params={"target": "subject:alice"}).status_code == 200
    )
    assert httpx.get(url, headers=alice).status_code == 200
    assert (
        admin.delete("/bans", headers=root, params={"target": "subject:alice"}).status_code == 404
    )


def test_network_ban_applies_to_anonymous_traffic(stack: Stack, token: TokenFactory) -> None:
    gateway = Gateway(default_policy(stack, relaxed=True))
    port = stack.servers.add(gateway)
    gateway.bans.add("network:127.0.0.0/24", "suspend", 600, "sign-up flood")
    response = httpx.get(f"http://127.0.0.1:{port}/crm/v1/health")
    assert response.status_code == 403 and response.json()["reason"] == "suspended"


def test_bad_ban_requests_are_400(stack: Stack, token: TokenFactory) -> None:
    gateway = Gateway(default_policy(stack, relaxed=True))
    admin = TestClient(create_admin_app(gateway, None))
    root = {"Authorization": f"Bearer {token(sub='root', roles='gateway-admin')}"}
    for body in (
        {"target": "alice"},
        {"target": "subject:a", "action": "suspend"},
        {"target": "subject:a", "action": "exile"},
        {"target": "subject:a", "for": "soon"},
    ):
        response = admin.post("/bans", headers=root, json=body)
        assert response.status_code == 400, body
        assert response.json()["reason"] == "bad_request"


def test_same_subject_name_in_two_tenants_is_two_people(stack: Stack, token: TokenFactory) -> None:
    gateway = Gateway(default_policy(stack, relaxed=True))
    port = stack.servers.add(gateway)
    gateway.bans.add("subject:acme/alice", "suspend", 600, "acme's alice only")
    acme = {"Authorization": f"Bearer {token()}"}
    globex = {"Authorization": f"Bearer {token(tenant='globex')}"}
    assert httpx.get(f"http://127.0.0.1:{port}/crm/v1/acme/leads", headers=acme).status_code == 403
    assert (
        httpx.get(f"http://127.0.0.1:{port}/crm/v1/globex/leads", headers=globex).status_code == 200
    )
