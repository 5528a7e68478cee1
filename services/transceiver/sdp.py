"""Pure SDP edits around aiortc: strip the offer's candidates, put the relay endpoints in the
answer, and check ICE credentials. No parsing beyond lines: aiortc parses the rest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from libs.wire import ice


class SdpError(ValueError):
    """The offer or the credentials cannot be used; the message says what is wrong."""


def check_credentials(ufrag: str, pwd: str) -> None:
    """The ICE credentials signaling minted must follow RFC 8445 §5.3 (libs/wire/ice.py)."""
    problem = ice.credential_problem(ufrag, pwd)
    if problem is not None:
        raise SdpError(problem)


def _lines(sdp: str) -> list[str]:
    return [line for line in sdp.replace("\r\n", "\n").split("\n") if line]


def strip_candidates(offer: str) -> str:
    """Drops every a=candidate and a=end-of-candidates: the transceiver must learn the client
    only as a peer-reflexive candidate through the relay (RFC 8445 §7.3.1.3). Checks the
    offer is an SDP with an audio m-line first."""
    lines = _lines(offer)
    if not lines or lines[0] != "v=0":
        raise SdpError("offer_sdp: not an SDP (must start with v=0)")
    if not any(line.startswith("m=audio ") for line in lines):
        raise SdpError("offer_sdp: no audio m-line")
    kept = [
        line
        for line in lines
        if not line.startswith("a=candidate:") and line != "a=end-of-candidates"
    ]
    return "\r\n".join(kept) + "\r\n"


def relay_candidate(index: int, ip: str, port: int) -> str:
    """A host candidate line for a relay endpoint; earlier endpoints get higher priority
    (RFC 8445 §5.1.2.1 with type preference 126, local preference 65535 - index)."""
    priority = (126 << 24) | ((65535 - index) << 8) | (256 - 1)
    return f"a=candidate:relay{index} 1 udp {priority} {ip} {port} typ host"


def relay_tcp_candidate(index: int, ip: str, port: int) -> str:
    """A passive ICE-TCP host candidate for a relay's TCP port (RFC 6544 §4.5). Priority by
    RFC 6544 §4.2: local preference (direction preference 4 for passive host candidates)
    << 13 | (8191 - index), below every UDP candidate of `relay_candidate`, so a client
    with UDP keeps preferring UDP."""
    local_preference = (4 << 13) | (8191 - index)
    priority = (126 << 24) | (local_preference << 8) | (256 - 1)
    return f"a=candidate:relaytcp{index} 1 tcp {priority} {ip} {port} typ host tcptype passive"


def rewrite_answer(
    answer: str,
    endpoints: Sequence[tuple[str, int]],
    tcp_endpoints: Sequence[tuple[str, int]] = (),
) -> str:
    """Replaces every candidate of the answer with the relay endpoints (UDP, then the
    passive ICE-TCP ones), signals end-of-candidates (RFC 8838 §8.2), and points m=/c= at
    the first UDP endpoint."""
    if not endpoints:
        raise SdpError("relay_endpoints: at least one is required")
    first_ip, first_port = endpoints[0]
    family = "IP6" if ":" in first_ip else "IP4"
    out: list[str] = []
    for line in _lines(answer):
        if line.startswith("a=candidate:") or line == "a=end-of-candidates":
            continue
        if line.startswith("m="):
            parts = line.split(" ")
            if parts[1] != "0":  # port 0: rejected m-section, leave it
                parts[1] = str(first_port)
            line = " ".join(parts)
        elif line.startswith("c=IN "):
            line = f"c=IN {family} {first_ip}"
        out.append(line)
        if line.startswith("a=ice-pwd:"):
            out.extend(relay_candidate(i, ip, port) for i, (ip, port) in enumerate(endpoints))
            out.extend(
                relay_tcp_candidate(i, ip, port) for i, (ip, port) in enumerate(tcp_endpoints)
            )
            out.append("a=end-of-candidates")
    return "\r\n".join(out) + "\r\n"


MID_EXTENSION = "urn:ietf:params:rtp-hdrext:sdes:mid"  # RFC 8843 §15.1


@dataclass(frozen=True)
class AudioRtpParams:
    """What our own RTP path needs from the answer's audio m-section (RFC 8866 lines)."""

    payload_type: int
    ssrc: int
    mid: str
    mid_extension_id: int  # 0: not negotiated
    red_payload_type: int = -1  # RFC 2198 red/48000/2 around Opus; -1: not negotiated


def audio_rtp_params(answer: str) -> AudioRtpParams:
    """Reads the Opus payload type, our SSRC, the mid and the mid header-extension id from
    the first audio m-section of `answer` (the answer aiortc wrote); SdpError if any of
    payload type or SSRC is missing."""
    section: list[str] = []
    inside = False
    for line in _lines(answer):
        if line.startswith("m="):
            if inside:
                break
            inside = line.startswith("m=audio ")
            continue
        if inside:
            section.append(line)
    payload_type = ssrc = None
    mid = ""
    mid_extension_id = 0
    red_payload_type = -1
    for line in section:
        if line.startswith("a=rtpmap:"):
            number, _, encoding = line[len("a=rtpmap:") :].partition(" ")
            if encoding.lower().startswith("opus/48000") and payload_type is None:
                payload_type = int(number)
            elif encoding.lower() == "red/48000/2" and red_payload_type < 0:
                red_payload_type = int(number)
        elif line.startswith("a=ssrc:") and ssrc is None:
            ssrc = int(line[len("a=ssrc:") :].split(" ", 1)[0])
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:") :].strip()
        elif line.startswith("a=extmap:"):
            number, _, rest = line[len("a=extmap:") :].partition(" ")
            if rest.split(" ", 1)[0] == MID_EXTENSION:
                mid_extension_id = int(number.split("/", 1)[0])
    if payload_type is None:
        raise SdpError("answer: no opus/48000 payload type in the audio m-section")
    if ssrc is None:
        raise SdpError("answer: no a=ssrc in the audio m-section")
    return AudioRtpParams(payload_type, ssrc, mid, mid_extension_id, red_payload_type)


def _audio_section(lines: list[str]) -> tuple[int, int]:
    """[start, end) of the first audio m-section's lines (start: the m= line); (-1, -1)."""
    start = next((i for i, line in enumerate(lines) if line.startswith("m=audio ")), -1)
    if start < 0:
        return -1, -1
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("m=")), len(lines))
    return start, end


def _payload_type_of(section: list[str], encoding: str) -> int | None:
    for line in section:
        if line.startswith("a=rtpmap:"):
            number, _, name = line[len("a=rtpmap:") :].partition(" ")
            if name.lower().startswith(encoding):
                return int(number)
    return None


def tune_audio_answer(answer: str, offer: str, *, red: bool) -> str:
    """The answer's Opus asks for in-band FEC (`useinbandfec=1`, RFC 7587 §6.1: the
    caller's encoder then puts LBRR in its packets); with `red`, and only if the offer has
    red/48000/2 (RFC 2198) around that Opus, the answer accepts it as the preferred
    format (first in the m-line, with the offer's payload type), so the caller sends it."""
    lines = _lines(answer)
    start, end = _audio_section(lines)
    if start < 0:
        return answer
    section = lines[start:end]
    opus_pt = _payload_type_of(section, "opus/48000")
    if opus_pt is None:
        return answer
    fmtp = f"a=fmtp:{opus_pt} "
    at = next((i for i, line in enumerate(section) if line.startswith(fmtp)), -1)
    if at < 0:
        rtpmap = next(
            i for i, line in enumerate(section) if line.startswith(f"a=rtpmap:{opus_pt} ")
        )
        section.insert(rtpmap + 1, fmtp + "useinbandfec=1")
    else:
        params = [p for p in section[at][len(fmtp) :].split(";") if p]
        params = [p for p in params if not p.strip().startswith("useinbandfec=")]
        section[at] = fmtp + ";".join([*params, "useinbandfec=1"])
    if red:
        offered = _lines(offer)
        offer_start, offer_end = _audio_section(offered)
        red_pt = _payload_type_of(offered[offer_start:offer_end], "red/48000/2")
        if red_pt is not None and _payload_type_of(section, "red/") is None:
            parts = section[0].split(" ")
            section[0] = " ".join([*parts[:3], str(red_pt), *parts[3:]])
            rtpmap = next(i for i, line in enumerate(section) if line.startswith("a=rtpmap:"))
            section[rtpmap:rtpmap] = [
                f"a=rtpmap:{red_pt} red/48000/2",
                f"a=fmtp:{red_pt} {opus_pt}/{opus_pt}",
            ]
    lines[start:end] = section
    return "\r\n".join(lines) + "\r\n"
