"""The shared wire code: binary test vectors, table tests, and property-based fuzzing.

Vectors in testdata/ are the contract (protos/wire/*.md); regenerating them from the same
inputs must give the same bytes, so any codec change that breaks compatibility fails here.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import struct
from pathlib import Path

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.wire import framing, stun, ufrag
from libs.wire.batches import SizedBatches
from libs.wire.classify import PacketClass, classify, is_rtp

TESTDATA = Path(__file__).parent / "testdata"
VECTOR_KEYRING = ufrag.Keyring({1: bytes(range(32))}, 1)
VECTOR_NONCE = bytes.fromhex("0102030405060708")
VECTOR_TXID = bytes.fromhex("000102030405060708090a0b")


def _vector() -> tuple[str, str]:
    ufrag_text, pwd_text = (TESTDATA / "ufrag_v1_cluster7_transceiver42.txt").read_text().split()
    return ufrag_text, pwd_text


def test_ufrag_vector() -> None:
    expected_ufrag, expected_pwd = _vector()
    minted = ufrag.mint(VECTOR_KEYRING, 7, 42, VECTOR_NONCE)
    assert minted == expected_ufrag
    assert ufrag.password(minted, VECTOR_KEYRING) == expected_pwd
    assert ufrag.decode(minted, VECTOR_KEYRING) == ufrag.RoutingToken(1, 7, 42, VECTOR_NONCE)


def test_ufrag_is_ice_chars_and_long_enough() -> None:
    # RFC 8839 §5.4: ice-char = ALPHA / DIGIT / "+" / "/"; ufrag 4-256, pwd 22-256 chars.
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
    for _ in range(50):
        minted = ufrag.mint(VECTOR_KEYRING, 1, 2)
        pwd = ufrag.password(minted, VECTOR_KEYRING)
        assert set(minted) <= allowed
        assert len(minted) == ufrag.TEXT_LEN
        assert set(pwd) <= allowed
        assert 22 <= len(pwd) <= 256


def test_random_part_differs_per_mint() -> None:
    assert len({ufrag.mint(VECTOR_KEYRING, 1, 2) for _ in range(100)}) == 100


def _flip(text: str, index: int) -> str:
    raw = bytearray(base64.b32decode(text + "===="))
    raw[index] ^= 0x01
    return base64.b32encode(bytes(raw)).decode().rstrip("=")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda u: u[:-1], "BAD_UFRAG"),
        (lambda u: u + "A", "BAD_UFRAG"),
        (lambda u: "1" + u[1:], "BAD_UFRAG"),  # '1' is not base32
        (lambda u: u.lower(), "BAD_UFRAG"),
        (lambda u: _flip(u, 0), "BAD_UFRAG"),  # version 0
        (lambda u: _flip(u, 1), "UNKNOWN_KEY_ID"),  # key id 0
        (lambda u: _flip(u, 3), "BAD_MAC"),  # cluster id changed
        (lambda u: _flip(u, 5), "BAD_MAC"),  # transceiver id changed
        (lambda u: _flip(u, 9), "BAD_MAC"),  # nonce changed
        (lambda u: _flip(u, 21), "BAD_MAC"),  # MAC changed
    ],
)
def test_forged_ufrags_are_rejected_with_reason(mutate: object, reason: str) -> None:
    minted = ufrag.mint(VECTOR_KEYRING, 7, 42, VECTOR_NONCE)
    with pytest.raises(ufrag.UfragError) as exc:
        ufrag.decode(mutate(minted), VECTOR_KEYRING)  # type: ignore[operator]
    assert exc.value.reason == reason


def test_key_rotation_accepts_previous_key() -> None:
    old = ufrag.Keyring({1: b"a" * 32}, 1)
    rotated = ufrag.Keyring({1: b"a" * 32, 2: b"b" * 32}, 2)
    old_token = ufrag.mint(old, 3, 4)
    new_token = ufrag.mint(rotated, 3, 4)
    assert ufrag.decode(old_token, rotated).key_id == 1
    assert ufrag.decode(new_token, rotated).key_id == 2
    assert ufrag.password(old_token, rotated) == ufrag.password(old_token, old)
    with pytest.raises(ufrag.UfragError, match="UNKNOWN_KEY_ID"):
        ufrag.decode(new_token, old)
    other_secret = ufrag.Keyring({2: b"c" * 32}, 2)
    with pytest.raises(ufrag.UfragError, match="BAD_MAC"):
        ufrag.decode(new_token, other_secret)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("1", "expected <id>:<hex secret>"),
        ("x:00", "key id is not a number"),
        ("1:zz", "secret is not hex"),
        # The manifests' old placeholder: the message must say what is wrong with it.
        ("1:REPLACE_WITH_64_HEX_CHARS_FROM_openssl_rand_hex_32", "secret is not hex"),
        ("1:00", "shorter than 16 bytes"),
        ("300:" + "00" * 16, "out of range"),
        ("1:" + "00" * 16 + ",1:" + "11" * 16, "given twice"),
    ],
)
def test_keyring_parse_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ufrag.Keyring.parse(spec)


def test_keyring_parse_current_is_highest() -> None:
    ring = ufrag.Keyring.parse("1:" + "00" * 16 + ", 4:" + "11" * 16)
    assert ring.current_id == 4
    assert ring.key_ids == {1, 4}


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (0, PacketClass.STUN),
        (1, PacketClass.STUN),
        (3, PacketClass.STUN),
        (4, PacketClass.OTHER),
        (16, PacketClass.OTHER),  # ZRTP: not carried
        (20, PacketClass.DTLS),
        (22, PacketClass.DTLS),
        (63, PacketClass.DTLS),
        (64, PacketClass.OTHER),  # TURN channel: not carried
        (127, PacketClass.OTHER),
        (128, PacketClass.SRTP),
        (191, PacketClass.SRTP),
        (192, PacketClass.OTHER),
        (255, PacketClass.OTHER),
    ],
)
def test_classify_rfc7983(first: int, expected: PacketClass) -> None:
    assert classify(bytes([first, 0, 0])) is expected


@pytest.mark.parametrize(
    ("datagram", "expected"),
    [
        (bytes([0x80, 111]) + bytes(10), True),  # Opus RTP
        (bytes([0x80, 0x80 | 111]) + bytes(10), True),  # marker bit set
        (bytes([0x80, 200]) + bytes(10), False),  # RTCP sender report
        (bytes([0x80, 0x80 | 72]) + bytes(10), False),  # RTCP 200 read with the "marker"
        (bytes([0x80, 111]) + bytes(9), False),  # shorter than the RTP header
        (bytes([0x16, 0xFE]) + bytes(10), False),  # DTLS
        (b"", False),
    ],
)
def test_is_rtp_rfc5761(datagram: bytes, expected: bool) -> None:
    assert is_rtp(datagram) is expected


def test_classify_empty() -> None:
    assert classify(b"") is PacketClass.OTHER


def test_binding_request_vector_and_aioice_agrees() -> None:
    expected_ufrag, expected_pwd = _vector()
    data = stun.binding_request(expected_ufrag + ":abcd", expected_pwd, VECTOR_TXID)
    assert data == (TESTDATA / "binding_request_v1.bin").read_bytes()
    message = stun.parse(data)
    assert message.message_type == stun.BINDING_REQUEST
    assert message.username == expected_ufrag + ":abcd"
    assert message.verify_integrity(expected_pwd.encode())
    assert not message.verify_integrity(b"wrong password")
    assert message.verify_fingerprint()
    # An independent implementation accepts the same bytes with the same key.
    parsed = aioice_stun.parse_message(data)
    assert parsed.attributes["USERNAME"] == expected_ufrag + ":abcd"
    assert parsed.check_message_integrity(expected_pwd.encode())


def test_parses_aioice_built_request() -> None:
    request = aioice_stun.Message(
        message_method=aioice_stun.Method.BINDING,
        message_class=aioice_stun.Class.REQUEST,
        transaction_id=VECTOR_TXID,
    )
    request.attributes["USERNAME"] = "srv:cli"
    request.add_message_integrity(b"secretsecretsecretsecret")  # adds FINGERPRINT too
    message = stun.parse(bytes(request))
    assert message.username == "srv:cli"
    assert stun.server_ufrag("srv:cli") == "srv"
    assert message.verify_integrity(b"secretsecretsecretsecret")
    assert message.verify_fingerprint()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "short"),
        (b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"\x00" * 11, "short"),
        (b"\xc0\x01\x00\x00\x21\x12\xa4\x42" + b"\x00" * 12, "not_stun"),
        (b"\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x00" * 12, "bad_cookie"),
        (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + b"\x00" * 12, "bad_length"),
        (b"\x00\x01\x00\x03\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00" * 3, "bad_length"),
        (b"\x00\x01\x00\x04\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00\x06\x00\x09", "truncated"),
    ],
)
def test_malformed_stun(data: bytes, reason: str) -> None:
    with pytest.raises(stun.StunError) as exc:
        stun.parse(data)
    assert exc.value.reason.startswith(reason)


@pytest.mark.parametrize(
    ("username", "expected"),
    [("a:b", "a"), ("abc:", None), (":abc", None), ("abc", None), ("", None)],
)
def test_server_ufrag(username: str, expected: str | None) -> None:
    assert stun.server_ufrag(username) == expected


def test_frame_vectors() -> None:
    v4 = framing.encode("203.0.113.9", 50000, b"\x80\x6f\x00\x01payload")
    v6 = framing.encode("2001:db8::9", 50000, b"\x16\xfe\xfd")
    assert v4 == (TESTDATA / "frame_v4.bin").read_bytes()
    assert v6 == (TESTDATA / "frame_v6.bin").read_bytes()
    assert framing.decode(v4) == ("203.0.113.9", 50000, b"\x80\x6f\x00\x01payload")
    assert framing.decode(v6) == ("2001:db8::9", 50000, b"\x16\xfe\xfd")
    assert len(framing.header("127.0.0.1", 1)) == framing.HEADER_V4


def test_frame_tcp_vector() -> None:
    # Bit 7 marks an ICE-TCP client; frames without it are byte-for-byte the old ones.
    tcp = framing.encode("203.0.113.9", 50000, b"\x00\x01\x00\x0c", tcp=True)
    assert tcp == (TESTDATA / "frame_v4_tcp.bin").read_bytes()
    assert framing.decode(tcp) == ("203.0.113.9", 50000, b"\x00\x01\x00\x0c")
    assert framing.is_tcp(tcp)
    assert not framing.is_tcp((TESTDATA / "frame_v4.bin").read_bytes())
    v6 = framing.header("2001:db8::9", 1, tcp=True)
    assert v6[3] == framing.FLAG_IPV6 | framing.FLAG_TCP
    assert framing.decode(v6) == ("2001:db8::9", 1, b"")


@pytest.mark.parametrize("address", ["0.0.0.0", "127.0.0.1", "203.0.113.9", "255.255.255.255"])
def test_frame_v4_address_text(address: str) -> None:
    # The fast IPv4 path (inet_pton/inet_ntop) agrees with ipaddress both ways.
    frame = framing.encode(address, 1, b"")
    assert frame[6:10] == ipaddress.IPv4Address(address).packed
    assert framing.decode(frame)[0] == str(ipaddress.IPv4Address(address))


@pytest.mark.parametrize("address", ["01.2.3.4", "1.2.3", "256.1.1.1", " 1.2.3.4", "host", ""])
def test_frame_bad_address(address: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (ipaddress's message names the input)
        framing.encode(address, 1, b"")


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"VE\x01", "short"),
        (b"XX\x01\x00\x00\x01\x7f\x00\x00\x01", "magic"),
        (b"VE\x02\x00\x00\x01\x7f\x00\x00\x01", "version"),
        (b"VE\x01\x02\x00\x01\x7f\x00\x00\x01", "reserved"),
        (b"VE\x01\x01\x00\x01\x7f\x00\x00\x01", "short IPv6"),
    ],
)
def test_bad_frames(frame: bytes, message: str) -> None:
    with pytest.raises(framing.FrameError, match=message):
        framing.decode(frame)


# Property-based fuzzing: no exception other than the documented ones escapes, and no
# forged token (anything not minted with the key) ever decodes.


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_stun_parse_never_crashes(data: bytes) -> None:
    try:
        message = stun.parse(data)
    except stun.StunError:
        return
    message.verify_integrity(b"k")
    message.verify_fingerprint()
    _ = message.username


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_classify_and_frames(data: bytes) -> None:
    assert classify(data) in PacketClass
    with contextlib.suppress(framing.FrameError):
        framing.decode(data)


@settings(max_examples=3000, deadline=None)
@given(
    st.text(max_size=64)
    | st.binary(min_size=22, max_size=22).map(
        lambda raw: base64.b32encode(raw).decode().rstrip("=")
    )
)
def test_fuzz_forged_ufrag_never_decodes(text: str) -> None:
    with pytest.raises(ufrag.UfragError):
        ufrag.decode(text, VECTOR_KEYRING)


@settings(max_examples=500, deadline=None)
@given(
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.binary(min_size=8, max_size=8),
    st.integers(0, 21),
    st.integers(1, 255),
)
def test_fuzz_any_single_byte_change_is_caught(
    cluster: int, transceiver: int, nonce: bytes, index: int, delta: int
) -> None:
    minted = ufrag.mint(VECTOR_KEYRING, cluster, transceiver, nonce)
    assert ufrag.decode(minted, VECTOR_KEYRING) == ufrag.RoutingToken(
        1, cluster, transceiver, nonce
    )
    raw = bytearray(base64.b32decode(minted + "===="))
    raw[index] = (raw[index] + delta) % 256
    forged = base64.b32encode(bytes(raw)).decode().rstrip("=")
    with pytest.raises(ufrag.UfragError):
        ufrag.decode(forged, VECTOR_KEYRING)


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(), st.integers(0, 0xFFFF), st.binary(max_size=1500))
def test_fuzz_frame_roundtrip(address: object, port: int, payload: bytes) -> None:
    frame = framing.encode(str(address), port, payload)
    assert framing.decode(frame) == (str(address), port, payload)


def test_stun_build_rejects_bad_txid() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        stun.build(stun.BINDING_REQUEST, b"short", [])


def test_priority_attribute_roundtrip() -> None:
    data = stun.binding_request("a:b", "p" * 22, VECTOR_TXID, priority=7)
    assert struct.unpack("!I", stun.parse(data).get(stun.ATTR_PRIORITY) or b"") == (7,)


def test_sized_batches_close_at_the_limit_and_hand_out_oldest_first() -> None:
    batches: SizedBatches[list[int]] = SizedBatches(list, limit=100)
    assert batches.take() is None
    for item, size in [(1, 40), (2, 40), (3, 40), (4, 250), (5, 10)]:
        batches.room(size).append(item)
    assert batches.items == 5
    # 3 would pass 100 bytes: a new batch; 4 is larger than the limit: a batch of its own.
    assert [batches.take() for _ in range(5)] == [[1, 2], [3], [4], [5], None]
    assert batches.items == 0
    batches.room(10).append(6)
    batches.clear()
    assert batches.take() is None
    assert batches.items == 0
