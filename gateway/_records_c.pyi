"""Stub for the native ``gateway._records_c`` (built from ext/_records_c.pyx)."""

from gateway.audit.chain import Chain
from gateway.audit.records import Snapshot

class RecordSealer:
    instance: str
    ip_key: bytes
    def __init__(self, instance: str, ip_key: bytes) -> None: ...
    def seal(self, facts: Snapshot | bytes, chain: Chain) -> bytes: ...
    def body(self, facts: Snapshot) -> bytes: ...
