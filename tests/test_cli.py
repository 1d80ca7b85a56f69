"""The ``fairgate`` command line, run as a user would: in a subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from tests.conftest import DEFAULT_POLICY, ROOT, SECRET
from tests.support import free_port, start_fairgate, wait_for


def fairgate(
    *args: str, env: dict[str, str] | None = None, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or cli_env(),
        cwd=ROOT,
        **kwargs,
    )  # type: ignore[call-overload]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def test_check_valid_policy_summarises() -> None:
    result = fairgate("check", str(DEFAULT_POLICY))
    assert result.returncode == 0, result.stderr
    assert "OK (revision" in result.stdout
    assert "routes:" in result.stdout and "crm=" in result.stdout


def test_check_invalid_policy_is_one_line_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        DEFAULT_POLICY.read_text().replace(
            "upstream: voip, permission: voip.numbers", "upstream: vop, permission: voip.numbers"
        )
    )
    result = fairgate("check", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match(
        rf"fairgate: {re.escape(str(bad))}:\d+: routes\[\d+\]\.upstream: one of", lines[0]
    )
    assert "Traceback" not in result.stderr


def test_check_missing_file_is_clear() -> None:
    result = fairgate("check", "/nonexistent/policy.yaml")
    assert result.returncode == 1
    assert "readable policy file" in result.stderr and "Traceback" not in result.stderr


def test_token_mints_a_verifiable_token(tmp_path: Path) -> None:
    env = cli_env(FAIRGATE_HOME=str(tmp_path))
    result = fairgate(
        "token",
        "--sub",
        "bob",
        "--tenant",
        "acme",
        "--roles",
        "agent,viewer",
        "--plan",
        "free",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    key = (tmp_path / "demo-signing-key").read_text().strip()
    assert oct((tmp_path / "demo-signing-key").stat().st_mode & 0o777) == "0o600"
    claims = jwt.decode(result.stdout.strip(), key, algorithms=["HS256"], audience="crm-voip-api")
    assert claims["sub"] == "bob" and claims["roles"] == ["agent", "viewer"]
    assert claims["plan"] == "free" and claims["tenant"] == "acme"


@pytest.fixture()
def demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, int, dict[str, str]]]:
    port, admin_port = free_port(), free_port()
    env = cli_env(FAIRGATE_HOME=str(tmp_path))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "demo",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,  # the demo writes its audit trail under var/ here, not in the checkout
    )
    try:
        yield proc, port, admin_port, env
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/crm/v1/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_demo_serves_tokens_from_fairgate_token_and_stops_on_sigterm(
    demo: tuple[subprocess.Popen[str], int, int, dict[str, str]],
) -> None:
    proc, port, admin_port, env = demo
    wait_for(lambda: _ready(port) or proc.poll() is not None, timeout=30, what="demo")
    assert proc.poll() is None, f"the demo exited: {proc.communicate()[1]}"
    assert proc.poll() is None
    minted = fairgate(
        "token", "--sub", "zoe", "--tenant", "globex", "--roles", "viewer", env=env
    ).stdout.strip()
    response = httpx.get(
        f"http://127.0.0.1:{port}/crm/v1/globex/leads",
        headers={"Authorization": f"Bearer {minted}"},
    )
    assert response.status_code == 200
    assert response.json()["total"] == 2000
    assert httpx.get(f"http://127.0.0.1:{admin_port}/healthz").json() == {"status": "ok"}
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "curl" in out and "Authorization: Bearer" in out
    assert "Traceback" not in err


def test_run_serves_policy_and_reload_keeps_good_policy_on_error(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    text = DEFAULT_POLICY.read_text()
    policy_file.write_text(text)
    env = cli_env(FAIRGATE_JWT_SECRET=SECRET, FAIRGATE_HOME=str(tmp_path))
    gw = start_fairgate(policy_file, env, tmp_path)
    try:
        # No upstream runs on the policy's ports: the gateway says so.
        response = httpx.get(gw.url("/crm/v1/health"))
        assert response.status_code == 502
        assert response.json()["reason"] == "upstream_unavailable"
        ready = httpx.get(gw.admin_url("/readyz"))
        assert ready.status_code == 503 and ready.json()["ready"] is False
        admin = {"Authorization": "Bearer " + _admin_token()}
        assert httpx.get(gw.admin_url("/policy")).status_code == 401
        revision = httpx.get(gw.admin_url("/policy"), headers=admin).json()["revision"]
        policy_file.write_text(text.replace("routes:", "routs:"))
        reload = httpx.post(gw.admin_url("/policy/reload"), headers=admin)
        assert reload.status_code == 422 and "routs" in reload.json()["error"]
        assert httpx.get(gw.admin_url("/policy"), headers=admin).json()["revision"] == revision
        policy_file.write_text(text + "\n# changed\n")
        reload = httpx.post(gw.admin_url("/policy/reload"), headers=admin)
        assert reload.status_code == 200 and reload.json()["revision"] != revision
        metrics = httpx.get(gw.admin_url("/metrics"), headers=admin)
        assert metrics.status_code == 200
        assert 'fairgate_requests_total{decision="deny",reason="upstream_unavailable"' in (
            metrics.text
        )
        for gauge in (
            "fairgate_audit_queue_depth",
            "fairgate_audit_records_written",
            "fairgate_audit_sink_failures",
            "fairgate_audit_healthy 1.0",
            'fairgate_usage_counter_keys{counter="quota"}',
            'fairgate_usage_counter_keys{counter="bandwidth"}',
            "fairgate_usage_bucket_keys",
        ):
            assert gauge in metrics.text
    finally:
        code, err = gw.stop()
    assert code == 0, err


def test_run_with_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = fairgate(
            "run",
            "--policy",
            str(DEFAULT_POLICY),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env=cli_env(FAIRGATE_JWT_SECRET=SECRET),
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "address already in use" in result.stderr.lower()


def _admin_token() -> str:
    from gateway.demokey import mint_token

    return mint_token(sub="root", tenant="acme", roles=["gateway-admin"], secret=SECRET)


def test_tokens_revoke_through_the_admin_api(
    demo: tuple[subprocess.Popen[str], int, int, dict[str, str]],
) -> None:
    proc, port, admin_port, env = demo
    wait_for(lambda: _ready(port) or proc.poll() is not None, timeout=30, what="demo")
    assert proc.poll() is None, f"the demo exited: {proc.communicate()[1]}"
    minted = fairgate(
        "token", "--sub", "zoe", "--tenant", "acme", "--roles", "agent", env=env
    ).stdout.strip()
    url = f"http://127.0.0.1:{port}/crm/v1/acme/leads"
    auth = {"Authorization": f"Bearer {minted}"}
    assert httpx.get(url, headers=auth).status_code == 200
    jti = jwt.decode(minted, options={"verify_signature": False})["jti"]
    admin = fairgate(
        "token", "--sub", "root", "--tenant", "acme", "--roles", "gateway-admin", env=env
    ).stdout.strip()
    no_token = fairgate(
        "tokens", "revoke", "--jti", jti, "--admin", f"http://127.0.0.1:{admin_port}", env=env
    )
    assert no_token.returncode == 2 and "FAIRGATE_ADMIN_TOKEN" in no_token.stderr
    weak = fairgate(
        "tokens",
        "revoke",
        "--jti",
        jti,
        "--admin",
        f"http://127.0.0.1:{admin_port}",
        env={**env, "FAIRGATE_ADMIN_TOKEN": minted},
    )
    assert weak.returncode == 1 and "403" in weak.stderr
    done = fairgate(
        "tokens",
        "revoke",
        "--jti",
        jti,
        "--admin",
        f"http://127.0.0.1:{admin_port}",
        env={**env, "FAIRGATE_ADMIN_TOKEN": admin},
    )
    assert done.returncode == 0, done.stderr
    response = httpx.get(url, headers=auth)
    assert response.status_code == 401 and "revoked" in response.json()["detail"]


def test_run_with_two_workers_serves_and_stops(tmp_path: Path) -> None:
    env = cli_env(FAIRGATE_JWT_SECRET=SECRET, FAIRGATE_HOME=str(tmp_path))
    gw = start_fairgate(DEFAULT_POLICY, env, tmp_path, "--workers", "2")
    try:
        wait_for(lambda: httpx.get(gw.url("/crm/v1/health")).status_code == 502, what="workers")
        assert httpx.get(gw.admin_url("/healthz")).status_code == 200
        # The parent serves no requests: state changes there would reach no worker.
        admin = {"Authorization": "Bearer " + _admin_token()}
        revoke = httpx.post(gw.admin_url("/tokens/revoke"), headers=admin, json={"jti": "x"})
        assert revoke.status_code == 501 and revoke.json()["reason"] == "not_implemented"
        ban = httpx.post(
            gw.admin_url("/bans"),
            headers=admin,
            json={"target": "subject:a", "action": "terminate"},
        )
        assert ban.status_code == 501
    finally:
        code, err = gw.stop()
    assert code == 0, err
    assert "Traceback" not in err


def test_bans_cli_round_trip(
    demo: tuple[subprocess.Popen[str], int, int, dict[str, str]],
) -> None:
    proc, port, admin_port, env = demo
    wait_for(lambda: _ready(port) or proc.poll() is not None, timeout=30, what="demo")
    assert proc.poll() is None, f"the demo exited: {proc.communicate()[1]}"
    admin = fairgate(
        "token", "--sub", "root", "--tenant", "acme", "--roles", "gateway-admin", env=env
    ).stdout.strip()
    env = {**env, "FAIRGATE_ADMIN_TOKEN": admin}
    base = ["--admin", f"http://127.0.0.1:{admin_port}"]
    added = fairgate(
        "bans", "add", "subject:zed", "--for", "2h", "--reason", "probing", *base, env=env
    )
    assert added.returncode == 0, added.stderr
    listed = fairgate("bans", "list", *base, env=env)
    assert "subject:zed\tsuspend" in listed.stdout and "probing" in listed.stdout
    user = fairgate(
        "token", "--sub", "zed", "--tenant", "acme", "--roles", "agent", env=env
    ).stdout.strip()
    response = httpx.get(
        f"http://127.0.0.1:{port}/crm/v1/acme/leads", headers={"Authorization": f"Bearer {user}"}
    )
    assert response.status_code == 403 and response.json()["reason"] == "suspended"
    assert fairgate("bans", "lift", "subject:zed", *base, env=env).returncode == 0
    assert fairgate("bans", "lift", "subject:zed", *base, env=env).returncode == 1
    bad = fairgate("bans", "add", "subject:zed", *base, env=env)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
