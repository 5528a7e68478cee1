"""The client IP used for geo routing: the TCP peer, or X-Forwarded-For behind trusted
proxies. Pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_ip(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """The right-most X-Forwarded-For hop that is not a trusted proxy, if the peer itself is
    trusted; otherwise the peer. Each proxy appends the address it saw, so only hops added
    by our own proxies can be believed; anything left of the first untrusted hop is
    client-controlled. Returns "" when nothing usable is known."""
    peer = (peer or "").strip()
    if not _valid(peer):
        return ""
    if not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    current = peer
    for hop in reversed([h for h in hops if h]):
        if not _valid(hop):
            return current
        current = hop
        if not _trusted(hop, trusted):
            return hop
    return current


def _valid(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
