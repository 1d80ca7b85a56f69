"""The ``fairgate`` command line.

User errors (a bad policy, a busy port, bad arguments) end with one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.audit.cli import add_audit_commands
from gateway.policy import Policy, PolicyError, load_policy

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        code: int = args.func(args)
        return code
    except PolicyError as exc:
        print(f"fairgate: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fairgate: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fairgate", description="Fair-usage API gateway.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve a policy")
    run.add_argument("--policy", required=True, type=Path)
    run.add_argument("--host", default="0.0.0.0")
    run.add_argument("--port", type=int, default=8080)
    run.add_argument("--admin", default=None, help="admin listener HOST:PORT (policy admin.listen)")
    run.add_argument("--workers", type=int, default=1)
    run.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="the default policy with built-in demo upstreams")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--admin-port", type=int, default=9090)
    demo.add_argument("--policy", type=Path, default=None)
    demo.set_defaults(func=_demo)

    check = sub.add_parser("check", help="validate a policy file and summarise it")
    check.add_argument("file", type=Path)
    check.set_defaults(func=_check)

    token = sub.add_parser("token", help="mint a token with the demo key")
    token.add_argument("--sub", required=True)
    token.add_argument("--tenant", required=True)
    token.add_argument("--roles", required=True, help="comma-separated roles")
    token.add_argument("--plan", default=None)
    token.add_argument("--ttl", type=int, default=3600, help="seconds")
    token.set_defaults(func=_token)
    tokens = sub.add_parser("tokens", help="token operations through the admin API")
    tokens_sub = tokens.add_subparsers(required=True, metavar="ACTION")
    revoke = tokens_sub.add_parser("revoke", help="revoke a token by its jti, on every replica")
    revoke.add_argument("--jti", required=True)
    revoke.add_argument("--until", type=float, default=None, help="unix time the entry lasts to")
    revoke.add_argument("--admin", default="http://127.0.0.1:9090", help="admin API base URL")
    revoke.add_argument(
        "--token-env",
        default="FAIRGATE_ADMIN_TOKEN",
        help="environment variable holding an admin bearer token",
    )
    revoke.set_defaults(func=_revoke)

    add_audit_commands(sub)

    bans = sub.add_parser("bans", help="suspensions and terminations through the admin API")
    bans_sub = bans.add_subparsers(required=True, metavar="ACTION")
    for name, helptext in (
        ("list", "active bans"),
        ("add", "suspend or terminate"),
        ("lift", "lift a ban"),
    ):
        cmd = bans_sub.add_parser(name, help=helptext)
        cmd.add_argument("--admin", default="http://127.0.0.1:9090", help="admin API base URL")
        cmd.add_argument(
            "--token-env",
            default="FAIRGATE_ADMIN_TOKEN",
            help="environment variable holding an admin bearer token",
        )
        if name != "list":
            cmd.add_argument("target", help="subject:NAME or network:CIDR")
        if name == "add":
            cmd.add_argument("--action", choices=["suspend", "terminate"], default="suspend")
            cmd.add_argument("--for", dest="duration", default=None, help="e.g. 1h (suspensions)")
            cmd.add_argument("--reason", default="set by an operator")
        cmd.set_defaults(func=_bans, bans_action=name)
    return parser


def _admin_call(
    args: argparse.Namespace, method: str, path: str, body: dict[str, object] | None = None
) -> tuple[int, object]:
    """Call the admin API; (exit code, parsed JSON or None). Errors are printed."""
    import json
    import urllib.error
    import urllib.request

    token = os.environ.get(args.token_env)
    if not token:
        print(f"fairgate: set {args.token_env} to an admin token", file=sys.stderr)
        return EXIT_USAGE, None
    request = urllib.request.Request(
        args.admin.rstrip("/") + path,
        data=json.dumps(body).encode() if body else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return 0, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except ValueError:
            detail = exc.reason
        print(f"fairgate: the admin API refused: {exc.code} {detail}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"fairgate: cannot reach the admin API at {args.admin}: {exc}", file=sys.stderr)
    return 1, None


def _bans(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    if args.bans_action == "list":
        code, data = _admin_call(args, "GET", "/bans")
        for ban in (data or {}).get("bans", []) if isinstance(data, dict) else []:
            until = "until lifted" if ban["until"] is None else f"until {ban['until']:.0f}"
            print(f"{ban['target']}\t{ban['action']}\t{until}\t{ban['reason']}")
        return code
    if args.bans_action == "lift":
        code, _ = _admin_call(args, "DELETE", f"/bans?target={quote(args.target)}")
        if code == 0:
            print(f"{args.target} lifted")
        return code
    code, _ = _admin_call(
        args,
        "POST",
        "/bans",
        {"target": args.target, "action": args.action, "for": args.duration, "reason": args.reason},
    )
    if code == 0:
        print(
            f"{args.target} {args.action}ed"
            if args.action == "suspend"
            else f"{args.target} terminated"
        )
    return code


def _revoke(args: argparse.Namespace) -> int:
    body: dict[str, object] = {"jti": args.jti}
    if args.until is not None:
        body["until"] = args.until
    code, data = _admin_call(args, "POST", "/tokens/revoke", body)
    if code == 0 and isinstance(data, dict):
        print(data["revoked"], "revoked")
    return code


def _check(args: argparse.Namespace) -> int:
    policy = load_policy(args.file)
    print(summarise(policy))
    return 0


def _detectors(policy: Policy) -> list[str]:
    d = policy.detectors
    named = [
        ("scraping", d.scraping_mode),
        ("account_sharing", d.sharing_mode),
        ("spam", d.spam_mode),
        ("duplicates", d.duplicates_mode),
        ("probing", d.probing_mode),
    ]
    return [f"{name} ({mode})" for name, mode in named if mode]


def summarise(policy: Policy) -> str:
    public = sum(1 for r in policy.routes if r.public)
    ladder = (
        " -> ".join(f"{r.after}: {r.action}" for r in policy.ladder.rungs) if policy.ladder else "-"
    )
    lines = [
        f"{policy.source}: OK (revision {policy.revision})",
        f"  upstreams:   {', '.join(f'{u.name}={u.url}' for u in policy.upstreams.values())}",
        f"  routes:      {len(policy.routes)} ({public} public)",
        f"  roles:       {', '.join(sorted(policy.roles))}",
        f"  plans:       {', '.join(sorted(policy.plans)) or '-'}",
        f"  issuers:     {', '.join(i.issuer for i in policy.issuers) or '-'}",
        f"  maintenance: {sum(len(w) for w in policy.maintenance.values())} window(s)",
        f"  state:       {policy.state} (on failure: {policy.state_failure})",
        f"  detectors:   {', '.join(_detectors(policy)) or '-'}",
        f"  ladder:      {ladder}",
        f"  audit:       {', '.join(policy.audit.sinks) if policy.audit else 'off'}",
    ]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from gateway.runner import run_gateway

    if args.workers < 1:
        print("fairgate: --workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    policy = load_policy(args.policy)
    return run_gateway(policy, str(args.policy), args.host, args.port, args.admin, args.workers)


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo.runner import run_demo
    from gateway.serve import run

    run(run_demo(args.host, args.port, args.admin_port, args.policy))
    return 0


def _token(args: argparse.Namespace) -> int:
    from gateway.demokey import mint_token

    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    if not roles:
        print("fairgate: --roles needs at least one role", file=sys.stderr)
        return EXIT_USAGE
    print(mint_token(sub=args.sub, tenant=args.tenant, roles=roles, plan=args.plan, ttl=args.ttl))
    return 0


if __name__ == "__main__":  # pragma: no cover
    os._exit(main())
