"""The client address: the socket peer, or what a trusted proxy says.

Forwarding headers are only believed from a configured trusted proxy, and
then only up to the right-most hop that is not itself trusted: everything to
the left of that hop was written by the client and proves nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from gateway.policy.model import IPNetwork


@dataclass(frozen=True, slots=True)
class ClientAddress:
    ip: str
    network: str  # /24 for IPv4, /64 for IPv6: the unit of "one client network"
    version: int


UNKNOWN = ClientAddress("0.0.0.0", "0.0.0.0/24", 4)


@lru_cache(maxsize=65536)
def address(ip: str) -> ClientAddress | None:
    """Parse once per distinct address; ``None`` for anything that is not an IP."""
    try:
        parsed = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    prefix = 24 if parsed.version == 4 else 64
    network = ipaddress.ip_network(f"{parsed}/{prefix}", strict=False)
    return ClientAddress(str(parsed), str(network), parsed.version)


def _trusted(ip: str, trusted: Sequence[IPNetwork]) -> bool:
    parsed = address(ip)
    if parsed is None:
        return False
    value = ipaddress.ip_address(parsed.ip)
    return any(value in net for net in trusted)


def _forwarded_for(values: list[bytes]) -> list[str]:
    """The ``for=`` hops of RFC 7239 ``Forwarded`` headers, left to right."""
    hops = []
    for value in values:
        for element in value.decode("latin-1").split(","):
            for pair in element.split(";"):
                key, _, val = pair.strip().partition("=")
                if key.lower() == "for":
                    val = val.strip().strip('"')
                    if val.startswith("["):
                        val = val[1 : val.find("]")] if "]" in val else val
                    elif val.count(":") == 1:
                        val = val.split(":")[0]  # IPv4 with a port
                    hops.append(val)
    return hops


def resolve_client(
    peer: str | None,
    headers: Sequence[tuple[bytes, bytes]],
    trusted: Sequence[IPNetwork],
    header: str = "x-forwarded-for",
) -> ClientAddress:
    peer_address = address(peer) if peer else None
    if peer_address is None:
        return UNKNOWN
    if not trusted or not _trusted(peer_address.ip, trusted):
        return peer_address
    if header == "forwarded":
        hops = _forwarded_for([v for k, v in headers if k == b"forwarded"])
    else:
        hops = [
            hop.strip()
            for k, v in headers
            if k == b"x-forwarded-for"
            for hop in v.decode("latin-1").split(",")
        ]
    for hop in reversed(hops):
        hop_address = address(hop)
        if hop_address is None:
            # A hop we cannot read: stop believing the chain here.
            return peer_address
        if not _trusted(hop_address.ip, trusted):
            return hop_address
        peer_address = hop_address
    return peer_address
