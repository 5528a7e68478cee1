"""The gRPC target of a `geosteer_address` setting: a pure function with no gRPC import,
so settings can validate it without loading grpc (the relay's data plane starts first)."""

from __future__ import annotations

import ipaddress

from libs.config.settings import host_port, join_host_port


def geosteer_target(value: str) -> str:
    """The gRPC target of a `geosteer_address` setting (a `Rule.parse`; ValueError says
    what is wrong): `host:port` as it is (a name resolves to all its addresses), or
    several comma-separated `ip:port` / `[ipv6]:port` of one address family as gRPC's
    `ipv4:` / `ipv6:` address list."""
    entries = [part.strip() for part in value.split(",")]
    if any(not entry for entry in entries):
        raise ValueError(f"empty entry in {value!r}")
    parsed = [host_port(entry) for entry in entries]
    if any(port == 0 for _, port in parsed):
        raise ValueError(f"port 0 in {value!r}")
    if len(parsed) == 1:
        return entries[0]
    families = set()
    for host, _ in parsed:
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(
                f"{host!r}: several addresses must be IP literals (one DNS name with several "
                "addresses stands alone)"
            ) from None
    if len(families) != 1:
        raise ValueError(f"mixes IPv4 and IPv6 in {value!r}")
    scheme = "ipv4" if families == {4} else "ipv6"
    return f"{scheme}:" + ",".join(join_host_port(host, port) for host, port in parsed)
