"""Offer validation: the checks signaling makes before any routing or session work.

Pure functions. Signaling does not rewrite the offer (the transceiver strips candidates
itself); it only refuses offers no transceiver could answer, so a bad request costs no
geosteer or transceiver round trip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from libs.wire import ice

MAX_SDP_BYTES = 64 * 1024
MAX_SDP_LINES = 4096
MAX_LINE_CHARS = 8192

# RFC 8122 §5: fingerprint-attribute = hash-func SP 2UHEX *(":" 2UHEX). Lower case is
# accepted: browsers and aiortc differ and every DTLS stack compares case-insensitively.
_FINGERPRINT = re.compile(r"[A-Za-z0-9-]+ [0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})+")
# RFC 8866 §5: every line is <type>=<value>, the type one lower-case letter.
_LINE = re.compile(r"[a-z]=[^\x00]*")


class OfferError(ValueError):
    """An offer signaling refuses; `code` goes into the error body's "code"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class OfferSummary:
    """What signaling learns from a valid offer (for logs and span attributes)."""

    audio_sections: int
    has_datachannel: bool
    candidates: int
    ice_ufrag: str


@dataclass
class _Section:
    media: str
    attributes: dict[str, list[str]]


def _attribute(line: str) -> tuple[str, str]:
    name, _, value = line[2:].partition(":")
    return name, value


def _text_lines(text: str | bytes, max_bytes: int, code: str, what: str) -> list[str]:
    """The lines of an SDP text within `max_bytes` (errors `<code>_too_large`,
    `<code>_unparseable`)."""
    if len(text) > max_bytes:
        raise OfferError(f"{code}_too_large", f"{what} is larger than {max_bytes} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise OfferError(f"{code}_unparseable", f"{what} is not UTF-8 text") from None
    # RFC 8866 §5: lines end in CRLF; a bare LF is tolerated as parsers commonly do.
    return [line.rstrip("\r") for line in text.split("\n")]


def validate_offer(text: str | bytes, max_bytes: int = MAX_SDP_BYTES) -> OfferSummary:
    """Checks an SDP offer; returns its summary or raises OfferError.

    Codes: sdp_too_large, sdp_unparseable, sdp_no_audio, sdp_no_ice_credentials,
    sdp_bad_ice_credentials, sdp_no_fingerprint.
    """
    lines = _text_lines(text, max_bytes, "sdp", "offer")
    while lines and not lines[-1]:
        lines.pop()
    if not lines or lines[0] != "v=0":
        raise OfferError("sdp_unparseable", "offer must start with v=0 (RFC 8866 §5.1)")
    if len(lines) > MAX_SDP_LINES:
        raise OfferError("sdp_too_large", f"offer has more than {MAX_SDP_LINES} lines")
    session = _Section("", {})
    media: list[_Section] = []
    current = session
    seen_types: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if len(line) > MAX_LINE_CHARS:
            raise OfferError("sdp_too_large", f"line {number} is longer than {MAX_LINE_CHARS}")
        if not _LINE.fullmatch(line):
            raise OfferError("sdp_unparseable", f"line {number} is not <type>=<value>")
        kind = line[0]
        seen_types.add(kind)
        if kind == "m":
            fields = line[2:].split()
            if len(fields) < 4:
                raise OfferError("sdp_unparseable", f"line {number}: m= needs 4 fields")
            current = _Section(fields[0], {})
            media.append(current)
        elif kind == "a":
            name, value = _attribute(line)
            current.attributes.setdefault(name, []).append(value)
    missing = {"o", "s", "t"} - seen_types
    if missing:
        raise OfferError(
            "sdp_unparseable", f"offer lacks {', '.join(sorted(missing))}= (RFC 8866 §5)"
        )
    audio = [section for section in media if section.media == "audio"]
    if not audio:
        raise OfferError("sdp_no_audio", "offer has no audio m-line")

    def attr(section: _Section, name: str) -> str | None:
        # Media-level attributes override session-level ones (RFC 8839 §5.4, RFC 8122 §5).
        values = section.attributes.get(name) or session.attributes.get(name)
        return values[0].strip() if values else None

    ufrag = ""
    for section in audio:
        section_ufrag, pwd = attr(section, "ice-ufrag"), attr(section, "ice-pwd")
        if section_ufrag is None or pwd is None:
            raise OfferError(
                "sdp_no_ice_credentials", "offer lacks a=ice-ufrag or a=ice-pwd for its audio"
            )
        if ice.credential_problem(section_ufrag, pwd) is not None:
            raise OfferError(
                "sdp_bad_ice_credentials",
                "a=ice-ufrag must be 4-256 and a=ice-pwd 22-256 ice-chars (RFC 8839 §5.4)",
            )
        ufrag = ufrag or section_ufrag
        fingerprint = attr(section, "fingerprint")
        if fingerprint is None:
            raise OfferError("sdp_no_fingerprint", "offer lacks a=fingerprint for its audio")
        if not _FINGERPRINT.fullmatch(fingerprint):
            raise OfferError("sdp_no_fingerprint", "a=fingerprint is malformed (RFC 8122 §5)")
    return OfferSummary(
        audio_sections=len(audio),
        has_datachannel=any(section.media == "application" for section in media),
        candidates=sum(len(s.attributes.get("candidate", [])) for s in [session, *media]),
        ice_ufrag=ufrag,
    )


SDPFRAG = "application/trickle-ice-sdpfrag"  # RFC 8840 §9.1


@dataclass(frozen=True, slots=True)
class SdpFrag:
    """What a client's trickle-ice-sdpfrag (RFC 8840 §9) says: its ICE credentials if it
    sent them (an ICE restart carries new ones, RFC 8840 §4.4), the first m= line and mid
    (the answer names the same), and how many candidates it trickled."""

    ice_ufrag: str | None
    ice_pwd: str | None
    media_line: str | None
    mid: str | None
    candidates: int
    end_of_candidates: bool


def parse_sdpfrag(text: str | bytes, max_bytes: int = MAX_SDP_BYTES) -> SdpFrag:
    """Checks an SDP fragment; returns what it says or raises OfferError (codes
    sdpfrag_too_large, sdpfrag_unparseable, sdp_bad_ice_credentials)."""
    lines = [line for line in _text_lines(text, max_bytes, "sdpfrag", "fragment") if line]
    if len(lines) > MAX_SDP_LINES:
        raise OfferError("sdpfrag_too_large", f"fragment has more than {MAX_SDP_LINES} lines")
    values: dict[str, str] = {}
    media_line = None
    candidates = 0
    end = False
    for number, line in enumerate(lines, start=1):
        if len(line) > MAX_LINE_CHARS or not _LINE.fullmatch(line):
            raise OfferError("sdpfrag_unparseable", f"line {number} is not <type>=<value>")
        if line.startswith("m=") and media_line is None:
            media_line = line
        elif line.startswith("a="):
            name, value = _attribute(line)
            if name == "candidate":
                candidates += 1
            elif name == "end-of-candidates":
                end = True
            elif name in ("ice-ufrag", "ice-pwd", "mid"):
                values.setdefault(name, value.strip())
    ufrag, pwd = values.get("ice-ufrag"), values.get("ice-pwd")
    if pwd is not None and (ufrag is None or ice.credential_problem(ufrag, pwd) is not None):
        raise OfferError(
            "sdp_bad_ice_credentials",
            "a=ice-ufrag must be 4-256 and a=ice-pwd 22-256 ice-chars (RFC 8839 §5.4)",
        )
    return SdpFrag(ufrag, pwd, media_line, values.get("mid"), candidates, end)


def answer_sdpfrag(
    ufrag: str, pwd: str, candidates: list[str] | tuple[str, ...], asked: SdpFrag
) -> str:
    """The server's sdpfrag for an ICE restart (RFC 9725 §4.3.2): its new credentials,
    then the m= line and mid the client's fragment named, with the server's candidates
    and end-of-candidates."""
    lines = [f"a=ice-ufrag:{ufrag}", f"a=ice-pwd:{pwd}"]
    if asked.media_line is not None:
        lines.append(asked.media_line)
        if asked.mid is not None:
            lines.append(f"a=mid:{asked.mid}")
    lines.extend(candidates)
    lines.append("a=end-of-candidates")
    return "\r\n".join(lines) + "\r\n"
