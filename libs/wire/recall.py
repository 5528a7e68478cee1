"""Binding recall between a relay and its transceivers (wire contract:
protos/wire/relay-recall-v1.md).

A relay process that starts without a shared copy of its bindings (memory mode, no Redis)
knows no client: every DTLS/SRTP packet of a live call is dropped until the client's next
STUN consent check. The transceivers know each session's client addresses and the relay
that carries them, so a new relay worker asks them: it sends a `Hello` with a fresh nonce
(its incarnation) to each transceiver's media address, and the transceiver answers with
`Announce` datagrams listing the clients it last heard through that relay's host.

Each entry is proven with the session's own short-term credential: HMAC-SHA256 keyed with
the ICE password over the nonce, the client's framing header and the server ufrag. The
relay derives that password from the ufrag with its keyring (as it does for MESSAGE-
INTEGRITY), so an entry is as trustworthy as a STUN check of that session, bound to this
incarnation (a captured announcement is useless to the next one), and accepted only from
the media address of the transceiver the ufrag names.

  0-1 magic "VC" | 2 version=1 | 3 type (1 hello, 2 announce) | 4-19 nonce
  announce: 20 count | entries: header length, framing header, ufrag length, ufrag
  (ASCII), 16-byte proof
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

MAGIC = b"VC"
VERSION = 1
TYPE_HELLO = 1
TYPE_ANNOUNCE = 2
NONCE_LEN = 16
PROOF_LEN = 16
_PREFIX_LEN = 4 + NONCE_LEN
MAX_DATAGRAM = 1200  # under any internal path MTU
MAX_ENTRIES = 255


class RecallError(ValueError):
    """Not a valid recall datagram; counted and dropped by whoever reads it."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One bound client: its framing header (relay-framing-v1, the client's address and
    flags), the session's server ufrag and the proof."""

    header: bytes
    ufrag: str
    proof: bytes


def is_recall(data: bytes) -> bool:
    """True for a datagram of this protocol (checked before framing.decode rejects it)."""
    return data[:2] == MAGIC


def proof(password: str, nonce: bytes, header: bytes, ufrag: str) -> bytes:
    """The entry's proof: HMAC-SHA256(ICE password, nonce | header | ufrag), truncated."""
    message = nonce + header + ufrag.encode("ascii")
    return hmac.new(password.encode("ascii"), message, hashlib.sha256).digest()[:PROOF_LEN]


def verify(entry: Entry, password: str, nonce: bytes) -> bool:
    """Constant-time check of `entry`'s proof."""
    return hmac.compare_digest(entry.proof, proof(password, nonce, entry.header, entry.ufrag))


def encode_hello(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise RecallError(f"nonce of {len(nonce)} bytes")
    return MAGIC + bytes((VERSION, TYPE_HELLO)) + nonce


def decode_hello(data: bytes) -> bytes:
    """The nonce of a hello, or RecallError."""
    if len(data) != _PREFIX_LEN or data[:4] != MAGIC + bytes((VERSION, TYPE_HELLO)):
        raise RecallError("not a hello")
    return data[4:]


def _entry_bytes(entry: Entry) -> bytes:
    ufrag = entry.ufrag.encode("ascii")
    if len(entry.header) > 255 or len(ufrag) > 255 or len(entry.proof) != PROOF_LEN:
        raise RecallError("entry too long")
    return bytes((len(entry.header),)) + entry.header + bytes((len(ufrag),)) + ufrag + entry.proof


def announce_prefix(nonce: bytes) -> bytes:
    """The first bytes of every announce answering the hello with `nonce`."""
    return MAGIC + bytes((VERSION, TYPE_ANNOUNCE)) + nonce


def encode_announce(nonce: bytes, entries: list[Entry]) -> list[bytes]:
    """The datagrams that carry `entries` (at least one: an empty announce says "heard,
    nothing to recall"), each at most MAX_DATAGRAM bytes."""
    prefix = announce_prefix(nonce)
    datagrams: list[bytes] = []
    chunk: list[bytes] = []
    size = len(prefix) + 1
    for entry in entries:
        data = _entry_bytes(entry)
        if chunk and (size + len(data) > MAX_DATAGRAM or len(chunk) == MAX_ENTRIES):
            datagrams.append(prefix + bytes((len(chunk),)) + b"".join(chunk))
            chunk, size = [], len(prefix) + 1
        chunk.append(data)
        size += len(data)
    datagrams.append(prefix + bytes((len(chunk),)) + b"".join(chunk))
    return datagrams


def decode_announce(data: bytes) -> tuple[bytes, list[Entry]]:
    """(nonce, entries) of an announce, or RecallError; never reads past the datagram."""
    if len(data) < _PREFIX_LEN + 1 or data[:4] != MAGIC + bytes((VERSION, TYPE_ANNOUNCE)):
        raise RecallError("not an announce")
    nonce = data[4:_PREFIX_LEN]
    count, at = data[_PREFIX_LEN], _PREFIX_LEN + 1
    entries = []
    for _ in range(count):
        header, at = _field(data, at)
        raw_ufrag, at = _field(data, at)
        end = at + PROOF_LEN
        if end > len(data):
            raise RecallError("truncated proof")
        try:
            ufrag = raw_ufrag.decode("ascii")
        except UnicodeDecodeError as exc:
            raise RecallError("ufrag not ASCII") from exc
        entries.append(Entry(header, ufrag, data[at:end]))
        at = end
    if at != len(data):
        raise RecallError("trailing bytes")
    return nonce, entries


def _field(data: bytes, at: int) -> tuple[bytes, int]:
    if at >= len(data):
        raise RecallError("truncated")
    end = at + 1 + data[at]
    if end > len(data):
        raise RecallError("truncated field")
    return data[at + 1 : end], end
