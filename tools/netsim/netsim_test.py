"""The pure parts of the testbed: layout parsing and the build plan, NAT and firewall
rulesets, the impairment schedule (RNG injected, table-driven)."""

from __future__ import annotations

import random

import pytest

from tools.netsim import layout, nat
from tools.netsim.impair import Profile, Schedule


def test_standard_layout_parses_and_names_every_namespace_with_the_prefix() -> None:
    parsed = layout.standard()
    names = layout.namespaces(parsed, "vens1x0-")
    assert names[0] == "vens1x0-client"
    assert "vens1x0-imp0" in names
    assert all(n.startswith("vens1x0-") for n in names)
    for argv in layout.plan(parsed, "vens1x0-"):
        if argv[:2] == ["ip", "-n"]:
            assert argv[2] in names


def test_impaired_link_goes_through_a_middle_namespace_without_addresses() -> None:
    parsed = layout.parse("host a\nhost b\nlink a 10.0.0.1/24 b 10.0.0.2/24 impaired\n")
    commands = layout.plan(parsed, "p-")
    veths = [c for c in commands if c[:3] == ["ip", "link", "add"]]
    assert [c[3:7] for c in veths] == [
        ["name", "to-b", "netns", "p-a"],
        ["name", "to-a", "netns", "p-b"],
    ]
    assert all(c[-1] == "p-imp0" for c in veths)
    addressed = {c[2] for c in commands if c[3:5] == ["addr", "add"]}
    assert addressed == {"p-a", "p-b"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host a\nhost a\n", "unique"),
        ("host a\nhost b\nlink a 8.8.8.8/24 b 10.0.0.2/24\n", "only 10/8"),
        ("host a\nlink a 10.0.0.1/24 zz 10.0.0.2/24\n", "no host"),
        ("host a\nroute a default via 1.1.1.1\n", "only 10/8"),
        ("host a\nwire a b\n", "cannot read"),
        ("host waytoolongname\n", "1-8"),
        ("host a\nhost b\nlink a 10.0.0.1/24 b 10.0.0.2/24 lossy\n", "impaired"),
    ],
)
def test_bad_layouts_are_refused(text: str, message: str) -> None:
    with pytest.raises(layout.LayoutError, match=message):
        layout.parse(text)


def test_nat_generations_alternate_port_ranges_and_symmetric_randomises() -> None:
    first = nat.nat_ruleset(nat.NatConfig("masquerade", "to-inet"))
    second = nat.nat_ruleset(nat.NatConfig("masquerade", "to-inet", generation=1))
    assert "masquerade to :20000-29999\n" in first
    assert "masquerade to :30000-39999\n" in second
    symmetric = nat.nat_ruleset(nat.NatConfig("symmetric", "to-inet"))
    assert "masquerade to :20000-29999 random" in symmetric
    assert 'iifname "to-inet" drop' in first  # nothing unsolicited gets in
    with pytest.raises(ValueError, match="NAT profile"):
        nat.nat_ruleset(nat.NatConfig("fullcone", "x"))


@pytest.mark.parametrize(
    ("profile", "needle"),
    [("udp-dns-only", "udp dport 53 accept"), ("tcp443-only", "tcp dport 443 accept")],
)
def test_firewall_profiles(profile: str, needle: str) -> None:
    assert needle in nat.firewall_ruleset(profile)


class Scripted:
    """An RNG that returns the given values in turn."""

    def __init__(self, values: list[float]) -> None:
        self._values = iter(values)

    def random(self) -> float:
        return next(self._values)


@pytest.mark.parametrize(
    ("profile", "draws", "arrivals", "expected"),
    [
        # plain delay
        (Profile(delay_ms=10), [], [0.0, 0.001], [0.010, 0.011]),
        # jitter: uniform in +-5 ms, floored; order kept (the second cannot overtake)
        (Profile(delay_ms=10, jitter_ms=5), [1.0, 0.0], [0.0, 0.001], [0.015, 0.015]),
        # reorder: the second skips the queue and overtakes the first
        (Profile(delay_ms=10, reorder=0.5), [0.9, 0.1], [0.0, 0.001], [0.010, 0.001]),
        # rate cap: 1000 bytes at 800 kbit/s = 10 ms each, serialised
        (Profile(rate_kbps=800), [], [0.0, 0.0, 0.0], [0.010, 0.020, 0.030]),
        # the rate queue is full after queue_ms: tail drop
        (Profile(rate_kbps=800, queue_ms=15), [], [0.0, 0.0, 0.0], [0.010, 0.020, None]),
    ],
)
def test_schedule_table(
    profile: Profile, draws: list[float], arrivals: list[float], expected: list[float | None]
) -> None:
    schedule = Schedule(profile, Scripted(draws))
    got = [schedule.decide(t, 1000) for t in arrivals]
    assert got == [pytest.approx(e) if e is not None else None for e in expected]


def test_gilbert_loss_has_the_configured_rate_and_burst_length() -> None:
    schedule = Schedule(Profile(loss=0.03, burst=3), random.Random(7))
    lost = [schedule.decide(i * 0.02, 200) is None for i in range(200_000)]
    assert sum(lost) / len(lost) == pytest.approx(0.03, rel=0.1)
    bursts, run = [], 0
    for flag in [*lost, False]:
        if flag:
            run += 1
        elif run:
            bursts.append(run)
            run = 0
    assert sum(bursts) / len(bursts) == pytest.approx(3.0, rel=0.1)


def test_profile_changes_are_validated() -> None:
    assert Profile().with_changes({"delay_ms": 25}).delay_ms == 25
    with pytest.raises(ValueError, match="unknown"):
        Profile().with_changes({"latency": 1})
    with pytest.raises(ValueError, match="loss"):
        Profile().with_changes({"loss": 1.5})


def test_a_reseeded_schedule_repeats_its_draws() -> None:
    profile = Profile(loss=0.03, burst=3, jitter_ms=20.0)
    first, second = Schedule(profile), Schedule(profile)
    first.reseed(5)
    second.reseed(5)
    times = [i * 0.02 for i in range(500)]
    assert [first.decide(t, 200) for t in times] == [second.decide(t, 200) for t in times]
    assert first.dropped_loss == second.dropped_loss > 0
