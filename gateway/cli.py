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
    return parser


def _revoke(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request

    token = os.environ.get(args.token_env)
    if not token:
        print(f"fairgate: set {args.token_env} to an admin token", file=sys.stderr)
        return EXIT_USAGE
    body: dict[str, object] = {"jti": args.jti}
    if args.until is not None:
        body["until"] = args.until
    request = urllib.request.Request(
        args.admin.rstrip("/") + "/tokens/revoke",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(json.loads(response.read())["revoked"], "revoked")
            return 0
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except ValueError:
            detail = exc.reason
        print(f"fairgate: the admin API refused: {exc.code} {detail}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"fairgate: cannot reach the admin API at {args.admin}: {exc}", file=sys.stderr)
    return 1


def _check(args: argparse.Namespace) -> int:
    policy = load_policy(args.file)
    print(summarise(policy))
    return 0


def summarise(policy: Policy) -> str:
    public = sum(1 for r in policy.routes if r.public)
    lines = [
        f"{policy.source}: OK (revision {policy.revision})",
        f"  upstreams:   {', '.join(f'{u.name}={u.url}' for u in policy.upstreams.values())}",
        f"  routes:      {len(policy.routes)} ({public} public)",
        f"  roles:       {', '.join(sorted(policy.roles))}",
        f"  plans:       {', '.join(sorted(policy.plans)) or '-'}",
        f"  issuers:     {', '.join(i.issuer for i in policy.issuers) or '-'}",
        f"  maintenance: {sum(len(w) for w in policy.maintenance.values())} window(s)",
        f"  state:       {policy.state} (on failure: {policy.state_failure})",
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
