"""Just enough STUN (RFC 8489) to route on, with no sockets: parse a message, read its
USERNAME, verify MESSAGE-INTEGRITY and FINGERPRINT. Also a builder for tests and tools.

Short-term credentials only (ICE, RFC 8445 §7.2.2): the HMAC key is the password itself.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import struct
from dataclasses import dataclass

MAGIC_COOKIE = 0x2112A442
HEADER_LEN = 20
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101

ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_FINGERPRINT = 0x8028
ATTR_PRIORITY = 0x0024
ATTR_ICE_CONTROLLING = 0x802A
ATTR_USE_CANDIDATE = 0x0025

FINGERPRINT_XOR = 0x5354554E  # RFC 8489 §14.7


class StunError(ValueError):
    """The datagram is not a well-formed STUN message; `reason` is a short stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StunMessage:
    """A parsed message. `attributes` keeps wire order; values are raw bytes."""

    message_type: int
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes, int], ...]  # (type, value, offset of the attribute)
    raw: bytes

    def get(self, attr_type: int) -> bytes | None:
        for kind, value, _ in self.attributes:
            if kind == attr_type:
                return value
        return None

    def _offset(self, attr_type: int) -> int | None:
        for kind, _, offset in self.attributes:
            if kind == attr_type:
                return offset
        return None

    @property
    def username(self) -> str | None:
        value = self.get(ATTR_USERNAME)
        if value is None:
            return None
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def verify_integrity(self, password: bytes) -> bool:
        """RFC 8489 §14.5: HMAC-SHA1 over the message up to MESSAGE-INTEGRITY, with the
        header length covering MESSAGE-INTEGRITY itself. Constant-time comparison."""
        offset = self._offset(ATTR_MESSAGE_INTEGRITY)
        mac = self.get(ATTR_MESSAGE_INTEGRITY)
        if offset is None or mac is None or len(mac) != 20:
            return False
        covered = self.raw[:offset]
        length = offset + 24 - HEADER_LEN
        signed = covered[:2] + struct.pack("!H", length) + covered[4:]
        expected = hmac.new(password, signed, hashlib.sha1).digest()
        return hmac.compare_digest(expected, mac)

    def verify_fingerprint(self) -> bool:
        """RFC 8489 §14.7: CRC-32 of the message up to FINGERPRINT, XOR 0x5354554E."""
        offset = self._offset(ATTR_FINGERPRINT)
        value = self.get(ATTR_FINGERPRINT)
        if offset is None or value is None or len(value) != 4:
            return False
        covered = self.raw[:offset]
        length = offset + 8 - HEADER_LEN
        signed = covered[:2] + struct.pack("!H", length) + covered[4:]
        expected = (binascii.crc32(signed) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        return hmac.compare_digest(struct.pack("!I", expected), value)


def parse(data: bytes) -> StunMessage:
    """Parses a STUN message or raises StunError. Never reads past `data`."""
    if len(data) < HEADER_LEN:
        raise StunError("short", f"{len(data)} bytes")
    message_type, length, cookie = struct.unpack_from("!HHI", data, 0)
    if message_type & 0xC000:
        raise StunError("not_stun", "top bits set")  # RFC 8489 §5
    if cookie != MAGIC_COOKIE:
        raise StunError("bad_cookie")
    if length % 4 or HEADER_LEN + length != len(data):
        raise StunError("bad_length", f"header says {length}, datagram has {len(data) - 20}")
    attributes: list[tuple[int, bytes, int]] = []
    offset = HEADER_LEN
    seen_integrity = seen_fingerprint = False
    while offset < len(data):
        if offset + 4 > len(data):
            raise StunError("truncated_attribute")
        kind, size = struct.unpack_from("!HH", data, offset)
        end = offset + 4 + size
        if end > len(data):
            raise StunError("truncated_attribute", f"type 0x{kind:04x}")
        if seen_fingerprint:
            raise StunError("attribute_after_fingerprint")  # RFC 8489 §14.7
        if seen_integrity and kind != ATTR_FINGERPRINT:
            continue  # RFC 8489 §14.5: ignored after MESSAGE-INTEGRITY
        attributes.append((kind, data[offset + 4 : end], offset))
        seen_integrity |= kind == ATTR_MESSAGE_INTEGRITY
        seen_fingerprint |= kind == ATTR_FINGERPRINT
        offset = end + (-size % 4)
    if offset != len(data):
        raise StunError("bad_padding")
    return StunMessage(message_type, data[8:20], tuple(attributes), data)


def _attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\x00" * (-len(value) % 4)


def build(
    message_type: int,
    transaction_id: bytes,
    attributes: list[tuple[int, bytes]],
    *,
    integrity_key: bytes | None = None,
    fingerprint: bool = True,
) -> bytes:
    """Serialises a message, appending MESSAGE-INTEGRITY and FINGERPRINT as asked."""
    if len(transaction_id) != 12:
        raise ValueError("transaction id must be 12 bytes")
    body = b"".join(_attribute(k, v) for k, v in attributes)

    def header(body_len: int) -> bytes:
        return struct.pack("!HHI", message_type, body_len, MAGIC_COOKIE) + transaction_id

    if integrity_key is not None:
        mac = hmac.new(integrity_key, header(len(body) + 24) + body, hashlib.sha1).digest()
        body += _attribute(ATTR_MESSAGE_INTEGRITY, mac)
    if fingerprint:
        crc = (binascii.crc32(header(len(body) + 8) + body) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        body += _attribute(ATTR_FINGERPRINT, struct.pack("!I", crc))
    return header(len(body)) + body


def binding_request(
    username: str, password: str, transaction_id: bytes, *, priority: int = 0x6E001EFF
) -> bytes:
    """An ICE connectivity check as a controlling browser would send it (RFC 8445 §7.2.2)."""
    return build(
        BINDING_REQUEST,
        transaction_id,
        [
            (ATTR_USERNAME, username.encode()),
            (ATTR_PRIORITY, struct.pack("!I", priority)),
            (ATTR_ICE_CONTROLLING, b"\x00" * 8),
        ],
        integrity_key=password.encode(),
    )


def server_ufrag(username: str) -> str | None:
    """`<server ufrag>:<client ufrag>` -> the server ufrag (RFC 8445 §7.2.2), else None."""
    head, sep, tail = username.partition(":")
    if not sep or not head or not tail:
        return None
    return head
