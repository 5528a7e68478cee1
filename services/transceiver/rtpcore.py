"""Loads the native RTP core (native/rtpcore.c) and finds what it needs in pylibsrtp.

The C receiver and sender call libsrtp directly with the SRTP contexts aiortc keyed: the
context pointer inside a pylibsrtp.Session and the addresses of libsrtp's srtp_protect /
srtp_unprotect in pylibsrtp's cffi module. Those are pylibsrtp internals: `srtp_pointers`
checks their C types and returns None when they differ (rtp.py then uses its Python
cores), and private_api_test.py fails loudly if an upgrade moved them. None also when the
extension was not built (the Docker image, for one).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pylibsrtp

from libs.fastio import fastio

# libsrtp 2's srtp_protect / srtp_unprotect, as cffi names their type; libsrtp 3 changed
# these signatures, and a mismatch must never reach the C side.
SRTP_FUNCTION_TYPE = "srtp_err_status_t(*)(struct srtp_ctx_t_ *, void *, int *)"
SRTP_CONTEXT_TYPE = "struct srtp_ctx_t_ * *"


class SrtpPointers(NamedTuple):
    context: int  # srtp_t of one pylibsrtp.Session
    protect: int  # srtp_protect
    unprotect: int  # srtp_unprotect


@functools.cache
def load() -> Any:
    """The rtpcore extension module, or None if it was not built."""
    return fastio.load_extension(Path(os.path.abspath(__file__)).parent / "native" / "rtpcore.so")


@functools.cache
def _functions() -> tuple[int, int] | None:
    try:
        from pylibsrtp._binding import ffi, lib  # internals, checked here
    except ImportError:
        return None
    addresses = []
    for name in ("srtp_protect", "srtp_unprotect"):
        function = getattr(lib, name, None)
        if function is None:
            return None
        pointer = ffi.addressof(lib, name)
        if ffi.typeof(pointer).cname != SRTP_FUNCTION_TYPE:
            return None
        addresses.append(int(ffi.cast("uintptr_t", pointer)))
    return addresses[0], addresses[1]


def srtp_pointers(session: pylibsrtp.Session) -> SrtpPointers | None:
    """What the C core needs for `session`, or None (no extension, or pylibsrtp's internals
    are not the ones checked here)."""
    if load() is None:
        return None
    functions = _functions()
    holder = getattr(session, "_srtp", None)
    if functions is None or holder is None:
        return None
    from pylibsrtp._binding import ffi

    if ffi.typeof(holder).cname != SRTP_CONTEXT_TYPE or holder[0] == ffi.NULL:
        return None
    return SrtpPointers(int(ffi.cast("uintptr_t", holder[0])), *functions)


def receiver(
    srtp: pylibsrtp.Session,
    payload_type: int,
    sink: Callable[..., None],
    on_loss: Callable[[int], None] | None,
    clock: Callable[[], float] | None,
    reorder: bool = False,
    red_payload_type: int = -1,
) -> Any:
    """An rtpcore.Receiver unprotecting with `srtp` (rtp._ReceiverCore's arguments), or
    None (see srtp_pointers)."""
    pointers = srtp_pointers(srtp)
    if pointers is None:
        return None
    return load().Receiver(
        srtp,
        pointers.context,
        pointers.unprotect,
        payload_type,
        sink,
        on_loss,
        clock,
        int(reorder),
        red_payload_type,
    )


def sender(
    srtp: pylibsrtp.Session,
    payload_type: int,
    ssrc: int,
    extension: bytes,
    timestamp_origin: int,
    sequence: int,
    send: Callable[[bytes], None],
    on_sent: Callable[[int, int, int], None] | None,
) -> Any:
    """An rtpcore.Sender protecting with `srtp` (rtp._SenderCore's arguments), or None."""
    pointers = srtp_pointers(srtp)
    if pointers is None:
        return None
    return load().Sender(
        srtp,
        pointers.context,
        pointers.protect,
        payload_type,
        ssrc,
        extension,
        timestamp_origin,
        sequence,
        send,
        on_sent,
    )
