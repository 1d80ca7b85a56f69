"""The audit trail: one tamper-evident, private record per decision, never lost.

The gateway builds one record per request and hands it to ``AuditWriter.write``;
this package chains, signs, batches and stores it, and checks it back.
"""

from __future__ import annotations

from gateway.audit.chain import GENESIS, Chain, canonical, record_hash, resume
from gateway.audit.cli import add_audit_commands
from gateway.audit.config import AuditConfig, decode_key
from gateway.audit.privacy import client_fields, network, pseudonymize
from gateway.audit.query import export_subject, query
from gateway.audit.timefmt import format_ts
from gateway.audit.verify import AuditPathError, Report, verify
from gateway.audit.writer import AuditClosedError, AuditWriter

__all__ = [
    "GENESIS",
    "AuditClosedError",
    "AuditConfig",
    "AuditPathError",
    "AuditWriter",
    "Chain",
    "Report",
    "add_audit_commands",
    "canonical",
    "client_fields",
    "decode_key",
    "export_subject",
    "format_ts",
    "network",
    "pseudonymize",
    "query",
    "record_hash",
    "resume",
    "verify",
]
