"""Client addresses: a keyed pseudonym and a network, never the address."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.audit import AuditWriter, client_fields, network, pseudonymize
from tests.test_audit_helpers import PSEUDONYM_KEY, chain_files, file_config, make_record


def test_pseudonym_is_stable_per_key_and_differs_across_keys() -> None:
    one = pseudonymize("203.0.113.77", PSEUDONYM_KEY)
    assert one == pseudonymize("203.0.113.77", PSEUDONYM_KEY)
    assert len(one) == 32 and int(one, 16) >= 0
    assert one != pseudonymize("203.0.113.77", b"another key, another month")
    assert one != pseudonymize("203.0.113.78", PSEUDONYM_KEY)
    # One address, one pseudonym, however it was spelled.
    assert one == pseudonymize("::ffff:203.0.113.77", PSEUDONYM_KEY)
    assert pseudonymize("2001:db8::1", PSEUDONYM_KEY) == pseudonymize(
        "2001:0db8:0:0::0001", PSEUDONYM_KEY
    )
    with pytest.raises(ValueError):
        pseudonymize("203.0.113.77", b"")


def test_network() -> None:
    assert network("203.0.113.77") == "203.0.113.0/24"
    assert network("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert network("unix:/run/gw.sock") is None
    assert client_fields("203.0.113.77", PSEUDONYM_KEY)["network"] == "203.0.113.0/24"


async def test_the_raw_address_never_reaches_a_line(tmp_path: Path) -> None:
    addresses = ["203.0.113.77", "198.51.100.23", "2001:db8:1:2::5"]
    writer = AuditWriter(file_config(tmp_path))
    await writer.start()
    for i, ip in enumerate(addresses * 4):
        await writer.write(make_record(i, ip=ip))
    await writer.aclose()
    data = b"".join(f.read_bytes() for f in chain_files(tmp_path))
    assert data.count(b'"pseudonym":') == 12
    for ip in addresses:
        assert ip.encode() not in data
        assert pseudonymize(ip, PSEUDONYM_KEY).encode() in data
