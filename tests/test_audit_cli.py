"""``fairgate audit ...`` as the lead's parser will wire it."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson
import pytest

from gateway.audit import add_audit_commands
from tests.test_audit_helpers import KEY, build_trail, chain_files


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fairgate")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    add_audit_commands(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


@pytest.fixture
async def trail(tmp_path: Path) -> Path:
    await build_trail(tmp_path, 25, worker=0)
    await build_trail(tmp_path, 12, worker=1)
    return tmp_path


async def test_verify_ok(
    trail: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUDIT_KEY", "hex:" + KEY.hex())
    assert run(["audit", "verify", str(trail), "--key-env", "AUDIT_KEY"]) == 0
    out = capsys.readouterr().out
    assert "gw-w0: ok" in out and "gw-w1: ok" in out and "not checked" not in out
    monkeypatch.setenv("AUDIT_KEY", KEY.decode())  # raw text works too
    assert run(["audit", "verify", str(trail), "--key-env", "AUDIT_KEY"]) == 0


async def test_verify_tampered_prints_one_line(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    [file] = chain_files(trail, "gw-w1")
    lines = file.read_bytes().splitlines(keepends=True)
    lines[6] = lines[6].replace(b'"latency_ms":', b'"latency_ms":9')
    file.write_bytes(b"".join(lines))
    assert run(["audit", "verify", str(trail)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{file}:7: seq 7: edit (hash mismatch)"]


def test_user_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run(["audit", "verify", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fairgate: ") and err.count("\n") == 1 and "Traceback" not in err
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    assert run(["audit", "verify", str(tmp_path), "--key-env", "NO_SUCH_KEY"]) == 1
    assert "NO_SUCH_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("BAD_KEY", "hex:zz")
    assert run(["audit", "verify", str(tmp_path), "--key-env", "BAD_KEY"]) == 1
    assert capsys.readouterr().err.startswith("fairgate: BAD_KEY: ")
    assert run(["audit", "query", str(tmp_path / "missing")]) == 1
    assert run(["audit", "export", str(tmp_path / "missing"), "--subject", "a"]) == 1
    assert run(["audit", "query", str(tmp_path), "--since", "last tuesday"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(line.startswith("fairgate: ") for line in errors)


def _records(out: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in out.splitlines()]


async def test_query_filters(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["audit", "query", str(trail), "--subject", "alice"]) == 0
    found = _records(capsys.readouterr().out)
    assert len(found) == 9 + 4 and {r["subject"] for r in found} == {"alice"}
    assert all("type" not in r for r in found)  # no checkpoints
    argv = ["audit", "query", str(trail), "--decision", "deny", "--tenant", "acme"]
    assert run(argv) == 0
    found = _records(capsys.readouterr().out)
    assert found and all(r["decision"] == "deny" and r["tenant"] == "acme" for r in found)
    argv = ["audit", "query", str(trail / "gw-w0"), "--reason", "rate_limited"]
    assert run([*argv, "--since", "2026-11-18T11:06:45Z", "--until", "2026-11-18T11:06:52Z"]) == 0
    found = _records(capsys.readouterr().out)
    assert [r["request_id"] for r in found] == ["req-5", "req-8", "req-11"]


async def test_export_subject(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["audit", "export", str(trail), "--subject", "bob"]) == 0
    found = _records(capsys.readouterr().out)
    assert len(found) == 8 + 4 and {r["subject"] for r in found} == {"bob"}
    assert {r["chain"] for r in found} == {"gw-w0", "gw-w1"}
