"""validate_offer: real offers (aiortc generated, a Chrome capture) and garbage."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.signaling.sdp import OfferError, validate_offer
from services.signaling.signaling_testing import CHROME_OFFER, aiortc_offer


def _drop(offer: str, prefix: str) -> str:
    return "\r\n".join(line for line in offer.split("\r\n") if not line.startswith(prefix))


async def test_aiortc_offer_is_valid() -> None:
    offer = await aiortc_offer()
    summary = validate_offer(offer)
    assert summary.audio_sections == 1
    assert summary.has_datachannel
    assert len(summary.ice_ufrag) >= 4


def test_chrome_offer_is_valid() -> None:
    summary = validate_offer(CHROME_OFFER)
    assert summary.audio_sections == 1
    assert summary.has_datachannel
    assert summary.candidates == 1
    assert summary.ice_ufrag == "Q9fE"


def test_session_level_credentials_are_accepted() -> None:
    lines = CHROME_OFFER.split("\r\n")
    moved = [
        next(line for line in lines if line.startswith(p)) for p in ("a=ice-u", "a=ice-p", "a=fi")
    ]
    rest = [line for line in lines if not line.startswith(("a=ice-ufrag", "a=ice-pwd", "a=fing"))]
    offer = "\r\n".join(rest[:4] + moved + rest[4:])
    assert validate_offer(offer).ice_ufrag == "Q9fE"


def test_bytes_and_bare_lf_are_accepted() -> None:
    assert validate_offer(CHROME_OFFER.replace("\r\n", "\n").encode()).audio_sections == 1


BAD_OFFERS = [
    ("empty", "", "sdp_unparseable"),
    ("garbage", "hello world", "sdp_unparseable"),
    ("json", '{"sdp": "v=0"}', "sdp_unparseable"),
    ("not v first", CHROME_OFFER.replace("v=0\r\n", "", 1), "sdp_unparseable"),
    ("bad line", CHROME_OFFER.replace("s=-", "s-"), "sdp_unparseable"),
    ("upper type", CHROME_OFFER.replace("s=-", "S=-"), "sdp_unparseable"),
    ("no origin", _drop(CHROME_OFFER, "o="), "sdp_unparseable"),
    (
        "short m-line",
        CHROME_OFFER.replace("m=application 9 UDP/DTLS/SCTP webrtc", "m=app"),
        "sdp_unparseable",
    ),
    ("video only", CHROME_OFFER.replace("m=audio", "m=video"), "sdp_no_audio"),
    (
        "data only",
        CHROME_OFFER.split("m=audio")[0] + "m=application" + CHROME_OFFER.split("m=application")[1],
        "sdp_no_audio",
    ),
    ("no ufrag", _drop(CHROME_OFFER, "a=ice-ufrag"), "sdp_no_ice_credentials"),
    ("no pwd", _drop(CHROME_OFFER, "a=ice-pwd"), "sdp_no_ice_credentials"),
    (
        "short ufrag",
        CHROME_OFFER.replace("ice-ufrag:Q9fE", "ice-ufrag:Q9"),
        "sdp_bad_ice_credentials",
    ),
    (
        "bad ufrag chars",
        CHROME_OFFER.replace("ice-ufrag:Q9fE", "ice-ufrag:Q9f!"),
        "sdp_bad_ice_credentials",
    ),
    (
        "short pwd",
        CHROME_OFFER.replace("ZWzL3HzmdLbg6YLr0DKzQ0vB", "short"),
        "sdp_bad_ice_credentials",
    ),
    ("no fingerprint", _drop(CHROME_OFFER, "a=fingerprint"), "sdp_no_fingerprint"),
    (
        "bad fingerprint",
        CHROME_OFFER.replace("sha-256 1F:2C", "sha-256 zz:2C"),
        "sdp_no_fingerprint",
    ),
    ("too large", CHROME_OFFER + "a=x:" + "y" * 70000 + "\r\n", "sdp_too_large"),
    ("too many lines", CHROME_OFFER + "a=x\r\n" * 5000, "sdp_too_large"),
]


@pytest.mark.parametrize(("name", "offer", "code"), BAD_OFFERS, ids=[b[0] for b in BAD_OFFERS])
def test_bad_offers_are_refused_with_a_code(name: str, offer: str, code: str) -> None:
    with pytest.raises(OfferError) as caught:
        validate_offer(offer)
    assert name
    assert caught.value.code == code
    assert caught.value.message


def test_invalid_utf8_is_unparseable() -> None:
    with pytest.raises(OfferError) as caught:
        validate_offer(b"v=0\r\n\xff\xfe")
    assert caught.value.code == "sdp_unparseable"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048) | st.text(max_size=2048))
def test_garbage_never_crashes(data: bytes | str) -> None:
    codes = ""
    try:
        validate_offer(data)
    except OfferError as exc:
        codes = exc.code
    assert codes == "" or codes.startswith("sdp_")


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(CHROME_OFFER)), st.text(max_size=40))
def test_mutated_offers_never_crash(position: int, junk: str) -> None:
    codes = ""
    try:
        validate_offer(CHROME_OFFER[:position] + junk + CHROME_OFFER[position:])
    except OfferError as exc:
        codes = exc.code
    assert codes == "" or codes.startswith("sdp_")
