"""``fairgate demo``: the gateway with the default policy, in-memory state
and the built-in CRM and VoIP upstreams, all in one process."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from gateway.admin import bind, create_admin_app
from gateway.demo import crm, voip
from gateway.demokey import AUDIT_KEY_ENV, SECRET_ENV, demo_audit_key, demo_secret, mint_token
from gateway.policy import Policy
from gateway.policy.compile import compile_policy
from gateway.policy.loader import read_policy_file
from gateway.policy.schema import PolicySpec
from gateway.proxy import Gateway
from gateway.serve import serve_all, server
from gateway.target import MAX_TARGET

DEMO_USERS = [
    ("alice", "acme", ["agent"], "pro"),
    ("victor", "acme", ["viewer"], "free"),
    ("mara", "acme", ["marketer"], "pro"),
    ("olga", "globex", ["admin"], "enterprise"),
    ("svc-sync", "acme", ["service"], "enterprise"),
    ("root", "acme", ["gateway-admin"], "enterprise"),
]


def default_policy_path() -> Path:
    """policies/default.yaml, shipped in the package as gateway/default.yaml
    (a link to it in a checkout)."""
    return Path(__file__).resolve().parent.parent / "default.yaml"


def demo_policy(
    path: Path,
    crm_url: str,
    voip_url: str,
    edit: Callable[[PolicySpec], PolicySpec] | None = None,
) -> Policy:
    spec, lines, text = read_policy_file(path)
    if edit is not None:
        spec = edit(spec)
    upstreams = dict(spec.upstreams)
    upstreams["crm"] = upstreams["crm"].model_copy(update={"url": crm_url})
    upstreams["voip"] = upstreams["voip"].model_copy(update={"url": voip_url})
    spec = spec.model_copy(update={"upstreams": upstreams, "maintenance": []})
    return compile_policy(spec, lines, str(path), text)


async def run_demo(host: str, port: int, admin_port: int, policy_path: Path | None) -> None:
    os.environ[SECRET_ENV] = demo_secret()
    os.environ.setdefault(AUDIT_KEY_ENV, demo_audit_key())
    crm_sock, voip_sock = bind("127.0.0.1", 0), bind("127.0.0.1", 0)
    crm_url = f"http://127.0.0.1:{crm_sock.getsockname()[1]}"
    voip_url = f"http://127.0.0.1:{voip_sock.getsockname()[1]}"
    policy = demo_policy(policy_path or default_policy_path(), crm_url, voip_url)
    gateway = Gateway(policy)
    public_sock = bind(host, port)
    admin_sock = bind("127.0.0.1", admin_port)
    _banner(host, public_sock.getsockname()[1], admin_sock.getsockname()[1])
    await serve_all(
        [
            (server(crm.create_app()), crm_sock),
            (server(voip.create_app()), voip_sock),
            (server(gateway, max_head=policy.max_headers + MAX_TARGET), public_sock),
            (server(create_admin_app(gateway, None), lifespan="off"), admin_sock),
        ]
    )


def _banner(host: str, port: int, admin_port: int) -> None:
    base = f"http://{host}:{port}"
    out = [f"Fairgate demo on {base} (admin API on http://127.0.0.1:{admin_port})", ""]
    tokens = {}
    for sub, tenant, roles, plan in DEMO_USERS:
        tokens[sub] = mint_token(sub=sub, tenant=tenant, roles=roles, plan=plan, ttl=12 * 3600)
        out.append(f"  {sub:9} {tenant:7} {','.join(roles):14} {plan}")
    alice, victor = tokens["alice"], tokens["victor"]
    out += [
        "",
        "Try:",
        f"  export ALICE={alice}",
        f"  export VICTOR={victor}",
        f"  export ROOT={tokens['root']}",
        f'  curl -s {base}/crm/v1/acme/leads?page=2 -H "Authorization: Bearer $ALICE"',
        f'  curl -s {base}/crm/v1/globex/leads -H "Authorization: Bearer $ALICE"'
        "      # 403 tenant_mismatch",
        f'  curl -s {base}/crm/v1/acme/admin/users -H "Authorization: Bearer $ALICE"'
        "  # 403 forbidden",
        f"  curl -s '{base}/crm/v1/acme/leads/..%2Fadmin' -H \"Authorization: Bearer $ALICE\""
        "  # 400 bad_request_path",
        f'  curl -s -X POST {base}/voip/v1/acme/calls -H "Authorization: Bearer $ALICE" '
        "-H 'content-type: application/json' -d '{\"to\": \"+15551234567\"}'"
        "  # once: 409 replayed after",
        f'  curl -s {base}/crm/v1/acme/echo -H "Authorization: Bearer $VICTOR"'
        "   # what the upstream receives",
        f'  curl -s http://127.0.0.1:{admin_port}/policy -H "Authorization: Bearer $ROOT"',
        "",
        "Mint more with: fairgate token --sub bob --tenant acme --roles agent --plan free",
        "Ctrl-C stops.",
    ]
    print("\n".join(out), file=sys.stdout, flush=True)
