"""Relay <-> transceiver encapsulation (wire contract: protos/wire/relay-framing-v1.md).

Every datagram between a relay and a transceiver's single internal UDP port carries the
client's public address in a small header, so the transceiver sees the client's own
address (XOR-MAPPED-ADDRESS stays true, no internal address leaks) and any relay can carry
any session.

  0-1 magic "VE" | 2 version=1 | 3 flags (bit 0: IPv6, bit 7: TCP) | 4-5 client port |
  address (4|16)

Bit 7 marks a client the relay reaches over an ICE-TCP connection (RFC 6544, RFC 4571
framing on the relay's public TCP port): the address is that connection's remote address,
and the transceiver echoes the bit in its replies so they go back on the connection.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

MAGIC = b"VE"
VERSION = 1
FLAG_IPV6 = 0x01
FLAG_TCP = 0x80
_KNOWN_FLAGS = FLAG_IPV6 | FLAG_TCP
HEADER_V4 = 10
HEADER_V6 = 22
_PREFIX = struct.Struct("!2sBBH")


# A UDP peer as the socket layer gives it: (ip, port). Every service uses this one alias.
Address = tuple[str, int]


class FrameError(ValueError):
    """Not a valid frame; counted and dropped by whoever reads it."""


def encode(client_ip: str, client_port: int, payload: bytes, *, tcp: bool = False) -> bytes:
    """Wraps `payload` for the client at (client_ip, client_port); `tcp`: that client is an
    ICE-TCP connection of the relay."""
    if not 0 <= client_port <= 0xFFFF:
        raise FrameError(f"port {client_port} out of range")
    try:
        # Dotted quad, the common case: inet_pton is ~10x cheaper than ipaddress and just
        # as strict (no short forms, no leading zeros).
        packed, flags = socket.inet_pton(socket.AF_INET, client_ip), 0
    except OSError:
        address = ipaddress.ip_address(client_ip)  # IPv6, or a ValueError naming the input
        packed = address.packed
        flags = FLAG_IPV6 if address.version == 6 else 0
    if tcp:
        flags |= FLAG_TCP
    return _PREFIX.pack(MAGIC, VERSION, flags, client_port) + packed + payload


def header(client_ip: str, client_port: int, *, tcp: bool = False) -> bytes:
    """Just the header, for senders that prepend it to many payloads of one client."""
    return encode(client_ip, client_port, b"", tcp=tcp)


def is_tcp(frame: bytes) -> bool:
    """True if the frame's client is an ICE-TCP connection (flag bit 7); no validation."""
    return len(frame) > 3 and bool(frame[3] & FLAG_TCP)


def decode(frame: bytes) -> tuple[str, int, bytes]:
    """Unwraps a frame into (client ip, client port, payload) or raises FrameError."""
    if len(frame) < HEADER_V4:
        raise FrameError("short frame")
    magic, version, flags, port = _PREFIX.unpack_from(frame)
    if magic != MAGIC:
        raise FrameError("bad magic")
    if version != VERSION:
        raise FrameError(f"unknown version {version}")
    if flags & ~_KNOWN_FLAGS:
        raise FrameError("reserved flags set")
    if flags & FLAG_IPV6:
        if len(frame) < HEADER_V6:
            raise FrameError("short IPv6 frame")
        return str(ipaddress.IPv6Address(frame[6:22])), port, frame[HEADER_V6:]
    # inet_ntop gives the same dotted quad as ipaddress, ~10x cheaper per datagram.
    return socket.inet_ntop(socket.AF_INET, frame[6:10]), port, frame[HEADER_V4:]
