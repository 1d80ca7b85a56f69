"""``fairgate run``: serve a policy on the public and admin listeners.

With ``--workers N`` the public socket is bound once and shared by N forked
worker processes; the admin listener stays in the parent, and a reload
there is passed on to the workers with SIGHUP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys

from gateway.admin import bind, create_admin_app, parse_listen
from gateway.policy import Policy, PolicyError, load_policy
from gateway.proxy import Gateway
from gateway.serve import run, serve_all, server
from gateway.target import MAX_TARGET

logger = logging.getLogger("fairgate")


def run_gateway(
    policy: Policy, policy_path: str, host: str, port: int, admin: str | None, workers: int
) -> int:
    public = bind(host, port)
    admin_host, admin_port = parse_listen(admin or policy.admin_listen)
    admin_sock = bind(admin_host, admin_port)
    print(
        f"fairgate: serving {policy.source} (revision {policy.revision}) on "
        f"http://{host}:{public.getsockname()[1]}, admin on {admin_host}:{admin_port}",
        file=sys.stderr,
        flush=True,
    )
    if workers == 1:
        gateway = Gateway(policy)
        run(_serve_one(gateway, policy_path, public, admin_sock))
        return 0
    children = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - exercised by the multi-worker test
            admin_sock.close()
            code = _worker(policy, policy_path, public, index)
            os._exit(code)
        children.append(pid)
    public.close()

    def reload_workers() -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGHUP)

    # The parent serves only the admin API: no requests, so no audit chain.
    gateway = Gateway(policy, audit=False)
    try:
        run(
            serve_all(
                [
                    (
                        server(
                            create_admin_app(
                                gateway, policy_path, reload_workers, serves_requests=False
                            ),
                            lifespan="off",
                        ),
                        admin_sock,
                    )
                ]
            )
        )
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        for child in children:
            os.waitpid(child, 0)
    return 0


async def _serve_one(
    gateway: Gateway, policy_path: str, public: socket.socket, admin_sock: socket.socket
) -> None:
    _on_sighup(gateway, policy_path)
    await serve_all(
        [
            (server(gateway, max_head=_max_head(gateway.policy)), public),
            (server(create_admin_app(gateway, policy_path), lifespan="off"), admin_sock),
        ]
    )


def _worker(policy: Policy, policy_path: str, public: socket.socket, index: int) -> int:
    gateway = Gateway(policy, worker=index)

    async def main() -> None:
        _on_sighup(gateway, policy_path)
        await serve_all([(server(gateway, max_head=_max_head(policy)), public)])

    run(main())
    return 0


def _max_head(policy: Policy) -> int:
    """Cap on request line + headers at the protocol: the policy's header
    limit plus the longest target, so the app's own checks still answer first."""
    return policy.max_headers + MAX_TARGET


def _on_sighup(gateway: Gateway, policy_path: str) -> None:
    import asyncio

    def reload() -> None:
        try:
            gateway.apply(load_policy(policy_path))
        except PolicyError as exc:
            # A broken file keeps the running policy.
            logger.error("reload refused, keeping revision %s: %s", gateway.policy.revision, exc)

    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
