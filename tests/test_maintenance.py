"""Maintenance windows, with an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx

from gateway.policy import load_policy_text
from gateway.proxy import Gateway
from tests.conftest import Stack

POLICY = """
version: 1
upstreams:
  crm: {url: "http://127.0.0.1:%d"}
routes:
  - {id: health, methods: [GET], path: /crm/v1/health, upstream: crm, public: true}
maintenance:
  - {upstream: crm, start: "2026-12-01T02:00:00Z", end: "2026-12-01T04:00:00Z",
     message: "CRM upgrade, back at 04:00 UTC."}
"""


def _at(stack: Stack, when: datetime) -> httpx.Response:
    policy = load_policy_text(POLICY % stack.crm_port)
    gateway = Gateway(policy, clock=lambda: when.timestamp())
    port = stack.servers.add(gateway)
    return httpx.get(f"http://127.0.0.1:{port}/crm/v1/health")


def test_inside_window_is_503_with_retry_after(stack: Stack) -> None:
    response = _at(stack, datetime(2026, 12, 1, 3, 30, tzinfo=UTC))
    assert response.status_code == 503
    assert response.headers["retry-after"] == str(30 * 60)
    body = response.json()
    assert body["reason"] == "maintenance"
    assert body["detail"] == "CRM upgrade, back at 04:00 UTC."
    assert body["retry_after"] == 1800


def test_outside_window_is_forwarded(stack: Stack) -> None:
    assert _at(stack, datetime(2026, 12, 1, 4, 0, tzinfo=UTC)).status_code == 200
    assert _at(stack, datetime(2026, 12, 1, 1, 59, tzinfo=UTC)).status_code == 200
