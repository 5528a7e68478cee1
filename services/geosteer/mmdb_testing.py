"""Test kit: a small City database in the MaxMind DB format, so a test can place its own
(test-range) client addresses on the map and geosteer reads them like the real database.

The format (MaxMind DB File Format Specification 2.0): a binary search tree over the
address bits with 24-bit records, 16 zero bytes, a data section, then the metadata marker
and a metadata map. Only what a City lookup needs is written: maps, UTF-8 strings,
doubles, unsigned integers and arrays.
"""

from __future__ import annotations

import ipaddress
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METADATA_MARKER = b"\xab\xcd\xefMaxMind.com"
RECORD_BITS = 24
DATA_SEPARATOR = b"\0" * 16


@dataclass(frozen=True)
class CityRecord:
    """Where the addresses of one IPv4 network are."""

    network: str  # "10.101.3.0/24"
    latitude: float
    longitude: float
    country: str = ""  # ISO 3166-1 alpha-2


def _control(type_number: int, size: int) -> bytes:
    """Control byte(s) of a field: type and payload size (extended types after it)."""
    if size < 29:
        head, extra = size, b""
    elif size < 29 + 256:
        head, extra = 29, bytes([size - 29])
    elif size < 285 + 65536:
        head, extra = 30, (size - 285).to_bytes(2, "big")
    else:
        head, extra = 31, (size - 65821).to_bytes(3, "big")
    if type_number <= 7:
        return bytes([(type_number << 5) | head]) + extra
    return bytes([head, type_number - 7]) + extra


def encode(value: Any) -> bytes:
    """One data-section value (str, float, non-negative int, list, dict with str keys)."""
    if isinstance(value, str):
        raw = value.encode()
        return _control(2, len(raw)) + raw
    if isinstance(value, float):
        return _control(3, 8) + struct.pack(">d", value)
    if isinstance(value, bool) or not isinstance(value, int | list | dict):
        raise TypeError(f"cannot encode {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("only unsigned integers")
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        type_number = 5 if value < 1 << 16 else 6 if value < 1 << 32 else 9
        return _control(type_number, len(raw)) + raw
    if isinstance(value, list):
        return _control(11, len(value)) + b"".join(encode(v) for v in value)
    items = sorted(value.items())
    return _control(7, len(items)) + b"".join(encode(k) + encode(v) for k, v in items)


def _tree(networks: Sequence[tuple[ipaddress.IPv4Network, int]]) -> tuple[bytes, int]:
    """The search tree: (bytes, node count); leaf values are offsets into the data."""
    # A node is [left, right]; an entry is ("node", index), ("data", offset) or None.
    nodes: list[list[tuple[str, int] | None]] = [[None, None]]
    for network, offset in networks:
        bits = int(network.network_address)
        node = 0
        for depth in range(network.prefixlen):
            bit = (bits >> (31 - depth)) & 1
            last = depth == network.prefixlen - 1
            entry = nodes[node][bit]
            if last:
                if entry is not None and entry[0] == "node":
                    raise ValueError(f"{network} overlaps a longer network")
                nodes[node][bit] = ("data", offset)
            elif entry is None:
                nodes.append([None, None])
                nodes[node][bit] = ("node", len(nodes) - 1)
                node = len(nodes) - 1
            elif entry[0] == "node":
                node = entry[1]
            else:
                raise ValueError(f"{network} lies inside a shorter network")
    count = len(nodes)

    def record(entry: tuple[str, int] | None) -> int:
        if entry is None:
            return count  # "no data"
        kind, value = entry
        return value if kind == "node" else count + len(DATA_SEPARATOR) + value

    out = bytearray()
    for left, right in nodes:
        out += record(left).to_bytes(3, "big") + record(right).to_bytes(3, "big")
    return bytes(out), count


def write_city_mmdb(path: Path, records: Sequence[CityRecord]) -> Path:
    """Writes a City database placing each record's network; returns `path`."""
    data = bytearray()
    placed: list[tuple[ipaddress.IPv4Network, int]] = []
    for record in records:
        network = ipaddress.IPv4Network(record.network)
        fields: dict[str, Any] = {
            "location": {"latitude": float(record.latitude), "longitude": float(record.longitude)}
        }
        if record.country:
            fields["country"] = {"iso_code": record.country}
        placed.append((network, len(data)))
        data += encode(fields)
    tree, count = _tree(sorted(placed, key=lambda p: (int(p[0].network_address), p[0].prefixlen)))
    metadata: Mapping[str, Any] = {
        "binary_format_major_version": 2,
        "binary_format_minor_version": 0,
        "build_epoch": int(time.time()),
        "database_type": "voiceedge-test-City",
        "description": {"en": "test-range client locations"},
        "ip_version": 4,
        "languages": ["en"],
        "node_count": count,
        "record_size": RECORD_BITS,
    }
    path.write_bytes(tree + DATA_SEPARATOR + bytes(data) + METADATA_MARKER + encode(dict(metadata)))
    return path
