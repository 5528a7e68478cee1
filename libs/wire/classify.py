"""Demultiplexing of the packets that share one WebRTC 5-tuple, by first byte.

RFC 7983 §7 (updating RFC 5764 §5.1.2): 0-3 STUN, 16-19 ZRTP, 20-63 DTLS, 64-79 TURN
channel data, 128-191 RTP/RTCP. Everything else is not ours and is dropped.
"""

from __future__ import annotations

import enum


class PacketClass(enum.IntEnum):
    """What a datagram is, as far as the first byte tells. Values match relay.v1.PacketClass."""

    OTHER = 0
    STUN = 1
    DTLS = 2
    SRTP = 3


def _table() -> bytes:
    table = bytearray(256)
    for first in range(256):
        if first <= 3:
            table[first] = PacketClass.STUN
        elif 20 <= first <= 63:
            table[first] = PacketClass.DTLS
        elif 128 <= first <= 191:
            table[first] = PacketClass.SRTP
        else:
            table[first] = PacketClass.OTHER
    return bytes(table)


_CLASS_BY_FIRST_BYTE = _table()


RTP_HEADER_BYTES = 12  # RFC 3550 §5.1 fixed header


def is_rtp(datagram: bytes) -> bool:
    """SRTP class (RFC 7983) and RTP rather than RTCP: with RTP and RTCP on one port the
    second byte's low 7 bits are 64-95 only for RTCP (RFC 5761 §4). Shorter than an RTP
    header: False."""
    return (
        len(datagram) >= RTP_HEADER_BYTES
        and 127 < datagram[0] < 192
        and not 63 < (datagram[1] & 0x7F) < 96
    )


def classify(datagram: bytes) -> PacketClass:
    """The class of a datagram; empty datagrams are OTHER."""
    if not datagram:
        return PacketClass.OTHER
    return PacketClass(_CLASS_BY_FIRST_BYTE[datagram[0]])
