"""The internal plane's token and other secrets, checked without importing gRPC: a process
that starts its data plane first (the relay) refuses a bad token before it binds a port.

A token is at least 32 characters with no whitespace; an obvious placeholder is refused at
start-up, with a message that says so, rather than protecting the plane with a known string.
libs/service/auth.py uses it on the gRPC side.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

TOKEN_ENV = "VOICEEDGE_INTERNAL_TOKEN"  # noqa: S105 (the variable's name, not a secret)
MIN_TOKEN_CHARS = 32
_PLACEHOLDER = re.compile(r"replace|change[-_]?me|example|placeholder|^(.)\1*$", re.IGNORECASE)


class TokenError(ValueError):
    """The configured internal token is unusable; the message says why (never the token)."""


def check_secret(name: str, value: str) -> None:
    """Refuses an obvious placeholder (REPLACE_ME, changeme, example, one character repeated)
    as the secret `name`, naming the problem and never the value."""
    if _PLACEHOLDER.search(value):
        raise TokenError(f"{name}: is a placeholder, not a secret (`openssl rand -hex 32`)")


def parse_token(text: str) -> str:
    """The token to require and send; "" when none is configured (the plane is open)."""
    token = text.strip()
    if not token:
        return ""
    if any(c.isspace() for c in token):
        raise TokenError(f"{TOKEN_ENV}: contains whitespace")
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(
            f"{TOKEN_ENV}: {len(token)} characters, need at least {MIN_TOKEN_CHARS} "
            "(make one with `openssl rand -hex 32`)"
        )
    check_secret(TOKEN_ENV, token)
    return token


def token_from_env(environ: Mapping[str, str] | None = None) -> str:
    return parse_token((os.environ if environ is None else environ).get(TOKEN_ENV, ""))
