"""ICE credential rules (RFC 8445 §5.3, RFC 8839 §5.4), the one copy both signaling (offers)
and the transceiver (the credentials it is told to use) check against."""

from __future__ import annotations

import re

# ice-char = ALPHA / DIGIT / "+" / "/"
_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")
UFRAG_LEN = (4, 256)
PWD_LEN = (22, 256)


def credential_problem(ufrag: str, pwd: str) -> str | None:
    """What is wrong with an ICE ufrag/pwd pair, naming the field; None when both are valid."""
    for name, value, (low, high) in (
        ("ice_ufrag", ufrag, UFRAG_LEN),
        ("ice_pwd", pwd, PWD_LEN),
    ):
        if not low <= len(value) <= high:
            return f"{name}: length {len(value)} outside {low} to {high} characters"
        if not _ICE_CHARS.fullmatch(value):
            return f"{name}: only ice-chars [A-Za-z0-9+/] are allowed (RFC 8445 §5.3)"
    return None
