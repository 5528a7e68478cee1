"""The ICE ufrag as a routing token (wire contract: protos/wire/ufrag-v1.md).

Signaling mints it, the client echoes it in every STUN Binding request as the first half
of USERNAME, and any relay decodes it with no lookup: version, key id, cluster id,
transceiver id, 64 random bits and a truncated HMAC-SHA256. The ICE password is derived
from the ufrag with a second keyed hash, so a relay can also check MESSAGE-INTEGRITY.

Layout v1 (22 bytes, then RFC 4648 base32 without padding = 36 ice-chars):
  0 version=1 | 1 key id | 2-3 cluster id | 4-5 transceiver id | 6-13 nonce | 14-21 MAC
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass

VERSION = 1
RAW_LEN = 22
TEXT_LEN = 36
MAC_LEN = 8
NONCE_LEN = 8
PASSWORD_LEN = 32
_SIGNED = struct.Struct("!BBHH8s")  # version, key id, cluster, transceiver, nonce
_MAC_LABEL = b"voiceedge/ufrag-mac/v1"
_PWD_LABEL = b"voiceedge/ice-pwd/v1"
MIN_SECRET_LEN = 16


class UfragError(ValueError):
    """A ufrag that must not be routed. `reason` is one of BAD_UFRAG, UNKNOWN_KEY_ID, BAD_MAC
    (the relay's drop reasons)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RoutingToken:
    """What a verified ufrag says."""

    key_id: int
    cluster_id: int
    transceiver_id: int
    nonce: bytes


class Keyring:
    """Secrets by key id. Minting uses `current_id`; decoding accepts every key held, so a
    rotation is: add the new key everywhere, switch signaling's current id, later drop the
    old one."""

    def __init__(self, secrets_by_id: Mapping[int, bytes], current_id: int) -> None:
        if current_id not in secrets_by_id:
            raise ValueError(f"current key id {current_id} is not in the keyring")
        self._mac_keys: dict[int, bytes] = {}
        self._pwd_keys: dict[int, bytes] = {}
        for key_id, secret in secrets_by_id.items():
            if not 0 <= key_id <= 255:
                raise ValueError(f"key id {key_id} out of range 0-255")
            if len(secret) < MIN_SECRET_LEN:
                raise ValueError(f"key {key_id}: secret shorter than {MIN_SECRET_LEN} bytes")
            self._mac_keys[key_id] = hmac.new(secret, _MAC_LABEL, hashlib.sha256).digest()
            self._pwd_keys[key_id] = hmac.new(secret, _PWD_LABEL, hashlib.sha256).digest()
        self.current_id = current_id

    @classmethod
    def parse(cls, spec: str, current_id: int | None = None) -> Keyring:
        """`"1:<hex>,2:<hex>"` -> Keyring; the current key is `current_id` or the highest id."""
        keys: dict[int, bytes] = {}
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            id_text, sep, hex_secret = item.partition(":")
            if not sep:
                raise ValueError(f"keyring entry {item!r}: expected <id>:<hex secret>")
            try:
                key_id = int(id_text)
            except ValueError:
                raise ValueError(f"keyring entry {id_text!r}: key id is not a number") from None
            try:
                secret = bytes.fromhex(hex_secret)
            except ValueError:
                # Names the problem without echoing the secret (a placeholder left in a
                # manifest, or a base64 key, is the usual cause).
                raise ValueError(
                    f"keyring entry {key_id}: secret is not hex "
                    f"({len(hex_secret)} characters; make one with `openssl rand -hex 32`)"
                ) from None
            if key_id in keys:
                raise ValueError(f"keyring: key id {key_id} given twice")
            keys[key_id] = secret
        if not keys:
            raise ValueError("keyring is empty")
        return cls(keys, max(keys) if current_id is None else current_id)

    @property
    def key_ids(self) -> frozenset[int]:
        return frozenset(self._mac_keys)

    def mac_key(self, key_id: int) -> bytes | None:
        return self._mac_keys.get(key_id)

    def pwd_key(self, key_id: int) -> bytes | None:
        return self._pwd_keys.get(key_id)


def _encode(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=")


def _mac(mac_key: bytes, signed: bytes) -> bytes:
    return hmac.new(mac_key, signed, hashlib.sha256).digest()[:MAC_LEN]


def mint(keyring: Keyring, cluster_id: int, transceiver_id: int, nonce: bytes | None = None) -> str:
    """A fresh ufrag routing to (cluster_id, transceiver_id), signed with the current key."""
    if not 0 <= cluster_id <= 0xFFFF or not 0 <= transceiver_id <= 0xFFFF:
        raise ValueError("cluster and transceiver ids are 16-bit")
    nonce = secrets.token_bytes(NONCE_LEN) if nonce is None else nonce
    if len(nonce) != NONCE_LEN:
        raise ValueError("nonce must be 8 bytes")
    key_id = keyring.current_id
    signed = _SIGNED.pack(VERSION, key_id, cluster_id, transceiver_id, nonce)
    mac_key = keyring.mac_key(key_id)
    assert mac_key is not None
    return _encode(signed + _mac(mac_key, signed))


def decode(ufrag: str, keyring: Keyring) -> RoutingToken:
    """Verifies and decodes a ufrag, or raises UfragError. Constant-time MAC check."""
    if len(ufrag) != TEXT_LEN:
        raise UfragError("BAD_UFRAG", f"length {len(ufrag)}")
    try:
        raw = base64.b32decode(ufrag + "====", casefold=False)
    except (binascii.Error, ValueError):
        raise UfragError("BAD_UFRAG", "not base32") from None
    if len(raw) != RAW_LEN or raw[0] != VERSION:
        raise UfragError("BAD_UFRAG", "unknown version")
    version, key_id, cluster_id, transceiver_id, nonce = _SIGNED.unpack_from(raw)
    del version
    mac_key = keyring.mac_key(key_id)
    if mac_key is None:
        raise UfragError("UNKNOWN_KEY_ID", str(key_id))
    if not hmac.compare_digest(_mac(mac_key, raw[: _SIGNED.size]), raw[_SIGNED.size :]):
        raise UfragError("BAD_MAC")
    return RoutingToken(key_id, cluster_id, transceiver_id, nonce)


def password(ufrag: str, keyring: Keyring, key_id: int | None = None) -> str:
    """The ICE password that belongs to `ufrag` (32 base32 chars, 160 bits)."""
    if key_id is None:
        key_id = decode(ufrag, keyring).key_id
    pwd_key = keyring.pwd_key(key_id)
    if pwd_key is None:
        raise UfragError("UNKNOWN_KEY_ID", str(key_id))
    digest = hmac.new(pwd_key, ufrag.encode("ascii"), hashlib.sha256).digest()
    return _encode(digest[:20])[:PASSWORD_LEN]


# A fixed development keyring so separately started dev processes agree without config.
# Never use it in production: services log a warning when they run with it.
DEV_KEYRING_SPEC = "1:" + "766f6963656564676520646576206b6579206f6e6c79"


def dev_keyring() -> Keyring:
    return Keyring.parse(DEV_KEYRING_SPEC)
