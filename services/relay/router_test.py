"""The pure routing core, table-driven: what is forwarded, what is dropped and why."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from libs.wire import framing, stun, ufrag
from services.relay.limits import Budget, SharedReplayTable
from services.relay.router import (
    C2T,
    T2C,
    Admission,
    Binding,
    Drop,
    Forward,
    Router,
    binding_request_for,
    source_key,
)
from services.relay.topology import TopologyView, static_view
from voiceedge.relay.v1 import relay_pb2

KEYS = ufrag.dev_keyring()
OTHER_KEYS = ufrag.Keyring.parse("1:" + "11" * 32)
ROTATED = ufrag.Keyring.parse("9:" + "22" * 32)
MEDIA = ("127.0.0.1", 40000)
MEDIA_2 = ("127.0.0.1", 40001)
FOREIGN = ("127.0.0.2", 40000)
CLIENT = ("203.0.113.9", 50000)
CLIENT_V6 = ("2001:db8::9", 50000)
TOPOLOGY = static_view(["1/1=127.0.0.1:40000", "1/2=127.0.0.1:40001", "7/42=127.0.0.2:40000"])
SRTP = bytes([0x80, 0x6F]) + b"\x00" * 198
DTLS = bytes([22, 0xFE, 0xFD]) + b"\x00" * 50
_NO_BINDING = relay_pb2.DROP_REASON_NO_BINDING


def router(**kwargs: object) -> Router:
    return Router(KEYS, TOPOLOGY, **kwargs)  # type: ignore[arg-type]


def request(
    cluster: int = 1, transceiver: int = 1, keys: ufrag.Keyring = KEYS, client_ufrag: str = "cli1"
) -> bytes:
    return binding_request_for(keys, cluster, transceiver, client_ufrag)[0]


def tampered_integrity() -> bytes:
    data = bytearray(request())
    mi = bytes(data).find(struct.pack("!HH", stun.ATTR_MESSAGE_INTEGRITY, 20))
    data[mi + 4] ^= 0xFF
    return bytes(data)


def with_username(username: str) -> bytes:
    return stun.binding_request(username, "x" * 32, b"t" * 12)


def forged_mac() -> bytes:
    server = ufrag.mint(KEYS, 1, 1)
    flipped = server[:30] + ("A" if server[30] != "A" else "B") + server[31:]  # MAC bits
    return stun.binding_request(f"{flipped}:cli1", ufrag.password(server, KEYS), b"f" * 12)


def binding_success() -> bytes:
    return stun.build(stun.BINDING_SUCCESS, b"s" * 12, [])


# (name, datagram factory, expected drop reason or None for forward to MEDIA)
FIRST_PACKET_CASES: list[tuple[str, Callable[[], bytes], int | None]] = [
    ("valid binding request", request, None),
    ("srtp without binding", lambda: SRTP, relay_pb2.DROP_REASON_NO_BINDING),
    ("dtls without binding", lambda: DTLS, relay_pb2.DROP_REASON_NO_BINDING),
    ("empty datagram", lambda: b"", relay_pb2.DROP_REASON_UNKNOWN_CLASS),
    ("first byte 200", lambda: b"\xc8" * 40, relay_pb2.DROP_REASON_UNKNOWN_CLASS),
    ("zrtp range", lambda: b"\x10" * 40, relay_pb2.DROP_REASON_UNKNOWN_CLASS),
    ("short stun", lambda: b"\x00\x01\x00", relay_pb2.DROP_REASON_MALFORMED),
    ("stun bad length", lambda: request()[:-4], relay_pb2.DROP_REASON_MALFORMED),
    ("binding success", binding_success, relay_pb2.DROP_REASON_NOT_BINDING_REQUEST),
    ("no username", lambda: stun.build(1, b"n" * 12, []), relay_pb2.DROP_REASON_BAD_UFRAG),
    ("username without colon", lambda: with_username("abc"), relay_pb2.DROP_REASON_BAD_UFRAG),
    ("ufrag not a token", lambda: with_username("abcd:efgh"), relay_pb2.DROP_REASON_BAD_UFRAG),
    ("forged mac", forged_mac, relay_pb2.DROP_REASON_BAD_MAC),
    ("other secret", lambda: request(keys=OTHER_KEYS), relay_pb2.DROP_REASON_BAD_MAC),
    ("unknown key id", lambda: request(keys=ROTATED), relay_pb2.DROP_REASON_UNKNOWN_KEY_ID),
    ("bad integrity", tampered_integrity, relay_pb2.DROP_REASON_BAD_MESSAGE_INTEGRITY),
    ("unknown cluster", lambda: request(cluster=3), relay_pb2.DROP_REASON_UNKNOWN_CLUSTER),
    ("unknown transceiver", lambda: request(1, 9), relay_pb2.DROP_REASON_UNKNOWN_TRANSCEIVER),
]


@pytest.mark.parametrize(("name", "make", "reason"), FIRST_PACKET_CASES)
def test_first_packet_from_unbound_client(
    name: str, make: Callable[[], bytes], reason: int | None
) -> None:
    r = router()
    data = make()
    result = r.route_client_packet(data, CLIENT, 0.0)
    if reason is None:
        assert result == Forward(MEDIA, framing.encode(*CLIENT, data)), name
        assert len(r) == 1
    else:
        assert result == Drop(reason), (name, result)
        assert r.drop_packets[C2T][reason] == 1
        assert len(r) == 0


def test_binding_carries_dtls_srtp_and_stun_responses() -> None:
    r = router()
    assert isinstance(r.route_client_packet(request(), CLIENT, 0.0), Forward)
    for data in (DTLS, SRTP, binding_success()):
        result = r.route_client_packet(data, CLIENT, 1.0)
        assert result == Forward(MEDIA, framing.encode(*CLIENT, data))
    binding = r.get(CLIENT)
    assert binding is not None
    assert binding.packets == 4
    assert binding.last_seen == 1.0
    # Another address of the same NAT is another client: nothing passes.
    assert r.route_client_packet(SRTP, ("203.0.113.9", 50001), 1.0) == Drop(
        relay_pb2.DROP_REASON_NO_BINDING
    )
    assert r.route_client_packet(b"\xff" * 10, CLIENT, 1.0) == Drop(
        relay_pb2.DROP_REASON_UNKNOWN_CLASS
    )


def test_ipv6_client_frame_matches_contract() -> None:
    r = router()
    data = request()
    result = r.route_client_packet(data, CLIENT_V6, 0.0)
    assert result == Forward(MEDIA, framing.encode(*CLIENT_V6, data))
    reply = framing.encode(*CLIENT_V6, SRTP)
    assert r.route_transceiver_packet(reply, MEDIA) == Forward(CLIENT_V6, SRTP)


def test_frame_vector_from_contract() -> None:
    vector = (Path(__file__).parents[2] / "libs/wire/testdata/frame_v4.bin").read_bytes()
    r = router()
    r.route_client_packet(request(), ("203.0.113.9", 50000), 0.0)
    assert r.route_transceiver_packet(vector, MEDIA) == Forward(
        ("203.0.113.9", 50000), bytes.fromhex("806f00017061796c6f6164")
    )


def test_ice_restart_rebinds_to_new_transceiver() -> None:
    r = router()
    r.route_client_packet(request(1, 1), CLIENT, 0.0)
    restart = request(1, 2, client_ufrag="cli2")
    assert r.route_client_packet(restart, CLIENT, 1.0) == Forward(
        MEDIA_2, framing.encode(*CLIENT, restart)
    )
    assert r.route_client_packet(SRTP, CLIENT, 1.0)[0] == MEDIA_2
    # The old transceiver no longer reaches the client.
    reply = framing.encode(*CLIENT, SRTP)
    assert r.route_transceiver_packet(reply, MEDIA) == Drop(relay_pb2.DROP_REASON_UNKNOWN_SOURCE)
    assert r.route_transceiver_packet(reply, MEDIA_2) == Forward(CLIENT, SRTP)
    # A forged restart does not move the binding.
    assert r.route_client_packet(forged_mac(), CLIENT, 2.0) == Drop(relay_pb2.DROP_REASON_BAD_MAC)
    assert r.route_client_packet(SRTP, CLIENT, 2.0)[0] == MEDIA_2


def test_ice_restart_onto_the_same_transceiver_keeps_the_binding() -> None:
    # What signaling's PATCH does: a new server ufrag for the same cluster and transceiver.
    r = router()
    r.route_client_packet(request(1, 1), CLIENT, 0.0)
    first = r.get(CLIENT)
    assert first is not None
    restart, new_ufrag = binding_request_for(KEYS, 1, 1, client_ufrag="cli2")
    assert r.route_client_packet(restart, CLIENT, 1.0) == Forward(
        MEDIA, framing.encode(*CLIENT, restart)
    )
    assert r.get(CLIENT) is first
    assert len(r) == 1
    assert first.ufrag == new_ufrag
    assert r.route_client_packet(SRTP, CLIENT, 1.0)[0] == MEDIA
    assert r.route_transceiver_packet(framing.encode(*CLIENT, SRTP), MEDIA) == Forward(CLIENT, SRTP)
    # A restart from a new address (the client moved) binds that address by the new ufrag.
    moved = ("203.0.113.9", 50001)
    again, _ = binding_request_for(KEYS, 1, 1, client_ufrag="cli3")
    assert r.route_client_packet(again, moved, 2.0) == Forward(MEDIA, framing.encode(*moved, again))


def test_foreign_cluster_goes_to_its_transceiver() -> None:
    r = router()
    data = request(7, 42)
    assert r.route_client_packet(data, CLIENT, 0.0) == Forward(
        FOREIGN, framing.encode(*CLIENT, data)
    )
    assert r.route_transceiver_packet(framing.encode(*CLIENT, SRTP), FOREIGN) == Forward(
        CLIENT, SRTP
    )


# (name, frame factory, source, expected drop reason or None for forward)
TRANSCEIVER_CASES: list[tuple[str, Callable[[], bytes], tuple[str, int], int | None]] = [
    ("reply to bound client", lambda: framing.encode(*CLIENT, SRTP), MEDIA, None),
    (
        "unknown source",
        lambda: framing.encode(*CLIENT, SRTP),
        ("127.0.0.1", 9),
        relay_pb2.DROP_REASON_UNKNOWN_SOURCE,
    ),
    (
        "other transceiver's client",
        lambda: framing.encode(*CLIENT, SRTP),
        MEDIA_2,
        relay_pb2.DROP_REASON_UNKNOWN_SOURCE,
    ),
    (
        "unbound client",
        lambda: framing.encode("198.51.100.1", 1, SRTP),
        MEDIA,
        relay_pb2.DROP_REASON_NO_BINDING,
    ),
    ("short frame", lambda: b"VE\x01", MEDIA, relay_pb2.DROP_REASON_BAD_FRAME),
    ("bad magic", lambda: b"XX" + framing.encode(*CLIENT, SRTP)[2:], MEDIA, 12),
    ("bad version", lambda: b"VE\x02" + framing.encode(*CLIENT, SRTP)[3:], MEDIA, 12),
    ("reserved flag", lambda: b"VE\x01\x02" + framing.encode(*CLIENT, SRTP)[4:], MEDIA, 12),
    ("short v6 frame", lambda: b"VE\x01\x01\x00\x01" + b"\x00" * 8, MEDIA, 12),
]


@pytest.mark.parametrize(("name", "make", "source", "reason"), TRANSCEIVER_CASES)
def test_transceiver_frames(
    name: str, make: Callable[[], bytes], source: tuple[str, int], reason: int | None
) -> None:
    r = router()
    r.route_client_packet(request(), CLIENT, 0.0)
    result = r.route_transceiver_packet(make(), source)
    if reason is None:
        assert result == Forward(CLIENT, SRTP)
        assert r.fwd_packets[T2C][3] == 1
    else:
        assert result == Drop(reason), name
        assert r.drop_packets[T2C][reason] == 1


def test_idle_expiry_and_refresh() -> None:
    r = router(idle_timeout_s=30.0)
    r.route_client_packet(request(), CLIENT, 0.0)
    r.route_client_packet(SRTP, CLIENT, 20.0)
    assert r.expire_idle(49.0) == 0
    assert r.expire_idle(51.0) == 1
    assert r.route_client_packet(SRTP, CLIENT, 52.0) == Drop(relay_pb2.DROP_REASON_NO_BINDING)
    assert r.route_transceiver_packet(framing.encode(*CLIENT, SRTP), MEDIA) == Drop(
        relay_pb2.DROP_REASON_NO_BINDING
    )
    assert r.bindings_expired == 1


def test_a_drain_forgets_finished_calls_at_once_but_keeps_live_ones() -> None:
    # A finished call's binding must not hold the drain for the whole idle timeout; a live
    # call (media, or at least ICE consent every ~5 s) keeps its binding.
    other = ("198.51.100.8", 40000)
    r = router(idle_timeout_s=30.0, drain_idle_s=8.0)
    r.route_client_packet(request(), CLIENT, 0.0)
    r.route_client_packet(request(), other, 0.0)
    r.route_client_packet(SRTP, CLIENT, 10.0)  # CLIENT still talking; other hung up at 0
    assert r.expire_idle(12.0) == 0  # not draining: the idle timeout rules
    r.draining = True
    assert r.expire_idle(12.0) == 1
    assert r.get(other) is None
    assert r.get(CLIENT) is not None
    assert r.expire_idle(19.0) == 1  # CLIENT silent for 9 s: its call is over too
    assert len(r) == 0


def test_max_bindings_evicts_the_oldest() -> None:
    r = router(max_bindings=2)
    clients = [("203.0.113.1", p) for p in (1, 2, 3)]
    for n, client in enumerate(clients):
        r.route_client_packet(request(), client, float(n))
    assert len(r) == 2
    assert r.get(clients[0]) is None
    assert r.get(clients[2]) is not None
    assert r.bindings_evicted == 1


def test_draining_refuses_new_clients_only() -> None:
    r = router()
    r.route_client_packet(request(), CLIENT, 0.0)
    r.draining = True
    assert isinstance(r.route_client_packet(SRTP, CLIENT, 1.0), Forward)
    assert r.route_client_packet(request(), ("203.0.113.1", 1), 1.0) == Drop(
        relay_pb2.DROP_REASON_DRAINING
    )


def test_integrity_check_can_be_disabled() -> None:
    r = router(verify_message_integrity=False)
    assert isinstance(r.route_client_packet(tampered_integrity(), CLIENT, 0.0), Forward)


def test_restore_and_topology_changes() -> None:
    created: list[Binding] = []
    r = router(on_bind=created.append)
    assert r.restore(CLIENT, 1, 2, 0.0)
    assert not r.restore(("203.0.113.1", 1), 5, 5, 0.0)
    assert r.route_client_packet(SRTP, CLIENT, 1.0)[0] == MEDIA_2
    assert [b.client for b in created] == [CLIENT]
    # The transceiver moved: the binding follows; it vanished: the binding stays, and so
    # does the node while it has one (retained), also for its replies.
    r.set_topology(TopologyView({(1, 2): ("127.0.0.1", 41000)}), wall=100.0)
    assert r.route_client_packet(SRTP, CLIENT, 2.0)[0] == ("127.0.0.1", 41000)
    r.set_topology(TopologyView({}), wall=101.0)
    assert (1, 2) in r.topology.retained
    assert r.route_client_packet(SRTP, CLIENT, 3.0)[0] == ("127.0.0.1", 41000)
    frame = framing.encode(*CLIENT, SRTP)
    assert r.route_transceiver_packet(frame, ("127.0.0.1", 41000)) == Forward(CLIENT, SRTP)
    # Binding gone and the hold passed: the node leaves with the next prune.
    r.expire_idle(3.0 + 31.0)
    assert not r.prune_topology(100.0 + 299.0)
    assert r.prune_topology(100.0 + 301.0)
    assert r.topology.transceivers == {}
    assert r.route_transceiver_packet(frame, ("127.0.0.1", 41000)) == Drop(
        relay_pb2.DROP_REASON_UNKNOWN_SOURCE
    )
    assert r.route_client_packet(request(), ("203.0.113.1", 2), 40.0) == Drop(
        relay_pb2.DROP_REASON_UNKNOWN_CLUSTER
    )


def test_testdata_vector_binds() -> None:
    # The shared binding request vector (cluster 7, transceiver 42, dev key).
    data = (Path(__file__).parents[2] / "libs/wire/testdata/binding_request_v1.bin").read_bytes()
    r = Router(ufrag.Keyring({1: bytes(range(32))}, 1), TOPOLOGY)
    assert r.route_client_packet(data, CLIENT, 0.0) == Forward(
        FOREIGN, framing.encode(*CLIENT, data)
    )


# ---- faults and abuse (issue 20) ----------------------------------------------------------


def _replay_router(**admission: object) -> Router:
    return router(admission=Admission(**admission))  # type: ignore[arg-type]


def test_a_replayed_binding_request_from_64_other_ports_binds_nothing() -> None:
    r = _replay_router()
    captured = request()
    assert isinstance(r.route_client_packet(captured, CLIENT, 0.0), Forward)
    attacker = [("192.0.2.2", 40000 + i) for i in range(64)]
    results = [r.route_client_packet(captured, a, 0.5) for a in attacker]
    assert results == [Drop(relay_pb2.DROP_REASON_REPLAYED)] * 64
    assert [b.client for b in r.bindings()] == [CLIENT]
    # And nothing comes back to them: the transceiver's replies have no binding to go to.
    for a in attacker:
        reply = framing.encode(*a, binding_success())
        assert r.route_transceiver_packet(reply, MEDIA) == Drop(relay_pb2.DROP_REASON_NO_BINDING)


def test_a_consent_check_of_a_bound_client_replayed_elsewhere_is_dropped() -> None:
    r = _replay_router()
    first, server = binding_request_for(KEYS, 1, 1)
    r.route_client_packet(first, CLIENT, 0.0)
    password = ufrag.password(server, KEYS)
    consent = stun.binding_request(f"{server}:cli1", password, b"c" * 12)
    assert isinstance(r.route_client_packet(consent, CLIENT, 5.0), Forward)  # recorded
    assert r.route_client_packet(consent, ("192.0.2.2", 1), 5.1) == Drop(
        relay_pb2.DROP_REASON_REPLAYED
    )
    # The client's own retransmission of it passes.
    assert isinstance(r.route_client_packet(consent, CLIENT, 5.2), Forward)


def test_nat_rebinding_and_new_candidates_still_bind_up_to_the_ufrag_budget() -> None:
    r = _replay_router(new_addresses_per_ufrag=Budget(0.5, 3.0))
    first, server = binding_request_for(KEYS, 1, 1)
    password = ufrag.password(server, KEYS)
    assert isinstance(r.route_client_packet(first, CLIENT, 0.0), Forward)

    def fresh(n: int) -> bytes:  # a genuine request: new transaction id, valid integrity
        return stun.binding_request(f"{server}:cli1", password, n.to_bytes(12, "big"))

    rebound = ("203.0.113.9", 60000)
    assert isinstance(r.route_client_packet(fresh(1), rebound, 1.0), Forward)
    assert isinstance(r.route_client_packet(fresh(2), ("203.0.113.9", 60001), 1.0), Forward)
    # Budget (burst 3) spent: a fourth address within the same second is refused, counted.
    assert r.route_client_packet(fresh(3), ("203.0.113.9", 60002), 1.0) == Drop(
        relay_pb2.DROP_REASON_ADDRESS_LIMIT
    )
    assert r.counters().drop_packets[C2T][relay_pb2.DROP_REASON_ADDRESS_LIMIT] == 1
    # Two seconds later the refill lets one more network change through.
    assert isinstance(r.route_client_packet(fresh(4), ("203.0.113.9", 60003), 3.0), Forward)
    # A forged request (wrong password) never spends the victim's budget.
    forged = stun.binding_request(f"{server}:cli1", "x" * len(password), b"z" * 12)
    for port in range(10):
        assert r.route_client_packet(forged, ("192.0.2.2", port), 10.0) == Drop(
            relay_pb2.DROP_REASON_BAD_MESSAGE_INTEGRITY
        )
    assert isinstance(r.route_client_packet(fresh(5), ("203.0.113.9", 60004), 10.0), Forward)


def test_unbound_floods_are_shed_per_ip_before_any_hmac() -> None:
    r = _replay_router(unbound_per_ip=Budget(10.0, 20.0), verifications=Budget(1e9, 1e9))
    bound = r.route_client_packet(request(), CLIENT, 0.0)
    assert isinstance(bound, Forward)
    flood = [r.route_client_packet(forged_mac(), ("192.0.2.2", p), 1.0) for p in range(100)]
    reasons = [d.reason for d in flood if isinstance(d, Drop)]
    assert reasons.count(relay_pb2.DROP_REASON_BAD_MAC) == 20  # the burst
    assert reasons.count(relay_pb2.DROP_REASON_RATE_LIMITED) == 80
    media = [r.route_client_packet(SRTP, ("192.0.2.2", p), 1.0) for p in range(100)]
    assert [d.reason for d in media if isinstance(d, Drop)].count(_NO_BINDING) == 20
    # The bound client, from another IP, is untouched.
    assert isinstance(r.route_client_packet(SRTP, CLIENT, 1.0), Forward)
    assert isinstance(r.route_client_packet(request(), ("203.0.113.50", 1), 1.0), Forward)


def test_the_verification_budget_caps_hmac_work_from_many_ips() -> None:
    r = _replay_router(verifications=Budget(100.0, 5.0))
    results = [r.route_client_packet(forged_mac(), (f"10.1.0.{i}", 1), 0.0) for i in range(50)]
    reasons = [d.reason for d in results if isinstance(d, Drop)]
    assert reasons.count(relay_pb2.DROP_REASON_OVERLOADED) == 45
    # 0.1 s later the refill (100/s) pays for ten more checks: a real client gets in.
    assert isinstance(r.route_client_packet(request(), CLIENT, 0.1), Forward)


def test_an_empty_answer_from_a_restarted_geosteer_keeps_routing() -> None:
    r = Router(KEYS, TopologyView(), topology_hold_s=60.0)
    r.set_topology(static_view(["1/1=127.0.0.1:40000", "1/2=127.0.0.1:40001"]), wall=0.0)
    assert isinstance(r.route_client_packet(request(1, 1), CLIENT, 0.0), Forward)
    r.set_topology(TopologyView(revision=1), wall=1.0)  # geosteer restarted: nobody yet
    assert r.topology.retained == {(1, 1), (1, 2)}
    frame = framing.encode(*CLIENT, SRTP)
    assert r.route_transceiver_packet(frame, MEDIA) == Forward(CLIENT, SRTP)
    # New calls to a node without bindings still bind during the hold.
    assert isinstance(r.route_client_packet(request(1, 2), ("203.0.113.1", 1), 1.0), Forward)
    # Transceivers re-register: the answer names them again, nothing is retained.
    r.set_topology(static_view(["1/1=127.0.0.1:40000"]), wall=2.0)
    assert r.topology.retained == {(1, 2)}  # still has a binding
    r.expire_idle(100.0)
    assert r.prune_topology(100.0)
    assert r.topology.retained == frozenset()
    assert set(r.topology.transceivers) == {(1, 1)}


def test_a_transceiver_that_left_geosteer_loses_its_callers_after_the_grace() -> None:
    """A node geosteer saw leave (dead or deregistered) goes after gone_grace_s although
    its callers' checks keep their bindings alive; with it go those bindings, so their Redis
    copies stop being refreshed, and a later packet of theirs is dropped, not forwarded to
    the dead node."""
    r = Router(KEYS, TopologyView(), topology_hold_s=60.0, gone_grace_s=5.0)
    both = static_view(["1/1=127.0.0.1:40000", "1/2=127.0.0.1:40001"])
    r.set_topology(both, wall=0.0)
    assert isinstance(r.route_client_packet(request(1, 1), CLIENT, 0.0), Forward)
    only_2 = TopologyView({(1, 2): ("127.0.0.1", 40001)}, 2, gone=frozenset({(1, 1)}))
    r.set_topology(only_2, wall=100.0)  # declared dead at 100 s
    assert r.topology.retained == {(1, 1)}  # its callers hear the end for the grace
    assert r.route_client_packet(SRTP, CLIENT, 101.0)[0] == MEDIA
    assert not r.prune_topology(104.0)
    assert r.prune_topology(105.5)
    assert set(r.topology.transceivers) == {(1, 2)}
    assert r.get(CLIENT) is None
    assert not isinstance(r.route_client_packet(SRTP, CLIENT, 106.0), Forward)
    assert r.counters().bindings_expired == 1


def test_preload_installs_bindings_without_writing_them_back() -> None:
    written: list[Binding] = []
    r = router(on_bind=written.append)
    entries = [(CLIENT, 1, 1), (("203.0.113.1", 2), 1, 2), (("203.0.113.1", 3), 9, 9)]
    assert r.preload(entries, 5.0) == 2
    assert written == []
    assert r.route_client_packet(SRTP, CLIENT, 5.0)[0] == MEDIA
    assert r.on_bind is not None


def test_workers_sharing_a_replay_table_catch_a_replay_on_the_other_worker() -> None:
    table = SharedReplayTable.create(1024)
    try:
        other = SharedReplayTable.attach(table.path, table.slots)  # as a child worker does
        worker_a, worker_b = router(replays=table), router(replays=other)
        captured = request()
        assert isinstance(worker_a.route_client_packet(captured, CLIENT, 0.0), Forward)
        for port in range(64):
            assert worker_b.route_client_packet(captured, ("192.0.2.2", port), 0.1) == Drop(
                relay_pb2.DROP_REASON_REPLAYED
            )
        assert len(worker_b) == 0
        other.close()
    finally:
        table.close()


def test_a_draining_transceiver_that_deregistered_still_reaches_its_bound_callers() -> None:
    # The transceiver deregisters in the same instant it closes its sessions: its last
    # packets (the data-channel event, the DTLS close alert) must still reach the callers.
    r = Router(KEYS, TopologyView(), topology_hold_s=60.0)
    r.set_topology(static_view(["1/1=127.0.0.1:40000", "1/2=127.0.0.1:40001"]), wall=0.0)
    r.route_client_packet(request(1, 1), CLIENT, 0.0)
    r.set_topology(static_view(["1/2=127.0.0.1:40001"]), wall=1.0)  # 1/1 left geosteer
    alert = bytes([21, 0xFE, 0xFD]) + bytes(20)  # a DTLS alert record
    assert r.route_transceiver_packet(framing.encode(*CLIENT, alert), MEDIA) == Forward(
        CLIENT, alert
    )
    # Long after the hold, still there while the caller's binding lives.
    assert not r.prune_topology(500.0)
    assert (1, 1) in r.topology.retained


def test_ipv6_sources_share_a_budget_per_64() -> None:
    assert source_key("203.0.113.9") == "203.0.113.9"
    assert source_key("2001:db8:1:2::5") == source_key("2001:db8:1:2:ffff::9")
    assert source_key("2001:db8:1:2::5") != source_key("2001:db8:1:3::5")
    r = _replay_router(unbound_per_ip=Budget(1.0, 4.0))
    results = [
        r.route_client_packet(forged_mac(), (f"2001:db8:1:2::{i:x}", 1), 0.0) for i in range(10)
    ]
    reasons = [d.reason for d in results if isinstance(d, Drop)]
    assert reasons.count(relay_pb2.DROP_REASON_RATE_LIMITED) == 6
