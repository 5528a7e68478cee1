"""Pure SDP edits and credential checks, table-driven."""

from __future__ import annotations

import pytest

from services.transceiver import sdp

OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 1 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "c=IN IP4 0.0.0.0",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwxyz",
        "a=candidate:1 1 udp 2130706431 192.0.2.1 5000 typ host",
        "a=candidate:2 1 udp 1694498815 198.51.100.1 6000 typ srflx raddr 0.0.0.0 rport 0",
        "a=end-of-candidates",
        "a=rtpmap:111 opus/48000/2",
        "",
    ]
)


def test_strip_candidates_removes_candidates_and_end_marker() -> None:
    stripped = sdp.strip_candidates(OFFER)
    assert "a=candidate" not in stripped
    assert "a=end-of-candidates" not in stripped
    assert "a=ice-ufrag:abcd" in stripped
    assert stripped.endswith("\r\n")


@pytest.mark.parametrize(
    ("offer", "message"),
    [
        ("", "not an SDP"),
        ("garbage\r\n", "not an SDP"),
        ("v=0\r\ns=-\r\nm=video 9 RTP/AVP 96\r\n", "no audio m-line"),
    ],
)
def test_strip_candidates_rejects_unusable_offers(offer: str, message: str) -> None:
    with pytest.raises(sdp.SdpError, match=message):
        sdp.strip_candidates(offer)


def test_rewrite_answer_puts_only_relay_endpoints() -> None:
    answer = OFFER.replace("a=group", "a=group")
    out = sdp.rewrite_answer(answer, [("203.0.113.7", 3478), ("2001:db8::1", 3478)])
    lines = out.split("\r\n")
    candidates = [line for line in lines if line.startswith("a=candidate")]
    assert candidates == [
        sdp.relay_candidate(0, "203.0.113.7", 3478),
        sdp.relay_candidate(1, "2001:db8::1", 3478),
    ]
    assert "192.0.2.1" not in out
    assert "198.51.100.1" not in out
    assert lines.count("a=end-of-candidates") == 1
    assert "m=audio 3478 UDP/TLS/RTP/SAVPF 111" in lines
    assert "c=IN IP4 203.0.113.7" in lines
    # The first endpoint has the highest priority.
    priorities = [int(c.split()[3]) for c in candidates]
    assert priorities[0] > priorities[1]


def test_rewrite_answer_adds_passive_tcp_below_udp() -> None:
    out = sdp.rewrite_answer(OFFER, [("203.0.113.7", 3478)], [("203.0.113.7", 443)])
    candidates = [line for line in out.split("\r\n") if line.startswith("a=candidate")]
    assert candidates == [
        "a=candidate:relay0 1 udp 2130706431 203.0.113.7 3478 typ host",
        "a=candidate:relaytcp0 1 tcp 2124414975 203.0.113.7 443 typ host tcptype passive",
    ]
    assert "m=audio 3478 UDP/TLS/RTP/SAVPF 111" in out  # m= stays on the UDP endpoint
    # Below the UDP endpoints' priorities for any realistic number of them (hundreds).
    lowest_udp = int(sdp.relay_candidate(999, "203.0.113.7", 1).split()[3])
    assert int(candidates[1].split()[3]) < lowest_udp


def test_rewrite_answer_needs_an_endpoint() -> None:
    with pytest.raises(sdp.SdpError, match="relay_endpoints"):
        sdp.rewrite_answer(OFFER, [])


@pytest.mark.parametrize(
    ("ufrag", "pwd", "message"),
    [
        ("abc", "a" * 22, "ice_ufrag: length 3"),
        ("a" * 257, "a" * 22, "ice_ufrag: length 257"),
        ("ab-d", "a" * 22, "ice_ufrag: only ice-chars"),
        ("abcd", "a" * 21, "ice_pwd: length 21"),
        ("abcd", "a" * 21 + " ", "ice_pwd: only ice-chars"),
    ],
)
def test_check_credentials_names_the_problem(ufrag: str, pwd: str, message: str) -> None:
    with pytest.raises(sdp.SdpError, match=message):
        sdp.check_credentials(ufrag, pwd)


def test_check_credentials_accepts_minted_shapes() -> None:
    sdp.check_credentials("ABCD+/09" * 4 + "abcd", "x" * 32)


ANSWER = "\r\n".join(
    [
        "v=0",
        "o=- 1 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 0",
        "a=mid:0",
        "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        "a=extmap:4/sendrecv urn:ietf:params:rtp-hdrext:sdes:mid",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:111 opus/48000/2",
        "a=ssrc:3735928559 cname:x",
        "a=ssrc:3735928559 msid:a b",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        "a=mid:1",
        "a=ssrc:1 cname:not-audio",
        "",
    ]
)


def test_audio_rtp_params_reads_the_audio_section_only() -> None:
    params = sdp.audio_rtp_params(ANSWER)
    assert params == sdp.AudioRtpParams(
        payload_type=111, ssrc=3735928559, mid="0", mid_extension_id=4
    )


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("a=rtpmap:111 opus/48000/2", "no opus/48000 payload type"),
        ("a=ssrc:3735928559 cname:x\r\na=ssrc:3735928559 msid:a b", "no a=ssrc"),
    ],
)
def test_audio_rtp_params_refuses_what_our_rtp_path_cannot_use(remove: str, message: str) -> None:
    with pytest.raises(sdp.SdpError, match=message):
        sdp.audio_rtp_params(ANSWER.replace(remove + "\r\n", ""))


def test_audio_rtp_params_without_the_mid_extension() -> None:
    answer = ANSWER.replace("a=extmap:4/sendrecv urn:ietf:params:rtp-hdrext:sdes:mid\r\n", "")
    assert sdp.audio_rtp_params(answer).mid_extension_id == 0


RED_OFFER = ANSWER.replace("SAVPF 111 0", "SAVPF 111 63 0").replace(
    "a=rtpmap:111 opus/48000/2",
    "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10\r\na=rtpmap:63 red/48000/2\r\n"
    "a=fmtp:63 111/111",
)


@pytest.mark.parametrize(
    ("answer", "offer", "red", "m_line", "expected"),
    [
        # no fmtp yet: one with useinbandfec; red not offered: not added
        (ANSWER, ANSWER, True, "m=audio 9 UDP/TLS/RTP/SAVPF 111 0", ["a=fmtp:111 useinbandfec=1"]),
        # an fmtp: useinbandfec=1 joins (or replaces useinbandfec=0)
        (
            ANSWER.replace(
                "a=rtpmap:111 opus/48000/2", "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10"
            ),
            ANSWER,
            False,
            "m=audio 9 UDP/TLS/RTP/SAVPF 111 0",
            ["a=fmtp:111 minptime=10;useinbandfec=1"],
        ),
        (
            ANSWER.replace(
                "a=rtpmap:111 opus/48000/2",
                "a=rtpmap:111 opus/48000/2\r\na=fmtp:111 useinbandfec=0",
            ),
            ANSWER,
            False,
            "m=audio 9 UDP/TLS/RTP/SAVPF 111 0",
            ["a=fmtp:111 useinbandfec=1"],
        ),
        # red offered and wanted: first in the m-line, with the offer's payload type
        (
            ANSWER,
            RED_OFFER,
            True,
            "m=audio 9 UDP/TLS/RTP/SAVPF 63 111 0",
            ["a=rtpmap:63 red/48000/2", "a=fmtp:63 111/111", "a=fmtp:111 useinbandfec=1"],
        ),
        # red offered, not wanted (the direct receive path cannot read it)
        (ANSWER, RED_OFFER, False, "m=audio 9 UDP/TLS/RTP/SAVPF 111 0", []),
    ],
)
def test_tune_audio_answer_asks_for_fec_and_accepts_red_only_if_offered(
    answer: str, offer: str, red: bool, m_line: str, expected: list[str]
) -> None:
    tuned = sdp.tune_audio_answer(answer, offer, red=red)
    lines = tuned.split("\r\n")
    assert m_line in lines
    assert all(line in lines for line in expected)
    assert ("a=rtpmap:63 red/48000/2" in lines) == ("63" in m_line.split(" "))
    params = sdp.audio_rtp_params(tuned)
    assert params.payload_type == 111
    assert params.red_payload_type == (63 if "63" in m_line.split(" ") else -1)
