"""Seal an audit record from a request's snapshot, pure-Python implementation.

``RecordSealer(instance, ip_key).seal(facts, chain)`` builds the record of
``facts`` (``gateway.audit.records.record_from``), gives it its place in
``chain`` (``Chain.seal``: seq, chain, prev, hash) and returns its JSON line.
The native twin ``gateway._records_c`` (ext/_records_c.pyx) writes the same
bytes straight from the snapshot, without the dict and orjson's pass over it;
``gateway.recording`` picks one. Either leaves the chain as it was when the
record cannot be written (a value orjson refuses), and raises.
"""

from __future__ import annotations

from gateway.audit.chain import Chain
from gateway.audit.records import Snapshot, record_from


class RecordSealer:
    __slots__ = ("instance", "ip_key")

    def __init__(self, instance: str, ip_key: bytes) -> None:
        self.instance = instance
        self.ip_key = ip_key

    def seal(self, facts: Snapshot, chain: Chain) -> bytes:
        record = record_from(facts, instance=self.instance, ip_key=self.ip_key)
        return chain.seal(record, presorted=True)
