"""Client address: only trusted proxies are believed (ATTACKS.md 30)."""

from __future__ import annotations

import ipaddress

from gateway.clientaddr import UNKNOWN, resolve_client

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


def test_untrusted_peer_headers_are_ignored() -> None:
    client = resolve_client("203.0.113.7", h(("x-forwarded-for", "127.0.0.1")), TRUSTED)
    assert client.ip == "203.0.113.7" and client.network == "203.0.113.0/24"
    client = resolve_client("203.0.113.7", h(("forwarded", "for=1.2.3.4")), TRUSTED)
    assert client.ip == "203.0.113.7"


def test_trusted_proxy_gives_rightmost_untrusted_hop() -> None:
    headers = h(("x-forwarded-for", "6.6.6.6, 198.51.100.9, 10.1.1.1"))
    assert resolve_client("10.0.0.2", headers, TRUSTED).ip == "198.51.100.9"


def test_forwarded_header_when_configured() -> None:
    headers = h(
        ("forwarded", 'for="[2001:db8::1]:4711";proto=https, for=10.2.2.2'),
        ("x-forwarded-for", "6.6.6.6"),
    )
    client = resolve_client("10.0.0.2", headers, TRUSTED, "forwarded")
    assert client.ip == "2001:db8::1" and client.network == "2001:db8::/64"


def test_only_the_configured_header_is_read() -> None:
    # The load balancer appends to X-Forwarded-For and passes the client's own
    # Forwarded through: that one must not choose the address.
    headers = h(("forwarded", "for=198.51.100.9"), ("x-forwarded-for", "203.0.113.7"))
    assert resolve_client("10.0.0.5", headers, TRUSTED).ip == "203.0.113.7"
    headers = h(("x-forwarded-for", "198.51.100.9"), ("forwarded", "for=203.0.113.7"))
    assert resolve_client("10.0.0.5", headers, TRUSTED, "forwarded").ip == "203.0.113.7"


def test_garbage_hop_stops_the_chain() -> None:
    headers = h(("x-forwarded-for", "1.1.1.1, not-an-ip"))
    assert resolve_client("10.0.0.2", headers, TRUSTED).ip == "10.0.0.2"


def test_no_trusted_proxies_means_socket_only() -> None:
    headers = h(("x-forwarded-for", "1.1.1.1"))
    assert resolve_client("10.0.0.2", headers, ()).ip == "10.0.0.2"
    assert resolve_client(None, headers, ()) is UNKNOWN


def test_ipv4_mapped_ipv6_is_ipv4() -> None:
    assert resolve_client("::ffff:192.0.2.1", [], ()).ip == "192.0.2.1"
