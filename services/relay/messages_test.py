"""The worker pipe's messages: every message survives encode/decode unchanged, and bytes
that are not a well-formed message raise MessageError (never anything else)."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from services.relay import messages
from services.relay.dataplane import WorkerCounters
from services.relay.router import N_CLASSES, N_REASONS, BindingInfo, RouterCounters
from services.relay.store import RedisCounts
from services.relay.tcp import N_CLOSE_REASONS, TcpCounters


def _matrix(columns: int, base: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(base + 10 * row + col for col in range(columns)) for row in range(2))


COUNTERS = WorkerCounters(
    RouterCounters(
        _matrix(N_CLASSES, 1),
        _matrix(N_CLASSES, 100),
        _matrix(N_CLASSES, 2),
        _matrix(N_CLASSES, 200),
        _matrix(N_REASONS, 3),
        _matrix(N_REASONS, 300),
        bindings_active=4,
        bindings_created=5,
        bindings_expired=6,
        bindings_evicted=7,
    ),
    RedisCounts(hits=8, misses=9, errors=10, writes=2**40),
    TcpCounters(11, 12, 13, tuple(range(N_CLOSE_REASONS)), 14, 15, 16),
)
BINDING = BindingInfo(
    client=("2001:db8::1", 40000),
    cluster_id=1,
    transceiver_id=65535,
    media=("10.0.0.7", 41000),
    ufrag="ABCDEFGH",
    last_seen=12345.25,
    packets=3,
    bytes=600,
    created_at=1.7e9,
)

MESSAGES: list[messages.Message] = [
    messages.Ready(("127.0.0.1:3478", "[::1]:3478"), "127.0.0.1:40001"),
    messages.CountersReport(COUNTERS),
    messages.CountersReport(WorkerCounters()),
    messages.BindingsReply(7, (BINDING, BINDING)),
    messages.BindingsReply(1, ()),
    messages.ListBindings(7),
    messages.Drain(2.5),
    messages.Drain(0.0),
    messages.Stop(),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_the_round_trip(message: messages.Message) -> None:
    assert messages.decode(messages.encode(message)) == message


def _counters_body() -> list[object]:
    body: list[object] = json.loads(messages.encode(messages.CountersReport(COUNTERS)))
    return body


def _replaced(body: list[object], index: int, value: object) -> bytes:
    copy = list(body)
    copy[index] = value
    return json.dumps(copy).encode()


def _binding_body(index: int, value: object) -> bytes:
    body = json.loads(messages.encode(messages.BindingsReply(1, (BINDING,))))
    body[2][0][index] = value
    return json.dumps(body).encode()


MALFORMED = [
    ("empty", b""),
    ("not json", b"\x80\x81 not json"),
    ("not utf-8", b'["stop"\xff]'),
    ("a number", b"42"),
    ("an object", b'{"tag": "stop"}'),
    ("empty list", b"[]"),
    ("tag not a string", b"[1]"),
    ("unknown tag", b'["reboot"]'),
    ("stop with a field", b'["stop", 1]'),
    ("drain without grace", b'["drain"]'),
    ("drain grace a string", b'["drain", "5"]'),
    ("drain grace negative", b'["drain", -1]'),
    ("drain grace NaN", b'["drain", NaN]'),
    ("drain grace infinite", b'["drain", Infinity]'),
    ("request id a bool", b'["list_bindings", true]'),
    ("request id negative", b'["list_bindings", -3]'),
    ("request id a float", b'["list_bindings", 1.5]'),
    ("ready udp not a list", b'["ready", "127.0.0.1:1", "127.0.0.1:2"]'),
    ("ready address a number", b'["ready", [1], "127.0.0.1:2"]'),
    ("counters missing a field", json.dumps(_counters_body()[:-1]).encode()),
    ("counters an extra field", json.dumps([*_counters_body(), 0]).encode()),
    ("matrix one row", _replaced(_counters_body(), 1, [[0] * N_CLASSES])),
    ("matrix short row", _replaced(_counters_body(), 1, [[0], [0]])),
    ("matrix a negative", _replaced(_counters_body(), 5, [[-1] * N_REASONS] * 2)),
    ("matrix a string", _replaced(_counters_body(), 1, [["1"] * N_CLASSES] * 2)),
    ("redis count a float", _replaced(_counters_body(), 11, 1.0)),
    ("tcp not a list", _replaced(_counters_body(), 15, 0)),
    ("tcp closed too short", _replaced(_counters_body(), 15, [0, 0, 0, [0], 0, 0, 0])),
    (
        "tcp count negative",
        _replaced(_counters_body(), 15, [-1, 0, 0, [0] * N_CLOSE_REASONS, 0, 0, 0]),
    ),
    ("bindings not a list", b'["bindings", 1, {}]'),
    ("binding too short", b'["bindings", 1, [[1, 2]]]'),
    ("binding client port too big", _binding_body(0, ["10.0.0.1", 70000])),
    ("binding client not a pair", _binding_body(0, ["10.0.0.1"])),
    ("binding client host a number", _binding_body(0, [10, 1])),
    ("binding ufrag a number", _binding_body(4, 5)),
    ("binding last_seen a string", _binding_body(5, "now")),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000),
]


@pytest.mark.parametrize(("name", "data"), MALFORMED, ids=[name for name, _ in MALFORMED])
def test_malformed_input_is_a_message_error(name: str, data: bytes) -> None:
    with pytest.raises(messages.MessageError):
        messages.decode(data)


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=200)
    | st.sampled_from(MESSAGES)
    .map(messages.encode)
    .flatmap(lambda good: st.integers(0, len(good)).map(lambda n: good[:n]))
)
def test_random_or_cut_bytes_decode_or_raise_message_error(data: bytes) -> None:
    try:
        message = messages.decode(data)
    except messages.MessageError:
        return
    assert messages.decode(messages.encode(message)) == message


def test_counters_add_up_field_by_field() -> None:
    total = WorkerCounters.total([COUNTERS, COUNTERS, WorkerCounters()])
    assert total.router.rx_packets == tuple(
        tuple(2 * v for v in row) for row in COUNTERS.router.rx_packets
    )
    assert (
        total.router.drop_bytes[1][N_REASONS - 1]
        == 2 * COUNTERS.router.drop_bytes[1][N_REASONS - 1]
    )
    assert total.router.bindings_evicted == 14
    assert total.redis == RedisCounts(16, 18, 20, 2**41)
    assert total.router.packets_received == 2 * COUNTERS.router.packets_received
    assert WorkerCounters.total([]) == WorkerCounters()
