"""The testbed itself, in namespaces it builds: the impairment link delays and drops what it
is told to (a UDP probe checks, with tolerances), settings change while it runs, a mesh
link delays by far end and takes new delays while it runs, NAT maps and rebinds, firewall
profiles block what they say, and nothing is left behind."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tools.netsim import cli, layout, nat, net
from tools.netsim.forwarder import ImpairedLink
from tools.netsim.impair import Profile
from tools.netsim.mesh import MeshLinks
from tools.netsim.probe import EchoServer, probe, summarise

ADDR = layout.StandardAddresses()
ECHO_PORT = 7000


@pytest.fixture(scope="module")
def testbed() -> Iterator[net.Testbed]:
    with net.Testbed(layout.standard()) as built:
        yield built


@pytest.fixture(scope="module")
def link(testbed: net.Testbed) -> ImpairedLink:
    nat.Nat(testbed, "nat", "inet", "masquerade").apply()
    return ImpairedLink(testbed, 0)


def _udp(testbed: net.Testbed, host: str, bind: tuple[str, int] = ("0.0.0.0", 0)) -> socket.socket:
    with testbed.entered(host):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(bind)
    return sock


@pytest.fixture
def echo(testbed: net.Testbed, link: ImpairedLink) -> Iterator[tuple[str, int]]:
    server = EchoServer(_udp(testbed, "relay", (ADDR.relay_public, ECHO_PORT)))
    try:
        yield (ADDR.relay_public, ECHO_PORT)
    finally:
        server.close()
        link.set("both", delay_ms=0, jitter_ms=0, loss=0, reorder=0, rate_kbps=0, burst=1)


def test_probe_sees_the_configured_delay_and_jitter(
    testbed: net.Testbed, link: ImpairedLink, echo: tuple[str, int]
) -> None:
    link.set("up", delay_ms=30, jitter_ms=5)
    link.set("down", delay_ms=10)
    with _udp(testbed, "client") as sock:
        samples = probe(sock, echo, count=100, interval_s=0.01)
    summary = summarise(samples)
    assert summary.loss == 0, summary.line()
    # 40 ms configured, jitter +-5 ms one way; the forwarder adds well under 2 ms, but a
    # busy 2-core machine stalls a probe now and then: bound the bulk, not the tail.
    assert summary.rtt_min_ms >= 34, summary.line()
    assert 38 <= summary.rtt_median_ms <= 45, summary.line()
    inside = [s for s in samples if s is not None and 0.034 <= s <= 0.050]
    assert len(inside) >= 80, summary.line()


def test_probe_sees_the_configured_loss_and_the_link_changes_while_running(
    testbed: net.Testbed, link: ImpairedLink, echo: tuple[str, int]
) -> None:
    link.set("up", loss=0.10, burst=3)
    before = link.stats()["up"]
    with _udp(testbed, "client") as sock:
        lossy = summarise(probe(sock, echo, count=3000, interval_s=0.001, timeout_s=0.5))
        link.set("up", loss=0.0)
        clean = summarise(probe(sock, echo, count=200, interval_s=0.001, timeout_s=0.5))
    after = link.stats()["up"]
    dropped = after["dropped_loss"] - before["dropped_loss"]
    # What the probe lost is what the link dropped (nothing else on the path loses) ...
    assert abs(lossy.loss * lossy.sent - dropped) <= 3, (lossy.line(), dropped)
    # ... and that is the configured rate, within the spread of ~100 bursts of 3.
    assert 0.06 <= lossy.loss <= 0.15, lossy.line()
    assert clean.loss == 0, clean.line()


def test_rate_cap_limits_throughput(
    testbed: net.Testbed, link: ImpairedLink, echo: tuple[str, int]
) -> None:
    # 1000-byte probes at 1 per ms = 8 Mbit/s offered into a 2 Mbit/s cap with a 50 ms queue.
    link.set("up", rate_kbps=2000, queue_ms=50)
    with _udp(testbed, "client") as sock:
        summary = summarise(probe(sock, echo, count=500, interval_s=0.001, size=1000))
    assert 0.6 <= summary.loss <= 0.85, summary.line()
    assert summary.rtt_max_ms <= 80, summary.line()


def test_nat_maps_to_its_public_address_and_rebinding_changes_the_port(
    testbed: net.Testbed, link: ImpairedLink
) -> None:
    with (
        _udp(testbed, "relay", (ADDR.relay_public, 7001)) as server,
        _udp(testbed, "client") as client,
    ):
        server.settimeout(5)
        client.sendto(b"one", (ADDR.relay_public, 7001))
        _, before = server.recvfrom(100)
        rebinder = nat.Nat(testbed, "nat", "inet", "masquerade")
        rebinder.rebind()
        client.sendto(b"two", (ADDR.relay_public, 7001))
        _, after = server.recvfrom(100)
        rebinder.rebind()  # back to the first range for the other tests
    assert before[0] == after[0] == ADDR.nat_public
    assert before[1] != after[1]


def test_symmetric_nat_gives_each_destination_its_own_port(
    testbed: net.Testbed, link: ImpairedLink
) -> None:
    nat.Nat(testbed, "nat", "inet", "symmetric").apply()
    try:
        with (
            _udp(testbed, "relay", (ADDR.relay_public, 7002)) as one,
            _udp(testbed, "other", (ADDR.other, 7002)) as two,
            _udp(testbed, "client") as client,
        ):
            one.settimeout(5)
            two.settimeout(5)
            client.sendto(b"x", (ADDR.relay_public, 7002))
            client.sendto(b"x", (ADDR.other, 7002))
            _, seen_one = one.recvfrom(100)
            _, seen_two = two.recvfrom(100)
        assert seen_one[0] == seen_two[0] == ADDR.nat_public
        assert seen_one[1] != seen_two[1]
    finally:
        nat.Nat(testbed, "nat", "inet", "masquerade").apply()


def test_firewall_profiles_block_what_they_say(testbed: net.Testbed, link: ImpairedLink) -> None:
    with (
        _udp(testbed, "relay", (ADDR.relay_public, 53)) as dns,
        _udp(testbed, "relay", (ADDR.relay_public, 3478)) as stun,
        _udp(testbed, "client") as client,
    ):
        dns.settimeout(5)
        stun.settimeout(0.5)
        nat.apply_firewall(testbed, "client", "udp-dns-only")
        with pytest.raises(PermissionError):
            client.sendto(b"x", (ADDR.relay_public, 3478))
        client.sendto(b"x", (ADDR.relay_public, 53))
        assert dns.recvfrom(10)[0] == b"x"
    with testbed.entered("relay"):
        listener = socket.create_server((ADDR.relay_public, 443))
    with listener:
        nat.apply_firewall(testbed, "client", "tcp443-only")
        with testbed.entered("client"):
            ok = socket.create_connection((ADDR.relay_public, 443), timeout=5)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ok.close()
        with udp, pytest.raises(PermissionError):
            udp.sendto(b"x", (ADDR.relay_public, 53))
    testbed.run_in("client", ["nft", "delete", "table", "inet", "netsim_fw"])


def test_cleanup_after_a_failure_and_the_stale_run_sweep() -> None:
    small = layout.parse("host a\nhost b\nlink a 10.99.0.1/24 b 10.99.0.2/24\n")
    made: list[str] = []

    def fail_inside() -> None:
        with net.Testbed(small) as bed:
            made.extend(layout.namespaces(small, bed.prefix))
            bed.start(bed.ns("a"), ["sleep", "60"])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    listed = net.run(["ip", "netns", "list"])
    assert made
    assert not any(name in listed for name in made)

    # A run that died without cleaning up: a pid that is not alive.
    dead = 2**22 + 12345
    assert not os.path.exists(f"/proc/{dead}")
    stale = f"{layout.PREFIX_TAG}{dead}x0-a"
    net.run(["ip", "netns", "add", stale])
    assert stale in net.sweep()
    assert stale not in net.run(["ip", "netns", "list"])


def test_only_allowed_addresses() -> None:
    with pytest.raises(layout.LayoutError):
        layout.parse("host a\nhost b\nlink a 192.168.1.1/24 b 192.168.1.2/24\n")
    assert Profile().delay_ms == 0


def test_the_netsim_command_brings_a_layout_up_changes_it_and_tears_it_down() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    up = subprocess.Popen(
        [sys.executable, "-m", "tools.netsim.cli", "up", "--hold-s", "60"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert up.stdout is not None
        ready = select.select([up.stdout], [], [], 30)[0]
        assert ready, "netsim up printed nothing in 30 s"
        started = json.loads(up.stdout.readline())
        prefix, names = started["prefix"], started["namespaces"]
        assert set(names) <= set(net.run(["ip", "netns", "list"]).split())
        assert cli.main(["impair", "--prefix", prefix, "up", "delay_ms=5"]) == 0
        assert cli.main(["rebind", "--prefix", prefix]) == 0
        bed = net.Testbed(layout.standard(), prefix=prefix)
        assert "30000-39999" in bed.run_in("nat", ["nft", "list", "table", "ip", "netsim_nat"])
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=30)
    assert up.returncode == 0
    assert not set(names) & set(net.run(["ip", "netns", "list"]).split())


MESH_LAYOUT = """
router w
host a
host b
link a 10.77.1.2/24 w 10.77.1.1/24 impaired
link b 10.77.2.2/24 w 10.77.2.1/24
route a default via 10.77.1.1
route b default via 10.77.2.1
"""


def test_a_mesh_link_delays_by_far_end_and_takes_new_delays_while_running() -> None:
    with net.Testbed(layout.parse(MESH_LAYOUT)) as bed:
        mesh = MeshLinks(bed, [{"10.77.2.0/24": 20.0}])
        server = EchoServer(_udp(bed, "b", ("10.77.2.2", ECHO_PORT)))
        try:
            with _udp(bed, "a") as sock:
                slow = summarise(probe(sock, ("10.77.2.2", ECHO_PORT), count=20, interval_s=0.02))
                mesh.set_delays([{"10.77.2.0/24": 5.0}])  # the route changes
                fast = summarise(probe(sock, ("10.77.2.2", ECHO_PORT), count=20, interval_s=0.02))
        finally:
            server.close()
    # 20 ms each way, then 5. A delay is a floor, so the fastest round trip shows which one
    # applies (a busy machine only adds; the first probes after the reload may still see
    # the old delay, since the mesh takes SIGHUP asynchronously).
    assert slow.rtt_min_ms >= 40, slow.line()
    assert 10 <= fast.rtt_min_ms < 40, fast.line()
