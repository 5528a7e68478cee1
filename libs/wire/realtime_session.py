"""The OpenAI Realtime session object as both ends of the bridge keep it: `session.update`
merged over what was there. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def merge_session(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`update` over `base`: objects merge key by key, any other value (null included)
    replaces. Neither argument is changed."""
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            merged[key] = merge_session(old, value)
        else:
            merged[key] = value
    return merged


MISSING: Any = object()


def turn_detection(session: Mapping[str, Any]) -> Any:
    """The session's turn detection: the GA `audio.input.turn_detection`, else the older
    top-level `turn_detection`; MISSING when neither key is there (None means "off":
    push-to-talk, the client commits the input buffer itself)."""
    audio = session.get("audio")
    if isinstance(audio, Mapping):
        audio_input = audio.get("input")
        if isinstance(audio_input, Mapping) and "turn_detection" in audio_input:
            return audio_input["turn_detection"]
    return session.get("turn_detection", MISSING)
