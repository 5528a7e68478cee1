"""The relay process: usage, bad settings, health and reflection over real gRPC, drain, the
admin API and metrics, and kill -9 / restart with a real Redis."""

from __future__ import annotations

import contextlib
import os
import pathlib
import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
import redis as redis_client
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.service.redis_testing import redis_server
from libs.service.testing import (
    WORKSPACE,
    assert_service_lifecycle,
    binary,
    read_ready_line,
    run_cli,
    running_service,
)
from libs.wire import framing, recall, ufrag
from services.relay.relay_testing import free_udp_port
from services.relay.router import binding_request_for
from services.relay.store import binding_key
from voiceedge.common.v1 import common_pb2
from voiceedge.geosteer.v1 import geosteer_pb2, geosteer_pb2_grpc
from voiceedge.relay.v1 import relay_pb2, relay_pb2_grpc

COMMAND = binary("services/relay")
NOT_BASE64 = "!!"
# Loopback, any free ports; the TCP port is given because its default, 443, may not bind here.
ONE_WORKER = ["--workers", "1", "--tcp-listen", "127.0.0.1:0", "--udp-listen", "127.0.0.1:0"]
SRTP = bytes([0x80, 0x6F]) + bytes(100)
DTLS = bytes([22, 0xFE, 0xFD]) + bytes(30)


def test_help_lists_settings() -> None:
    result = run_cli(COMMAND, ["--help"])
    assert result.returncode == 0, result.stderr
    assert "--grpc-listen" in result.stdout
    assert "VOICEEDGE_RELAY_" in result.stdout


def test_bad_setting_is_a_clear_error() -> None:
    result = run_cli(COMMAND, ["--grpc-listen", "nowhere"])
    assert result.returncode == 2
    assert "grpc_listen: expected host:port" in result.stderr


def test_serves_health_and_reflection_then_drains() -> None:
    # The default ICE-TCP port is 443, which the test sandbox may not bind.
    assert_service_lifecycle(
        COMMAND, "voiceedge.relay.v1.RelayAdminService", ["--tcp-listen", "127.0.0.1:0"]
    )


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    return sock


def _frame(transceiver: socket.socket) -> bytes:
    """The next frame a fake transceiver receives, past the relay's recall hellos (a
    transceiver with no client of this relay answers none; services/relay/recall.py)."""
    for _ in range(100):  # a worker greets at most 5 times per start
        data = transceiver.recv(65535)
        if not recall.is_recall(data):
            return data
    raise AssertionError("only recall hellos")


def _name(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _send_until_forwarded(
    client: socket.socket, vip: tuple[str, int], transceiver: socket.socket, payload: bytes
) -> bytes:
    """Sends every 50 ms (at most 100 times) until the transceiver receives a frame."""
    transceiver.settimeout(0.05)
    try:
        for _ in range(100):
            client.sendto(payload, vip)
            with contextlib.suppress(TimeoutError):
                return _frame(transceiver)
    finally:
        transceiver.settimeout(5)
    raise AssertionError("nothing was forwarded")


def test_kill_9_and_restart_with_redis_keeps_the_call() -> None:
    keys = ufrag.dev_keyring()
    with redis_server() as redis, _udp() as transceiver, _udp() as client:
        media = _name(transceiver)
        vip = ("127.0.0.1", free_udp_port())
        args = [
            "--workers",
            "1",
            "--tcp-listen",
            "127.0.0.1:0",
            "--udp-listen",
            f"{vip[0]}:{vip[1]}",
            "--transceivers",
            f"1/1={media[0]}:{media[1]}",
            "--redis-url",
            redis.url,
        ]
        with running_service(COMMAND, args) as first:
            request, _ = binding_request_for(keys, 1, 1)
            client.sendto(request, vip)
            assert _frame(transceiver) == framing.encode(*_name(client), request)
            client.sendto(DTLS, vip)
            assert _frame(transceiver) == framing.encode(*_name(client), DTLS)
            assert _wait_binding_stored(redis.url, _name(client)) == b"1/1"
            first.process.send_signal(signal.SIGKILL)
            first.process.wait(timeout=10)
        with running_service(COMMAND, args) as second:
            # Same client, same VIP, no new STUN: the restarted relay finds it in Redis.
            frame = _send_until_forwarded(client, vip, transceiver, SRTP)
            assert frame == framing.encode(*_name(client), SRTP)
            client.sendto(DTLS, vip)
            # The loop above may have sent another SRTP packet before the first one's frame
            # arrived (a loaded machine): those are forwarded too, ahead of the DTLS one.
            for _ in range(100):  # bounded: at most 100 SRTP packets were sent
                frame = _frame(transceiver)
                if frame != framing.encode(*_name(client), SRTP):
                    break
            assert frame == framing.encode(*_name(client), DTLS)
            transceiver.sendto(
                framing.encode(*_name(client), SRTP), _address(second.ready["internal"])
            )
            data, source = client.recvfrom(65535)
            assert data == SRTP
            assert source == vip
            with grpc.insecure_channel(second.grpc_address) as channel:
                stub = relay_pb2_grpc.RelayAdminServiceStub(channel)
                stats = stub.GetStats(relay_pb2.GetStatsRequest(), timeout=10).stats
                assert stats.redis.enabled
                assert stats.redis.hits == 1
                assert stats.bindings_active == 1


def _next_event(lines: queue.Queue[str], event: str, seen: list[str]) -> None:
    """Reads the relay's log lines (appended to `seen`) up to the first `event=<event>`."""
    for _ in range(1000):  # bounded: a start logs a few dozen lines
        line = lines.get(timeout=60)
        seen.append(line)
        if f"event={event} " in line:
            return
    raise AssertionError(f"no {event} line in {len(seen)} lines")


def test_data_plane_forwards_before_the_admin_starts() -> None:
    """Start-up order (services/relay/__main__.py): worker 0 says relay.forwarding before the
    child worker starts and before gRPC is imported; a check sent once that line is out is
    forwarded; the ready line's timeline has the same order."""
    keys = ufrag.dev_keyring()
    with _udp() as transceiver, _udp() as client:
        media = _name(transceiver)
        vip = ("127.0.0.1", free_udp_port())
        process = subprocess.Popen(
            [
                *COMMAND,
                "--grpc-listen",
                "127.0.0.1:0",
                "--workers",
                "2",
                "--tcp-listen",
                "",
                "--udp-listen",
                f"{vip[0]}:{vip[1]}",
                "--transceivers",
                f"1/1={media[0]}:{media[1]}",
            ],
            cwd=WORKSPACE,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        stderr = process.stderr
        assert stderr is not None

        def pump() -> None:  # ends when the process's stderr closes
            for line in stderr:
                lines.put(line)

        reader = threading.Thread(target=pump)
        reader.start()
        try:
            seen: list[str] = []
            _next_event(lines, "relay.forwarding", seen)
            request, _ = binding_request_for(keys, 1, 1)
            frame = _send_until_forwarded(client, vip, transceiver, request)
            assert frame == framing.encode(*_name(client), request)
            ready = read_ready_line(process, 60)
            _next_event(lines, "service.ready", seen)
            events = [
                line.split("event=")[1].split()[0]
                for line in seen
                if "event=relay.forwarding " in line
                or "event=relay.worker_started " in line
                or "event=service.ready " in line
            ]
            assert events == ["relay.forwarding", "relay.worker_started", "service.ready"]
            marks = ready["startup_ms"]
            assert list(marks) == [
                "main",
                "topology",
                "bindings",
                "sockets",
                "forwarding",
                "workers",
                "admin",
            ]
            assert marks["forwarding"] <= marks["workers"] <= marks["admin"]
        finally:
            process.kill()
            process.wait(timeout=30)
            reader.join(timeout=30)


def _wait_binding_stored(url: str, client: tuple[str, int]) -> bytes | None:
    """The Redis copy of `client`'s binding once the relay wrote it (in its own task; the
    relay writes its topology copy too, so its count of writes does not say which)."""
    with redis_client.Redis.from_url(url) as db:
        for _ in range(100):  # bounded: the write is one round trip to a local Redis
            value = db.get(binding_key(client))
            if value is not None:
                return bytes(value)
            time.sleep(0.05)
    return None


def test_admin_api_stats_bindings_drain_and_metrics() -> None:
    keys = ufrag.dev_keyring()
    with _udp() as transceiver:
        media = _name(transceiver)
        args = [
            *ONE_WORKER,
            "--transceivers",
            f"1/1={media[0]}:{media[1]}",
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        with running_service(COMMAND, args) as relay, contextlib.ExitStack() as stack:
            vip = _address(relay.ready["udp"][0])
            clients = [stack.enter_context(_udp()) for _ in range(3)]
            for client in clients:
                client.sendto(binding_request_for(keys, 1, 1)[0], vip)
                _frame(transceiver)
            clients[0].sendto(b"\xff\x00", vip)
            clients[0].sendto(SRTP, vip)
            _frame(transceiver)
            with grpc.insecure_channel(relay.grpc_address) as channel:
                stub = relay_pb2_grpc.RelayAdminServiceStub(channel)
                stats = stub.GetStats(relay_pb2.GetStatsRequest(), timeout=10).stats
                assert stats.bindings_active == 3
                assert stats.bindings_created == 3
                assert not stats.redis.enabled
                drops = {(d.direction, d.reason): d.packets for d in stats.drops}
                assert drops == {
                    (
                        relay_pb2.DIRECTION_CLIENT_TO_TRANSCEIVER,
                        relay_pb2.DROP_REASON_UNKNOWN_CLASS,
                    ): 1
                }
                traffic = {
                    (t.direction, t.packet_class): t.packets_forwarded for t in stats.traffic
                }
                assert (
                    traffic[
                        (relay_pb2.DIRECTION_CLIENT_TO_TRANSCEIVER, relay_pb2.PACKET_CLASS_STUN)
                    ]
                    == 3
                )
                assert (
                    traffic[
                        (relay_pb2.DIRECTION_CLIENT_TO_TRANSCEIVER, relay_pb2.PACKET_CLASS_SRTP)
                    ]
                    == 1
                )
                assert [w.worker_id for w in stats.workers] == [0]

                first = stub.ListBindings(relay_pb2.ListBindingsRequest(page_size=2), timeout=10)
                assert len(first.bindings) == 2
                assert first.next_page_token
                rest = stub.ListBindings(
                    relay_pb2.ListBindingsRequest(page_size=2, page_token=first.next_page_token),
                    timeout=10,
                )
                assert len(rest.bindings) == 1
                assert not rest.next_page_token
                listed = [(b.client.ip, b.client.port) for b in [*first.bindings, *rest.bindings]]
                assert listed == sorted(_name(c) for c in clients)
                binding = first.bindings[0]
                assert (binding.cluster_id, binding.transceiver_id) == (1, 1)
                assert binding.transceiver_media_address.port == media[1]
                assert len(binding.ufrag) == ufrag.TEXT_LEN
                with pytest.raises(grpc.RpcError) as error:
                    stub.ListBindings(
                        relay_pb2.ListBindingsRequest(page_token=NOT_BASE64), timeout=10
                    )
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

                metrics = (
                    urllib.request.urlopen(f"http://{relay.ready['metrics']}/metrics", timeout=10)
                    .read()
                    .decode()
                )
                assert "voiceedge_relay_packets_total{" in metrics
                assert 'reason="unknown_class"' in metrics
                bindings_line = next(
                    line
                    for line in metrics.splitlines()
                    if line.startswith("voiceedge_relay_bindings")
                )
                assert bindings_line.endswith(" 3.0")

                drained = stub.Drain(relay_pb2.DrainRequest(grace_period_ms=60_000), timeout=10)
                assert drained.bindings_active == 3
                newcomer = stack.enter_context(_udp())
                newcomer.sendto(binding_request_for(keys, 1, 1)[0], vip)
                clients[1].sendto(SRTP, vip)  # existing bindings keep forwarding
                assert _frame(transceiver) == framing.encode(*_name(clients[1]), SRTP)
                stats = stub.GetStats(relay_pb2.GetStatsRequest(), timeout=10).stats
                assert stats.draining
                reasons = {d.reason: d.packets for d in stats.drops}
                assert reasons[relay_pb2.DROP_REASON_DRAINING] == 1


def test_a_full_table_evicts_the_oldest_and_says_so() -> None:
    keys = ufrag.dev_keyring()
    with _udp() as transceiver, contextlib.ExitStack() as stack:
        media = _name(transceiver)
        args = [
            *ONE_WORKER,
            "--max-bindings",
            "2",
        ]
        args += ["--transceivers", f"1/1={media[0]}:{media[1]}", "--metrics-listen", "127.0.0.1:0"]
        with running_service(COMMAND, args) as relay:
            vip = _address(relay.ready["udp"][0])
            clients = [stack.enter_context(_udp()) for _ in range(3)]
            for client in clients:
                client.sendto(binding_request_for(keys, 1, 1)[0], vip)
                _frame(transceiver)
            with grpc.insecure_channel(relay.grpc_address) as channel:
                stub = relay_pb2_grpc.RelayAdminServiceStub(channel)
                stats = stub.GetStats(relay_pb2.GetStatsRequest(), timeout=10).stats
            assert (stats.bindings_active, stats.bindings_created) == (2, 3)
            assert stats.bindings_evicted == 1
            metrics = (
                urllib.request.urlopen(f"http://{relay.ready['metrics']}/metrics", timeout=10)
                .read()
                .decode()
            )
            evictions = [
                line
                for line in metrics.splitlines()
                if line.startswith("voiceedge_relay_binding_evictions_total")
            ]
            assert len(evictions) == 1
            assert evictions[0].endswith(" 1.0")


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = open(f"/proc/{entry}/stat").read()  # noqa: SIM115
                if int(stat.rpartition(")")[2].split()[1]) == pid:
                    found.add(int(entry))
    return found


def test_two_workers_share_the_port_and_die_with_the_parent() -> None:
    keys = ufrag.dev_keyring()
    with _udp() as transceiver, contextlib.ExitStack() as stack:
        media = _name(transceiver)
        args = ["--workers", "2", "--tcp-listen", "127.0.0.1:0", "--udp-listen", "127.0.0.1:0"]
        args += ["--transceivers", f"1/1={media[0]}:{media[1]}"]
        with running_service(COMMAND, args) as relay:
            assert relay.ready["workers"] == 2
            vip = _address(relay.ready["udp"][0])
            clients = [stack.enter_context(_udp()) for _ in range(16)]
            for client in clients:
                request = binding_request_for(keys, 1, 1)[0]
                client.sendto(request, vip)
                assert _frame(transceiver) == framing.encode(*_name(client), request)
                client.sendto(SRTP, vip)
                assert _frame(transceiver) == framing.encode(*_name(client), SRTP)
            with grpc.insecure_channel(relay.grpc_address) as channel:
                stub = relay_pb2_grpc.RelayAdminServiceStub(channel)
                for _ in range(100):  # children report every 0.5 s; bounded wait
                    stats = stub.GetStats(relay_pb2.GetStatsRequest(), timeout=10).stats
                    if stats.bindings_active == len(clients):
                        break
                    time.sleep(0.1)
                assert stats.bindings_active == len(clients)
                assert [w.worker_id for w in stats.workers] == [0, 1]
                listed = stub.ListBindings(
                    relay_pb2.ListBindingsRequest(page_size=1000), timeout=10
                ).bindings
                assert sorted((b.client.ip, b.client.port) for b in listed) == sorted(
                    _name(c) for c in clients
                )
                assert {b.worker_id for b in listed} <= {0, 1}
            children = _children(relay.process.pid)
            assert children
            relay.process.send_signal(signal.SIGKILL)
            relay.process.wait(timeout=10)
            for _ in range(200):  # bounded: children notice the closed pipe at once
                if not any(os.path.exists(f"/proc/{pid}") for pid in children):
                    break
                time.sleep(0.05)
            alive = [pid for pid in children if os.path.exists(f"/proc/{pid}/stat")]
            zombies_only = all(
                open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] == "Z"  # noqa: SIM115
                for pid in alive
            )
            assert zombies_only, alive


GEOSTEER = binary("services/geosteer")


def test_routes_on_the_topology_watched_from_real_geosteer() -> None:
    keys = ufrag.dev_keyring()
    with _udp() as transceiver, _udp() as client, running_service(GEOSTEER) as geosteer:
        media = _name(transceiver)
        with grpc.insecure_channel(geosteer.grpc_address) as channel:
            geosteer_pb2_grpc.GeosteerServiceStub(channel).RegisterNode(
                geosteer_pb2.RegisterNodeRequest(
                    node=geosteer_pb2.Node(
                        node_id="transceiver-1-7",
                        kind=common_pb2.NODE_KIND_TRANSCEIVER,
                        cluster_id=1,
                        transceiver_id=7,
                        grpc_address="127.0.0.1:1",
                        media_address=common_pb2.SocketAddress(ip=media[0], port=media[1]),
                        capacity_sessions=10,
                    )
                ),
                timeout=10,
            )
        args = list(ONE_WORKER)
        args += ["--geosteer-address", geosteer.grpc_address]
        with running_service(COMMAND, args) as relay:
            vip = _address(relay.ready["udp"][0])
            # No static transceivers: the route exists once the watched topology arrived.
            request = binding_request_for(keys, 1, 7)[0]
            frame = _send_until_forwarded(client, vip, transceiver, request)
            assert frame == framing.encode(*_name(client), request)


RelayState = tuple[geosteer_pb2.Node | None, list[tuple[str, int, bool]]]


def _relay_in(message: geosteer_pb2.WatchTopologyResponse, node_id: str) -> RelayState:
    """The relay node `node_id` in cluster 1 (None if absent) and the VIPs geosteer
    advertises for cluster 1."""
    cluster = next(c for c in message.topology.clusters if c.cluster_id == 1)
    node = next((n for n in cluster.nodes if n.node_id == node_id), None)
    return node, [(e.ip, e.port, e.tcp) for e in cluster.relay_endpoints]


def _first(
    states: Iterator[RelayState], wanted: Callable[[geosteer_pb2.Node | None], bool]
) -> RelayState:
    """The first watched state whose relay node is `wanted`: at most 100 topology
    revisions, within the watch call's deadline."""
    for _, state in zip(range(100), states, strict=False):
        if wanted(state[0]):
            return state
    raise AssertionError("the watched topology never got there")


def test_registers_its_vip_with_geosteer_and_drains_out_of_the_answers(
    tmp_path: pathlib.Path,
) -> None:
    topology = tmp_path / "topology.toml"
    topology.write_text(
        '[[clusters]]\nid = 1\nname = "test-1"\nregion = "test"\nlatitude = 1.0\nlongitude = 1.0\n'
    )
    with running_service(GEOSTEER, ["--topology-path", str(topology)]) as geosteer:
        args = [
            *ONE_WORKER,
            "--node-id",
            "relay-a",
        ]
        args += ["--geosteer-address", geosteer.grpc_address, "--cluster-id", "1"]
        args += ["--public-advertise", "203.0.113.7:3478", "--drain-grace-s", "5"]
        args += ["--tcp-advertise", "203.0.113.7:443"]  # its ICE-TCP VIP, flagged tcp
        with (
            running_service(COMMAND, args) as relay,
            grpc.insecure_channel(geosteer.grpc_address) as channel,
        ):
            # Every change bumps the revision and reaches the watch.
            watch = geosteer_pb2_grpc.GeosteerServiceStub(channel).WatchTopology(
                geosteer_pb2.WatchTopologyRequest(), timeout=60
            )
            states = (_relay_in(message, "relay-a") for message in watch)
            node, advertised = _first(states, lambda n: n is not None)
            assert node is not None
            assert (node.kind, node.cluster_id, node.draining) == (
                common_pb2.NODE_KIND_RELAY,
                1,
                False,
            )
            assert node.grpc_address == relay.grpc_address
            assert advertised == [("203.0.113.7", 3478, False), ("203.0.113.7", 443, True)]

            with grpc.insecure_channel(relay.grpc_address) as admin:
                relay_pb2_grpc.RelayAdminServiceStub(admin).Drain(
                    relay_pb2.DrainRequest(grace_period_ms=60_000), timeout=10
                )
            node, advertised = _first(states, lambda n: n is None or n.draining)
            assert node is not None
            assert node.draining
            assert advertised == []

            relay.process.send_signal(signal.SIGTERM)
            assert relay.process.wait(timeout=30) == 0
            # Deregistered on the way out (SIGTERM: drain, then close).
            node, advertised = _first(states, lambda n: n is None)
            assert advertised == []  # closing the channel ends the watch


def _worker_pids(pid: int) -> set[int]:
    """The spawned worker processes among `pid`'s children (not multiprocessing's tracker)."""
    found = set()
    for child in _children(pid):
        with contextlib.suppress(OSError):
            cmdline = open(f"/proc/{child}/cmdline", "rb").read()  # noqa: SIM115
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                found.add(child)
    return found


def _relay_health(channel: grpc.Channel) -> int:
    name = relay_pb2.DESCRIPTOR.services_by_name["RelayAdminService"].full_name
    return int(
        health_pb2_grpc.HealthStub(channel)
        .Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        .status
    )


def test_a_killed_worker_is_replaced_and_health_says_so_meanwhile() -> None:
    keys = ufrag.dev_keyring()
    with _udp() as transceiver, contextlib.ExitStack() as stack:
        media = _name(transceiver)
        args = [
            "--workers",
            "2",
            "--udp-listen",
            "127.0.0.1:0",
            "--tcp-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        args += ["--transceivers", f"1/1={media[0]}:{media[1]}"]
        with (
            running_service(COMMAND, args) as relay,
            grpc.insecure_channel(relay.grpc_address) as channel,
        ):
            stub = relay_pb2_grpc.RelayAdminServiceStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert _relay_health(channel) == serving
            (worker,) = _worker_pids(relay.process.pid)
            os.kill(worker, signal.SIGKILL)
            seen_degraded = False
            for _ in range(600):  # bounded (~60 s): a replacement is a new interpreter
                stats = stub.GetStats(relay_pb2.GetStatsRequest(), timeout=10).stats
                health = _relay_health(channel)
                seen_degraded |= stats.degraded or health != serving
                if stats.workers[1].restarts == 1 and not stats.degraded:
                    break
                time.sleep(0.05)
            assert stats.workers[1].restarts == 1
            assert stats.workers[1].alive
            assert seen_degraded  # NOT_SERVING (relay service name) until replaced
            assert _relay_health(channel) == serving
            overall = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
            assert overall.status == serving  # the process as a whole kept serving
            new_pids = _worker_pids(relay.process.pid)
            assert len(new_pids) == 1
            assert worker not in new_pids
            # Both sockets forward again: clients spread over the two workers.
            vip = _address(relay.ready["udp"][0])
            for client in [stack.enter_context(_udp()) for _ in range(16)]:
                request = binding_request_for(keys, 1, 1)[0]
                client.sendto(request, vip)
                assert _frame(transceiver) == framing.encode(*_name(client), request)
            for _ in range(100):  # children report every 0.5 s; bounded wait
                stats = stub.GetStats(relay_pb2.GetStatsRequest(), timeout=10).stats
                if all(w.bindings_active for w in stats.workers):
                    break
                time.sleep(0.1)
            assert all(w.bindings_active for w in stats.workers), stats.workers
            url = f"http://{relay.ready['metrics']}/metrics"
            with urllib.request.urlopen(url, timeout=10) as page:
                text = page.read().decode()
            restarts = [
                line
                for line in text.splitlines()
                if line.startswith("voiceedge_relay_worker_restarts_total")
            ]
            assert len(restarts) == 1
            assert restarts[0].endswith(" 1.0"), restarts
