"""``fairgate audit verify | query | export``.

Every handler returns an exit code and reports user errors (a missing
path, an unset key variable, a bad time) as one ``fairgate: ...`` line on
stderr, never a traceback: the main CLI catches nothing for us.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

import orjson

from gateway.audit.chain import Record
from gateway.audit.config import decode_key
from gateway.audit.query import export_subject, query
from gateway.audit.timefmt import parse_ts
from gateway.audit.verify import AuditPathError, verify


def add_audit_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = subparsers.add_parser("audit", help="verify, query and export the audit trail")
    actions = audit.add_subparsers(required=True, metavar="ACTION")

    check = actions.add_parser("verify", help="check hashes, order, signatures and a clean end")
    check.add_argument("paths", nargs="+", metavar="PATH", help="audit files or directories")
    check.add_argument(
        "--key-env",
        metavar="NAME",
        default=None,
        help="environment variable holding the checkpoint HMAC key (hex:, base64: or raw)",
    )
    check.set_defaults(func=_verify)

    find = actions.add_parser("query", help="records matching filters, as JSON lines")
    find.add_argument("paths", nargs="+", metavar="PATH")
    find.add_argument("--subject")
    find.add_argument("--tenant")
    find.add_argument("--decision", choices=("allow", "deny", "shadow_deny"))
    find.add_argument("--reason")
    find.add_argument("--since", metavar="ISO", help="from this time (inclusive)")
    find.add_argument("--until", metavar="ISO", help="to this time (exclusive)")
    find.set_defaults(func=_query)

    export = actions.add_parser("export", help="every record of one subject (data access)")
    export.add_argument("paths", nargs="+", metavar="PATH")
    export.add_argument("--subject", required=True)
    export.set_defaults(func=_export)


def _fail(message: str) -> int:
    print(f"fairgate: {message}", file=sys.stderr)
    return 1


def _verify(args: argparse.Namespace) -> int:
    key: bytes | None = None
    if args.key_env:
        value = os.environ.get(args.key_env)
        if not value:
            return _fail(f"environment variable {args.key_env} is not set")
        try:
            key = decode_key(value)
        except ValueError as exc:
            return _fail(f"{args.key_env}: {exc}")
    try:
        report = verify(args.paths, key)
    except AuditPathError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}")
    if report.ok:
        print(report.describe())
        return 0
    for line in report.problem_lines():
        print(line)
    return 1


def _query(args: argparse.Namespace) -> int:
    for name in ("since", "until"):
        value = getattr(args, name)
        if value is not None:
            try:
                parse_ts(value)
            except ValueError:
                return _fail(f"--{name}: not an ISO 8601 time: {value!r}")
    try:
        found = query(
            args.paths,
            subject=args.subject,
            tenant=args.tenant,
            decision=args.decision,
            reason=args.reason,
            since=args.since,
            until=args.until,
        )
    except AuditPathError as exc:
        return _fail(str(exc))
    return _emit(found)


def _export(args: argparse.Namespace) -> int:
    if not args.subject:
        return _fail("--subject must not be empty")
    try:
        found = export_subject(args.paths, args.subject)
    except AuditPathError as exc:
        return _fail(str(exc))
    return _emit(found)


def _emit(found: Iterator[Record]) -> int:
    try:
        for record in found:
            sys.stdout.write(orjson.dumps(record).decode() + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # `... | head`: the reader is gone, which is not an error. Point stdout
        # at /dev/null so the interpreter's own flush at exit stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}")
    return 0
