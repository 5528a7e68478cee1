"""A testbed described in a few lines, and the `ip` commands that build it (pure).

    host client                          # a network namespace
    router nat                           # a namespace that forwards (net.ipv4.ip_forward=1)
    link client 10.10.0.2/24 nat 10.10.0.1/24 impaired
    route client default via 10.10.0.1

`plan()` turns a `Layout` into the argv lists that build it; `net.py` runs them. An
`impaired` link gets a namespace of its own in the middle (`<prefix>imp<n>`) whose two
interfaces carry no address: the impairment forwarder (impair.py) bridges them in userspace,
because these kernels have no sch_netem.

Addresses must lie in 10.0.0.0/8 or the documentation ranges (RFC 5737), so nothing the
testbed sends can reach a real network.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass

ALLOWED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)
IFNAME_MAX = 15  # IFNAMSIZ - 1
PREFIX_TAG = "vens"  # every namespace the testbed makes starts with this


class LayoutError(ValueError):
    """The description is malformed or names an address outside the allowed ranges."""


@dataclass(frozen=True)
class Host:
    name: str
    router: bool = False


@dataclass(frozen=True)
class Link:
    a: str
    a_address: str  # "10.10.0.2/24"
    b: str
    b_address: str
    impaired: bool = False


@dataclass(frozen=True)
class Route:
    host: str
    destination: str  # "default" or a CIDR
    via: str


@dataclass(frozen=True)
class Layout:
    hosts: tuple[Host, ...]
    links: tuple[Link, ...] = ()
    routes: tuple[Route, ...] = ()

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise LayoutError(f"no host {name!r}")

    def address_of(self, host: str, peer: str) -> str:
        """`host`'s address (no prefix length) on its link to `peer`."""
        for link in self.links:
            if (link.a, link.b) == (host, peer):
                return link.a_address.split("/")[0]
            if (link.b, link.a) == (host, peer):
                return link.b_address.split("/")[0]
        raise LayoutError(f"no link between {host!r} and {peer!r}")

    def impaired_links(self) -> list[Link]:
        return [link for link in self.links if link.impaired]


def check_address(text: str) -> ipaddress.IPv4Interface:
    try:
        interface = ipaddress.IPv4Interface(text)
    except ValueError as exc:
        raise LayoutError(f"bad address {text!r}: {exc}") from None
    if not any(interface.ip in network for network in ALLOWED_NETWORKS):
        raise LayoutError(f"{text}: only 10/8, 192.0.2/24, 198.51.100/24, 203.0.113/24")
    return interface


def parse(text: str) -> Layout:
    """Parses the line format in the module docstring; `#` starts a comment."""
    hosts: list[Host] = []
    links: list[Link] = []
    routes: list[Route] = []
    for number, raw in enumerate(text.splitlines(), 1):
        words = shlex.split(raw, comments=True)
        if not words:
            continue
        kind, args = words[0], words[1:]
        if kind in ("host", "router") and len(args) == 1:
            hosts.append(Host(args[0], router=kind == "router"))
        elif kind == "link" and len(args) in (4, 5):
            if len(args) == 5 and args[4] != "impaired":
                raise LayoutError(f"line {number}: the 5th word of a link can only be impaired")
            links.append(Link(args[0], args[1], args[2], args[3], impaired=len(args) == 5))
        elif kind == "route" and len(args) == 4 and args[2] == "via":
            routes.append(Route(args[0], args[1], args[3]))
        else:
            raise LayoutError(f"line {number}: cannot read {raw.strip()!r}")
    layout = Layout(tuple(hosts), tuple(links), tuple(routes))
    validate(layout)
    return layout


def validate(layout: Layout) -> None:
    names = [host.name for host in layout.hosts]
    if len(set(names)) != len(names):
        raise LayoutError("host names must be unique")
    for name in names:
        if not name.isalnum() or len(name) > 8:
            raise LayoutError(f"host {name!r}: 1-8 letters or digits (namespace/ifname budget)")
    for link in layout.links:
        for end in (link.a, link.b):
            layout.host(end)
        check_address(link.a_address)
        check_address(link.b_address)
    for route in layout.routes:
        layout.host(route.host)
        check_address(route.via)
        if route.destination != "default":
            check_address(route.destination)


def namespace(prefix: str, host: str) -> str:
    return f"{prefix}{host}"


def ifname(peer: str) -> str:
    """The interface facing `peer` inside a host: `to-<peer>` (unique per host)."""
    return f"to-{peer}"[:IFNAME_MAX]


def impair_namespace(prefix: str, index: int) -> str:
    return f"{prefix}imp{index}"


def namespaces(layout: Layout, prefix: str) -> list[str]:
    """Every namespace `plan` creates, hosts first."""
    made = [namespace(prefix, host.name) for host in layout.hosts]
    made += [impair_namespace(prefix, i) for i, _ in enumerate(layout.impaired_links())]
    return made


def _veth(name: str, ns: str) -> list[str]:
    return ["ip", "link", "add", "name", name, "netns", ns, "type", "veth"]


def _in(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def plan(layout: Layout, prefix: str) -> list[list[str]]:
    """The commands that build `layout` with every namespace named `<prefix><host>`."""
    commands: list[list[str]] = []
    for ns in namespaces(layout, prefix):
        commands.append(["ip", "netns", "add", ns])
        commands.append(["ip", "-n", ns, "link", "set", "lo", "up"])
    impaired = 0
    for link in layout.links:
        a_ns, b_ns = namespace(prefix, link.a), namespace(prefix, link.b)
        a_if, b_if = ifname(link.b), ifname(link.a)
        mid = ""
        if link.impaired:
            mid = impair_namespace(prefix, impaired)
            impaired += 1
            # a <-> mid:side-a   mid:side-b <-> b; the forwarder bridges side-a and side-b.
            for ns, name, side in ((a_ns, a_if, "side-a"), (b_ns, b_if, "side-b")):
                commands.append([*_veth(name, ns), "peer", "name", side, "netns", mid])
        else:
            commands.append([*_veth(a_if, a_ns), "peer", "name", b_if, "netns", b_ns])
        for ns, name, address in ((a_ns, a_if, link.a_address), (b_ns, b_if, link.b_address)):
            commands.append(["ip", "-n", ns, "addr", "add", address, "dev", name])
            commands.append(["ip", "-n", ns, "link", "set", name, "up"])
        if mid:
            for ns, name in ((a_ns, a_if), (b_ns, b_if)):
                # veth leaves checksums to "hardware" (CHECKSUM_PARTIAL); a frame the bridge
                # copies out of userspace would arrive with a bad one. Compute them in
                # software, and segment in software so no frame exceeds the MTU.
                commands.append(
                    [*_in(ns, "ethtool", "-K", name), "tx", "off", "tso", "off", "gso", "off"]
                )
            for side in ("side-a", "side-b"):
                # Up before promisc: the other order leaves the peer without carrier here.
                commands.append(["ip", "-n", mid, "link", "set", side, "up"])
                # Frames carry the far end's MAC: the bridge must see them all.
                commands.append(["ip", "-n", mid, "link", "set", side, "promisc", "on"])
    for host in layout.hosts:
        if host.router:
            ns = namespace(prefix, host.name)
            commands.append(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    for route in layout.routes:
        ns = namespace(prefix, route.host)
        commands.append(["ip", "-n", ns, "route", "add", route.destination, "via", route.via])
    return commands


# The standard layout of issue 12: a client behind a NAT on an impaired access link, an
# "internet" router, a relay host with a public and an internal leg, and a cluster host
# (signaling's public HTTP leg, everything else on the internal network). A third host on
# the internet ("other") sends forged and replayed packets.
STANDARD = """
host client
router nat
router inet
host relay
host cluster
host other
link client 10.10.0.2/24 nat 10.10.0.1/24 impaired
link nat 198.51.100.2/24 inet 198.51.100.1/24
link inet 203.0.113.1/25 relay 203.0.113.10/25
link inet 203.0.113.129/25 cluster 203.0.113.130/25
link inet 192.0.2.1/24 other 192.0.2.2/24
link relay 10.20.0.1/24 cluster 10.20.0.2/24
route client default via 10.10.0.1
route nat default via 198.51.100.1
route relay default via 203.0.113.1
route cluster default via 203.0.113.129
route other default via 192.0.2.1
"""


@dataclass(frozen=True)
class StandardAddresses:
    """Where things are in STANDARD (one place, so tests and docs agree)."""

    client: str = "10.10.0.2"
    nat_public: str = "198.51.100.2"
    relay_public: str = "203.0.113.10"
    relay_internal: str = "10.20.0.1"
    cluster_internal: str = "10.20.0.2"
    signaling_public: str = "203.0.113.130"
    other: str = "192.0.2.2"


def standard() -> Layout:
    return parse(STANDARD)
