"""nftables NAT and firewall profiles as ruleset text (pure), and applying them.

NAT profiles on a router host (RFC 4787 terms):
- `masquerade`: endpoint-independent mapping; one public port per client socket, kept for
  every destination, as most home routers do.
- `symmetric`: address-and-port-dependent mapping with randomised ports (`random`), so
  every destination gets its own public port.

A NAT has a *generation*: its public ports come from one of two ranges. `rebind()` switches
to the other range and deletes the UDP conntrack entries, so the next packet of every UDP
flow gets a new public port: the NAT rebinding real carrier-grade NATs do mid-call.

Firewall profiles for a client host: `udp-dns-only` (UDP blocked except port 53),
`tcp443-only` (only TCP to port 443 leaves the host).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from tools.netsim import net

NAT_PROFILES = ("masquerade", "symmetric")
FIREWALL_PROFILES = ("udp-dns-only", "tcp443-only")
PORT_RANGES = ((20000, 29999), (30000, 39999))  # by generation % 2


@dataclass(frozen=True)
class NatConfig:
    profile: str  # one of NAT_PROFILES
    outside_if: str  # the interface facing the internet
    generation: int = 0


def nat_ruleset(config: NatConfig) -> str:
    """The whole `netsim_nat` table: replacing it is atomic (one `nft -f` transaction)."""
    if config.profile not in NAT_PROFILES:
        raise ValueError(f"NAT profile {config.profile!r}: one of {NAT_PROFILES}")
    low, high = PORT_RANGES[config.generation % 2]
    flags = " random" if config.profile == "symmetric" else ""
    out = config.outside_if
    return f"""table ip netsim_nat
delete table ip netsim_nat
table ip netsim_nat {{
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{out}" meta l4proto {{ tcp, udp }} masquerade to :{low}-{high}{flags}
    oifname "{out}" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
    iifname "{out}" drop
  }}
}}
"""


def firewall_ruleset(profile: str) -> str:
    """An output filter for a client host (inbound replies pass by conntrack)."""
    if profile == "udp-dns-only":
        allow = "udp dport 53 accept\n    meta l4proto udp drop"
    elif profile == "tcp443-only":
        allow = "tcp dport 443 accept\n    drop"
    else:
        raise ValueError(f"firewall profile {profile!r}: one of {FIREWALL_PROFILES}")
    return f"""table inet netsim_fw
delete table inet netsim_fw
table inet netsim_fw {{
  chain out {{
    type filter hook output priority filter; policy accept;
    oifname "lo" accept
    ct state established,related accept
    {allow}
  }}
}}
"""


def apply_ruleset(ns: str, ruleset: str) -> None:
    # `table X` then `delete table X` makes the replace work whether or not it existed.
    net.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=ruleset)


class Nat:
    """NAT on one router host of a Testbed."""

    def __init__(self, testbed: net.Testbed, router: str, outside_peer: str, profile: str):
        self._ns = testbed.ns(router)
        self.config = NatConfig(profile, testbed.ifname(router, outside_peer))

        self._state = testbed.run_dir / f"nat-{router}.json"

    def apply(self) -> Nat:
        apply_ruleset(self._ns, nat_ruleset(self.config))
        # Kept beside the run, so `netsim rebind` in another process knows the generation.
        self._state.write_text(json.dumps(dataclasses.asdict(self.config)))
        return self

    @classmethod
    def running(cls, testbed: net.Testbed, router: str) -> Nat:
        """The NAT another process applied on this testbed (by `apply`)."""
        state = json.loads((testbed.run_dir / f"nat-{router}.json").read_text())
        found = cls(testbed, router, "", state["profile"])
        found.config = NatConfig(**state)
        return found

    def rebind(self) -> None:
        """Every UDP flow through this NAT gets a new public port from its next packet on."""
        self.config = dataclasses.replace(self.config, generation=self.config.generation + 1)
        self.apply()
        # conntrack exits 1 when nothing matched; that is fine.
        net.run(["ip", "netns", "exec", self._ns, "conntrack", "-D", "-p", "udp"], check=False)

    def udp_mappings(self) -> str:
        """`conntrack -L -p udp` of this NAT (for logs and tests)."""
        return net.run(
            ["ip", "netns", "exec", self._ns, "conntrack", "-L", "-p", "udp"], check=False
        )


def apply_firewall(testbed: net.Testbed, host: str, profile: str) -> None:
    apply_ruleset(testbed.ns(host), firewall_ruleset(profile))


def remove_firewall(testbed: net.Testbed, host: str) -> None:
    """Undoes apply_firewall (nothing to do if none is applied)."""
    net.run(
        ["ip", "netns", "exec", testbed.ns(host), "nft", "delete", "table", "inet", "netsim_fw"],
        check=False,
    )
