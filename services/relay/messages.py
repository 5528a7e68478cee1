"""The messages between the relay's main process and its worker processes, and their one
encoding.

Each message is a frozen dataclass; `encode` turns it into one JSON array (tag first, then
the fields in order) for `Connection.send_bytes`, and `decode` turns bytes back into a
message or raises `MessageError` naming what is wrong. Nothing is unpickled, so a confused
or half-written peer costs a counted drop on the receiving side, never the process. Both
ends are the same build, so the layout carries no version.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, assert_never

from services.relay.dataplane import WorkerCounters
from services.relay.router import DIRECTIONS, N_CLASSES, N_REASONS, BindingInfo, RouterCounters
from services.relay.store import RedisCounts
from services.relay.tcp import N_CLOSE_REASONS, TcpCounters


class MessageError(ValueError):
    """Bytes from the pipe that are not a well-formed message."""


# ---- worker -> main ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker is forwarding on these addresses."""

    udp: tuple[str, ...]
    internal: str


@dataclass(frozen=True, slots=True)
class CountersReport:
    """The worker's counters, pushed every SNAPSHOT_S."""

    counters: WorkerCounters


@dataclass(frozen=True, slots=True)
class BindingsReply:
    """The worker's whole binding table, answering ListBindings `request_id`."""

    request_id: int
    bindings: tuple[BindingInfo, ...]


# ---- main -> worker ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListBindings:
    """Send the binding table back as a BindingsReply with the same `request_id`."""

    request_id: int


@dataclass(frozen=True, slots=True)
class Drain:
    """Refuse new clients and stop after `grace_s`."""

    grace_s: float


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop now."""


Message = Ready | CountersReport | BindingsReply | ListBindings | Drain | Stop


# ---- encoding ---------------------------------------------------------------------------


def _counters_fields(c: WorkerCounters) -> list[Any]:
    r, redis = c.router, c.redis
    return [
        r.rx_packets,
        r.rx_bytes,
        r.fwd_packets,
        r.fwd_bytes,
        r.drop_packets,
        r.drop_bytes,
        r.bindings_active,
        r.bindings_created,
        r.bindings_expired,
        r.bindings_evicted,
        redis.hits,
        redis.misses,
        redis.errors,
        redis.writes,
        c.tcp.fields(),
    ]


def _binding_fields(b: BindingInfo) -> list[Any]:
    return [
        b.client,
        b.cluster_id,
        b.transceiver_id,
        b.media,
        b.ufrag,
        b.last_seen,
        b.packets,
        b.bytes,
        b.created_at,
    ]


def encode(message: Message) -> bytes:
    match message:
        case Ready(udp, internal):
            body: list[Any] = ["ready", list(udp), internal]
        case CountersReport(counters):
            body = ["counters", *_counters_fields(counters)]
        case BindingsReply(request_id, bindings):
            body = ["bindings", request_id, [_binding_fields(b) for b in bindings]]
        case ListBindings(request_id):
            body = ["list_bindings", request_id]
        case Drain(grace_s):
            body = ["drain", grace_s]
        case Stop():
            body = ["stop"]
        case _:
            assert_never(message)
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


# ---- decoding: every value checked, MessageError on the first surprise ---------------------


def _count(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise MessageError(f"{what}: expected a count, got {value!r:.40}")
    return value


def _seconds(value: object, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        raise MessageError(f"{what}: expected seconds, got {value!r:.40}")
    return float(value)  # type: ignore[arg-type]


def _text(value: object, what: str) -> str:
    if type(value) is not str:
        raise MessageError(f"{what}: expected a string, got {value!r:.40}")
    return value


def _list(value: object, what: str, length: int | None = None) -> list[Any]:
    if type(value) is not list or (length is not None and len(value) != length):
        shape = "a list" if length is None else f"a list of {length}"
        raise MessageError(f"{what}: expected {shape}, got {value!r:.40}")
    return value


def _address(value: object, what: str) -> tuple[str, int]:
    host, port = _list(value, what, 2)
    if type(port) is not int or not 0 <= port <= 0xFFFF:
        raise MessageError(f"{what}: bad port {port!r:.40}")
    return _text(host, what), port


def _matrix(value: object, what: str, columns: int) -> tuple[tuple[int, ...], ...]:
    rows = _list(value, what, len(DIRECTIONS))
    return tuple(tuple(_count(v, what) for v in _list(row, what, columns)) for row in rows)


def _fields(body: list[Any], count: int, tag: str) -> list[Any]:
    if len(body) != count + 1:
        raise MessageError(f"{tag}: expected {count} fields, got {len(body) - 1}")
    return body[1:]


def _ready(body: list[Any]) -> Ready:
    udp, internal = _fields(body, 2, "ready")
    return Ready(
        tuple(_text(a, "ready.udp") for a in _list(udp, "ready.udp")),
        _text(internal, "ready.internal"),
    )


def _counters(body: list[Any]) -> CountersReport:
    f = _fields(body, 15, "counters")
    router = RouterCounters(
        _matrix(f[0], "rx_packets", N_CLASSES),
        _matrix(f[1], "rx_bytes", N_CLASSES),
        _matrix(f[2], "fwd_packets", N_CLASSES),
        _matrix(f[3], "fwd_bytes", N_CLASSES),
        _matrix(f[4], "drop_packets", N_REASONS),
        _matrix(f[5], "drop_bytes", N_REASONS),
        _count(f[6], "bindings_active"),
        _count(f[7], "bindings_created"),
        _count(f[8], "bindings_expired"),
        _count(f[9], "bindings_evicted"),
    )
    redis = RedisCounts(*(_count(v, "redis") for v in f[10:14]))
    return CountersReport(WorkerCounters(router, redis, _tcp(f[14])))


def _tcp(value: object) -> TcpCounters:
    f = _list(value, "tcp", 7)
    closed = tuple(_count(v, "tcp.closed") for v in _list(f[3], "tcp.closed", N_CLOSE_REASONS))
    return TcpCounters(
        _count(f[0], "tcp.accepted"),
        _count(f[1], "tcp.pending"),
        _count(f[2], "tcp.open"),
        closed,
        _count(f[4], "tcp.frames_in"),
        _count(f[5], "tcp.frames_out"),
        _count(f[6], "tcp.frames_dropped"),
    )


def _binding(value: object) -> BindingInfo:
    f = _list(value, "binding", 9)
    return BindingInfo(
        _address(f[0], "binding.client"),
        _count(f[1], "binding.cluster_id"),
        _count(f[2], "binding.transceiver_id"),
        _address(f[3], "binding.media"),
        _text(f[4], "binding.ufrag"),
        _seconds(f[5], "binding.last_seen"),
        _count(f[6], "binding.packets"),
        _count(f[7], "binding.bytes"),
        _seconds(f[8], "binding.created_at"),
    )


def _bindings(body: list[Any]) -> BindingsReply:
    request_id, items = _fields(body, 2, "bindings")
    return BindingsReply(
        _count(request_id, "bindings.request_id"),
        tuple(_binding(item) for item in _list(items, "bindings.items")),
    )


def _list_bindings(body: list[Any]) -> ListBindings:
    (request_id,) = _fields(body, 1, "list_bindings")
    return ListBindings(_count(request_id, "list_bindings.request_id"))


def _drain(body: list[Any]) -> Drain:
    (grace_s,) = _fields(body, 1, "drain")
    seconds = _seconds(grace_s, "drain.grace_s")
    if seconds < 0:
        raise MessageError(f"drain.grace_s: negative {seconds}")
    return Drain(seconds)


def _stop(body: list[Any]) -> Stop:
    _fields(body, 0, "stop")
    return Stop()


_DECODERS: dict[str, Callable[[list[Any]], Message]] = {
    "ready": _ready,
    "counters": _counters,
    "bindings": _bindings,
    "list_bindings": _list_bindings,
    "drain": _drain,
    "stop": _stop,
}


def decode(data: bytes) -> Message:
    """The message in `data`; MessageError if it is not one."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MessageError(f"not JSON: {exc}") from None
    if type(body) is not list or not body or type(body[0]) is not str:
        raise MessageError(f"expected [tag, ...], got {body!r:.40}")
    decoder = _DECODERS.get(body[0])
    if decoder is None:
        raise MessageError(f"unknown message {body[0]!r:.40}")
    return decoder(body)
