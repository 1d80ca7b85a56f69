"""Client addresses never enter the trail: a keyed pseudonym and a network.

The pseudonym is an HMAC, not a plain hash: IPv4 has only 2^32 addresses, so
an unkeyed hash is reversed by trying them all. With the key kept secret
(and rotated to unlink old records), records of one client still correlate
for investigations while the address itself is not stored.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

PSEUDONYM_HEX = 32


def _normal(ip: str) -> str:
    """One spelling per address (``::ffff:1.2.3.4`` is ``1.2.3.4``; IPv6 compressed),
    so the same client gets the same pseudonym however the server saw it."""
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return ip.strip()  # not an address (a unix socket path, "unknown"): keyed all the same
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def pseudonymize(ip: str, key: bytes) -> str:
    """HMAC-SHA256(key, ip) as 32 hex characters (128 bits: no collisions in practice)."""
    if not key:
        raise ValueError("pseudonymize needs a non-empty key")
    return hmac.new(key, _normal(ip).encode(), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def network(ip: str, v4_prefix: int = 24, v6_prefix: int = 48) -> str | None:
    """The client's network (``203.0.113.0/24``): coarse enough not to name a
    host, fine enough to see which network an attack came from. None when
    ``ip`` is not an address."""
    normal = _normal(ip)
    try:
        address = ipaddress.ip_address(normal)
    except ValueError:
        return None
    prefix = v4_prefix if address.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{normal}/{prefix}", strict=False))


def client_fields(ip: str, key: bytes) -> dict[str, str | None]:
    """The record's ``client`` value: ``{"pseudonym": ..., "network": ...}``."""
    return {"pseudonym": pseudonymize(ip, key), "network": network(ip)}
