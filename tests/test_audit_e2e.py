"""The audit trail end to end: a real `fairgate run` process, real signals,
a real redis-server that dies (ATTACKS.md 36-38 and issue 5's no-loss tests).
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.audit import verify
from tests.conftest import ROOT, SECRET, Stack
from tests.support import FairgateProcess, free_port, start_fairgate, wait_for
from tests.test_cli import cli_env

POLICY = """
version: 1
upstreams:
  crm: {{url: "http://127.0.0.1:{crm}", read_timeout: 5s}}
  dead: {{url: "http://127.0.0.1:{dead}", connect_timeout: 0.5s}}
auth:
  issuers:
    - {{issuer: https://id.fairgate.example, audiences: [crm-voip-api], algorithms: [HS256],
       secret_env: FAIRGATE_JWT_SECRET}}
  lockout: {{max_failures: 100000}}
roles: {{agent: [x.read], gateway-admin: [fairgate.admin]}}
plans:
  tiny: {{rate: 1/hour, burst: 1, mode: shadow}}
routes:
  - {{id: leads, methods: [GET, POST], path: "/crm/v1/{{tenant}}/leads", upstream: crm,
     permission: x.read}}
  - {{id: rec, methods: [GET], path: "/crm/v1/{{tenant}}/export", upstream: crm,
     permission: x.read}}
  - {{id: dead, methods: [GET], path: "/dead/{{tenant}}", upstream: dead, permission: x.read}}
audit:
  sinks: [{sinks}]
  ip_key_env: FAIRGATE_AUDIT_KEY
  checkpoint_key_env: FAIRGATE_AUDIT_SIGNING_KEY
  batch: 64
  on_sink_failure: {failure}
  writer: {writer}
"""
SIGNING_KEY = "audit-signing-key-" + "z" * 20


class Running(FairgateProcess):
    audit_dir: Path

    def token(self, **kw: object) -> str:
        from gateway.demokey import mint_token

        roles = kw.pop("roles", None) or ["agent"]
        return mint_token(
            sub=str(kw.pop("sub", "alice")), tenant="acme", roles=roles, secret=SECRET, **kw
        )  # type: ignore[arg-type]

    def records(self) -> list[dict[str, object]]:
        out = []
        for file in sorted(self.audit_dir.rglob("*.jsonl")):
            for line in file.read_bytes().splitlines():
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a partial last line after SIGKILL
                if record.get("type") != "checkpoint":
                    out.append(record)
        return out


def start(
    tmp_path: Path,
    stack: Stack,
    *,
    sinks: str | None = None,
    failure: str = "block",
    writer: str = "process",
) -> Running:
    audit_dir = tmp_path / "audit"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        POLICY.format(
            crm=stack.crm_port,
            dead=free_port(),
            sinks=sinks or f'"file://{audit_dir}"',
            failure=failure,
            writer=writer,
        )
    )
    env = cli_env(
        FAIRGATE_JWT_SECRET=SECRET,
        FAIRGATE_AUDIT_KEY="e2e-audit-key-" + "q" * 20,
        FAIRGATE_AUDIT_SIGNING_KEY=SIGNING_KEY,
        FAIRGATE_INSTANCE="e2e",
    )
    gw = start_fairgate(policy, env, tmp_path)
    running = Running(gw.proc, gw.port, gw.admin_port)
    running.audit_dir = audit_dir
    return running


@pytest.fixture()
def running(tmp_path: Path, stack: Stack) -> Iterator[Running]:
    r = start(tmp_path, stack)
    yield r
    if r.proc.poll() is None:
        r.proc.kill()
        r.proc.wait()


def load(r: Running, count: int, threads: int = 8) -> list[str]:
    """``count`` requests from several threads; the request ids of all responses."""
    ids: list[str] = []
    lock = threading.Lock()
    token = r.token()

    def worker(n: int) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as client:
            for _ in range(n):
                try:
                    response = client.get(r.url("/crm/v1/acme/leads"))
                except httpx.HTTPError:
                    return  # the server is stopping: only answered requests count
                with lock:
                    ids.append(response.headers["x-request-id"])

    pool = [threading.Thread(target=worker, args=(count // threads,)) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return ids


def test_one_record_per_outcome(running: Running) -> None:
    r = running
    token = r.token()
    auth = {"Authorization": f"Bearer {token}"}
    outcomes = {
        "allow": httpx.get(r.url("/crm/v1/acme/leads"), headers=auth),
        "shadow": httpx.get(
            r.url("/crm/v1/acme/leads"),
            headers={"Authorization": f"Bearer {r.token(sub='sh', plan='tiny')}"},
        ),
        "unauth": httpx.get(r.url("/crm/v1/acme/leads")),
        "tenant": httpx.get(r.url("/crm/v1/globex/leads"), headers=auth),
        "path": httpx.get(r.url("/crm/v1/acme/leads%2F..")),
        "route": httpx.get(r.url("/nope"), headers=auth),
        "dead": httpx.get(r.url("/dead/acme"), headers=auth),
    }
    # Requests the HTTP parser refuses never reach the app: still recorded.
    parser_refused = {
        "framing": _raw_request_id(
            r.port,
            b"POST /crm/v1/acme/leads HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        "head": _raw_request_id(
            r.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n"
        ),
    }
    # A body the parser refuses after a good head: the request reached the
    # gateway, which records it once, under its own id; the parser's 400 adds none.
    body_refused = _raw_request_id(
        r.port,
        b"POST /crm/v1/acme/tickets HTTP/1.1\r\nHost: x\r\nX-Request-Id: bad-chunk-0001\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    )
    # Second request of the tiny plan: over its (shadow) limit.
    outcomes["shadow"] = httpx.get(
        r.url("/crm/v1/acme/leads"),
        headers={"Authorization": f"Bearer {r.token(sub='sh', plan='tiny')}"},
    )
    r.stop()
    by_id = {rec["request_id"]: rec for rec in r.records()}
    expect = {
        "allow": ("allow", 200, None),
        "shadow": ("shadow_deny", 200, "rate_limited"),
        "unauth": ("deny", 401, "unauthenticated"),
        "tenant": ("deny", 403, "tenant_mismatch"),
        "path": ("deny", 400, "bad_request_path"),
        "route": ("deny", 404, "route_not_found"),
        "dead": ("deny", 502, "upstream_unavailable"),
    }
    for name, (decision, status, reason) in expect.items():
        record = by_id[outcomes[name].headers["x-request-id"]]
        assert (record["decision"], record["status"], record["reason"]) == (
            decision,
            status,
            reason,
        ), name
    for name, (status, reason) in {
        "framing": (400, "bad_request"),
        "head": (431, "headers_too_large"),
    }.items():
        record = by_id[parser_refused[name]]
        assert (record["decision"], record["status"], record["reason"]) == ("deny", status, reason)
        assert record["client"]["network"] == "127.0.0.0/24"  # type: ignore[index]
    assert body_refused not in by_id
    assert [rec["request_id"] for rec in r.records()].count("bad-chunk-0001") == 1
    # A malformed target is still attributed to its client (for probing).
    malformed = by_id[outcomes["path"].headers["x-request-id"]]
    assert malformed["client"]["network"] == "127.0.0.0/24"  # type: ignore[index]
    allowed = by_id[outcomes["allow"].headers["x-request-id"]]
    assert allowed["subject"] == "alice" and allowed["tenant"] == "acme"
    assert allowed["route"] == "leads" and allowed["upstream"] == "crm"
    assert allowed["upstream_status"] == 200 and allowed["bytes_out"] > 0
    assert allowed["client"]["network"] == "127.0.0.0/24"  # type: ignore[index]
    # ATTACKS 38: no token, secret or raw client IP anywhere in the trail.
    raw = b"".join(f.read_bytes() for f in r.audit_dir.rglob("*.jsonl"))
    assert token.encode() not in raw and token.split(".")[2].encode() not in raw
    assert b"127.0.0.1" not in raw
    assert SECRET.encode() not in raw and SIGNING_KEY.encode() not in raw
    report = verify([r.audit_dir], SIGNING_KEY.encode())
    assert report.ok, report.describe()


def _raw_request_id(port: int, request: bytes) -> str:
    """Send bytes no HTTP client would; the X-Request-Id of the refusal."""
    from tests.support import raw_request

    response = raw_request(port, request)
    return next(value for name, value in response.headers if name.lower() == "x-request-id")


def test_client_disconnect_mid_stream_is_recorded(running: Running) -> None:
    import socket

    r = running
    with socket.create_connection(("127.0.0.1", r.port)) as sock:
        sock.sendall(
            f"GET /crm/v1/acme/export HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {r.token()}\r\nX-Request-Id: gone-midstream-1\r\n\r\n".encode()
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    r.stop()
    records = [x for x in r.records() if x["request_id"] == "gone-midstream-1"]
    assert len(records) == 1


@pytest.mark.parametrize("writer", ["process", "inline"])
def test_sigterm_under_load_loses_nothing(tmp_path: Path, stack: Stack, writer: str) -> None:
    r = start(tmp_path, stack, writer=writer)
    try:
        sigterm_under_load_loses_nothing(r)
    finally:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def sigterm_under_load_loses_nothing(r: Running) -> None:
    done = threading.Event()
    ids: list[str] = []

    def background() -> None:
        ids.extend(load(r, 400))
        done.set()

    thread = threading.Thread(target=background)
    thread.start()
    wait_for(lambda: len(r.records()) > 50 or done.is_set(), what="some records")
    r.proc.send_signal(signal.SIGTERM)
    thread.join(60)
    r.proc.communicate(timeout=30)
    assert r.proc.returncode == 0
    recorded = [x["request_id"] for x in r.records()]
    # Every response the clients got has its record, exactly once.
    assert len(recorded) == len(set(recorded))
    assert set(ids) <= set(recorded)
    report = verify([r.audit_dir], SIGNING_KEY.encode())
    assert report.ok, report.describe()


def test_sigkill_loses_at_most_one_batch_and_verify_says_truncation(running: Running) -> None:
    r = running
    ids = load(r, 400)
    r.proc.send_signal(signal.SIGKILL)
    r.proc.wait(10)
    # The worker's writer process outlives it: it writes what it was handed,
    # then lets go of the chain's lock.
    wait_for(lambda: lock_free(r.audit_dir / "e2e-w0" / ".lock"), timeout=20, what="the drain")
    recorded = {x["request_id"] for x in r.records()}
    missing = set(ids) - recorded
    assert len(missing) <= 64, f"{len(missing)} records lost, more than one batch"
    report = verify([r.audit_dir], SIGNING_KEY.encode())
    assert not report.ok
    kinds = {p.kind for p in report.problems}
    assert kinds <= {"truncation", "malformed"}, report.describe()
    # The CLI says the same, on one line per chain, and exits non-zero.
    cli = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", str(r.audit_dir), "--key-env", "KEY"],
        capture_output=True,
        text=True,
        env=cli_env(KEY=SIGNING_KEY),
        cwd=ROOT,
    )
    assert cli.returncode == 1
    assert "truncation" in cli.stdout + cli.stderr or "malformed" in cli.stdout + cli.stderr


def lock_free(path: Path) -> bool:
    with path.open("rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def test_restart_continues_the_chain(tmp_path: Path, stack: Stack) -> None:
    first = start(tmp_path, stack)
    load(first, 16, threads=2)
    first.stop()
    second = start(tmp_path, stack)
    load(second, 16, threads=2)
    second.stop()
    seqs = [x["seq"] for x in second.records()]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    report = verify([second.audit_dir], SIGNING_KEY.encode())
    assert report.ok, report.describe()


def spawn_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """A redis-server of the test's own on ``port``; it keeps nothing on disk."""
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _redis_ping(port), what="redis-server")
    return proc


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    port = free_port()
    procs = [spawn_redis(port, tmp_path)]
    yield port, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _redis_ping(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def test_sink_failure_with_deny_fails_closed_then_recovers(
    tmp_path: Path,
    stack: Stack,
    redis_server: tuple[int, list[subprocess.Popen[bytes]]],
) -> None:
    port, procs = redis_server
    sinks = f'"file://{tmp_path / "audit"}", "redis://127.0.0.1:{port}/0?stream=fairgate:audit"'
    r = start(tmp_path, stack, sinks=sinks, failure="deny")
    try:
        auth = {"Authorization": f"Bearer {r.token()}"}
        assert httpx.get(r.url("/crm/v1/acme/leads"), headers=auth).status_code == 200
        procs[0].kill()
        procs[0].wait()
        # The next records cannot reach Redis: the gateway stops serving.
        wait_for(
            lambda: httpx.get(r.url("/crm/v1/acme/leads"), headers=auth).status_code == 503,
            timeout=20,
            what="fail closed",
        )
        refused = httpx.get(r.url("/crm/v1/acme/leads"), headers=auth)
        assert refused.json()["reason"] == "audit_unavailable"
        assert refused.headers["retry-after"]
        # Not ready while it cannot record (the dead upstream is not ready either).
        assert httpx.get(r.admin_url("/readyz")).json()["checks"]["audit"] is False
        procs.append(spawn_redis(port, tmp_path))
        wait_for(
            lambda: httpx.get(r.url("/crm/v1/acme/leads"), headers=auth).status_code == 200,
            timeout=30,
            what="recovery",
        )
        assert httpx.get(r.admin_url("/readyz")).json()["checks"]["audit"] is True
    finally:
        r.stop()
    # Nothing was lost: every response, refused or not, has its record in the file.
    report = verify([r.audit_dir], SIGNING_KEY.encode())
    assert report.ok, report.describe()


def test_sink_failure_with_block_holds_requests_until_recovery(
    tmp_path: Path, stack: Stack, redis_server: tuple[int, list[subprocess.Popen[bytes]]]
) -> None:
    port, procs = redis_server
    sinks = f'"file://{tmp_path / "audit"}", "redis://127.0.0.1:{port}/0?stream=fairgate:audit"'
    r = start(tmp_path, stack, sinks=sinks, failure="block")
    admin = {"Authorization": "Bearer " + r.token(sub="root", roles=["gateway-admin"])}
    try:
        auth = {"Authorization": f"Bearer {r.token()}"}
        assert httpx.get(r.url("/crm/v1/acme/leads"), headers=auth).status_code == 200
        procs[0].kill()
        procs[0].wait()
        results: list[int] = []

        def get() -> None:
            results.append(
                httpx.get(r.url("/crm/v1/acme/leads"), headers=auth, timeout=60).status_code
            )

        # Its record cannot reach Redis (this request may itself be held).
        first = threading.Thread(target=get)
        first.start()

        def unhealthy() -> bool:
            text = httpx.get(r.admin_url("/metrics"), headers=admin).text
            return "fairgate_audit_healthy 0.0" in text

        wait_for(unhealthy, timeout=20, what="the audit trail to notice")
        served_before = len(results)
        held = threading.Thread(target=get)
        held.start()
        held.join(0.5)
        assert held.is_alive() and len(results) == served_before, "served while unrecorded"
        procs.append(spawn_redis(port, tmp_path))
        first.join(30)
        held.join(30)
        assert results == [200, 200]
    finally:
        r.stop()
    report = verify([r.audit_dir], SIGNING_KEY.encode())
    assert report.ok, report.describe()


def writer_processes(pid: int) -> list[int]:
    """The audit writer processes (``gateway.audit.sidecar``) started by ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            parent = int(stat[stat.rindex(b")") + 2 :].split()[1])
            if parent == pid and b"gateway.audit.sidecar" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def test_a_dead_writer_process_is_replaced_and_no_record_is_lost(running: Running) -> None:
    r = running
    auth = {"Authorization": f"Bearer {r.token()}"}
    ids = [httpx.get(r.url("/crm/v1/acme/leads"), headers=auth).headers["x-request-id"]]
    (writer,) = writer_processes(r.proc.pid)
    os.kill(writer, signal.SIGKILL)
    wait_for(
        lambda: writer_processes(r.proc.pid) not in ([], [writer]),
        timeout=10,
        what="a new writer process",
    )
    # Requests are held while it restarts (block mode), then served and recorded.
    ids += load(r, 40, threads=4)
    assert httpx.get(r.admin_url("/healthz")).status_code == 200
    code, _ = r.stop()
    assert code == 0
    recorded = [x["request_id"] for x in r.records()]
    assert len(recorded) == len(set(recorded)) and set(ids) <= set(recorded)
    report = verify([r.audit_dir], SIGNING_KEY.encode())
    assert report.ok, report.describe()
