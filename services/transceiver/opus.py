"""libopus through ctypes: decode straight to the bridge's rate, encode without PyAV frames.

Why not PyAV (which the rest of aiortc uses): FFmpeg's libopus decoder always outputs
48 kHz, so every caller frame needed a resampler pass to reach 24 kHz, and each encode built
an av.AudioFrame with its time base; libopus itself decodes at 8/12/16/24/48 kHz natively
(RFC 6716 §4.3) and encodes from a plain int16 buffer. Measured on the dev machine: decode
to 24 kHz ~24 us instead of ~33 us decode + ~28 us resample (BENCHMARKS.md, transceiver).
No maintained Python binding exists (opuslib last released 2018), and the stable libopus
ABI used here is six functions. The system library (Debian libopus0) is required.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

RATES = (8000, 12000, 16000, 24000, 48000)  # what libopus decodes/encodes natively
APPLICATIONS = {"voip": 2048, "audio": 2049, "lowdelay": 2051}  # OPUS_APPLICATION_*
SET_BITRATE = 4002  # OPUS_SET_BITRATE_REQUEST
SET_COMPLEXITY = 4010  # OPUS_SET_COMPLEXITY_REQUEST
SET_INBAND_FEC = 4012  # OPUS_SET_INBAND_FEC_REQUEST
SET_PACKET_LOSS_PERC = 4014  # OPUS_SET_PACKET_LOSS_PERC_REQUEST
SET_DTX = 4016  # OPUS_SET_DTX_REQUEST
MAX_PACKET = 1500
MAX_FRAME_S = 0.12  # the longest Opus packet, 120 ms (RFC 6716 §3.2.5)


class OpusError(RuntimeError):
    """libopus refused; the message carries its error text."""


def _load() -> Any:
    path = ctypes.util.find_library("opus") or "libopus.so.0"
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise OpusError(
            f"libopus not found ({exc}): install the system package (Debian: libopus0)"
        ) from None
    int_p = ctypes.POINTER(ctypes.c_int)
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, int_p]
    lib.opus_decode.restype = ctypes.c_int
    lib.opus_decode.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_encoder_create.restype = ctypes.c_void_p
    lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int, int_p]
    lib.opus_encode.restype = ctypes.c_int32
    lib.opus_encode.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int32,
    ]
    lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_strerror.restype = ctypes.c_char_p
    lib.opus_strerror.argtypes = [ctypes.c_int]
    return lib


_lib: Any = None


def lib() -> Any:
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


def _error(code: int) -> str:
    return str(lib().opus_strerror(code).decode("ascii", "replace"))


def has_fec(packet: bytes) -> bool:
    """Whether an Opus packet's first frame carries LBRR (in-band FEC) data for the frame
    before it: only SILK and Hybrid frames can (RFC 6716 §3.1 TOC config below 16), and
    the LBRR flag follows each channel's VAD flags as the first bits the range coder
    reads at probability 1/2 (§4.2.3, §4.2.4), i.e. plain bits of the frame's first byte.
    Packets with one frame or frames of equal size (codes 0 and 1) are read; code 2 and 3
    packets count as without."""
    if len(packet) < 2:
        return False
    toc = packet[0]
    config, code = toc >> 3, toc & 3
    if config >= 16 or code > 1:
        return False
    # SILK frames in this Opus frame: 10/20 ms one, 40 ms two, 60 ms three; Hybrid one.
    silk_frames = 1 if config >= 12 or config & 3 < 2 else config & 3
    channels = 2 if toc & 0x04 else 1
    first = packet[1]
    for channel in range(channels):
        bit = (channel + 1) * (silk_frames + 1) - 1
        if bit < 8 and first & (0x80 >> bit):
            return True
    return False


class Decoder:
    """Opus packets -> mono s16le PCM at `rate_hz` (one call per packet)."""

    def __init__(self, rate_hz: int) -> None:
        if rate_hz not in RATES:
            raise ValueError(f"opus decoder: rate {rate_hz} not one of {RATES}")
        error = ctypes.c_int()
        self._state = lib().opus_decoder_create(rate_hz, 1, ctypes.byref(error))
        if not self._state:
            raise OpusError(f"opus_decoder_create: {_error(error.value)}")
        self._decode = lib().opus_decode  # looked up once: called per 20 ms frame
        self._max_samples = int(rate_hz * MAX_FRAME_S)
        self._pcm = ctypes.create_string_buffer(self._max_samples * 2)

    def conceal(self, samples: int) -> bytes:
        """`samples` of packet-loss concealment (libopus PLC, RFC 6716 §4.4) for a packet
        that never came."""
        samples = min(samples, self._max_samples)
        got = self._decode(self._state, None, 0, self._pcm, samples, 0)
        if got < 0:
            raise OpusError(f"opus_decode (PLC): {_error(got)}")
        return ctypes.string_at(self._pcm, got * 2)

    def decode_fec(self, following: bytes, samples: int) -> bytes:
        """`samples` of the frame lost just before `following`, from the in-band FEC (LBRR,
        RFC 6716 §2.1.7) that `following` carries, or PLC when it carries none; decode
        `following` itself next as usual."""
        samples = min(samples, self._max_samples)
        got = self._decode(self._state, following, len(following), self._pcm, samples, 1)
        if got < 0:
            raise OpusError(f"opus_decode (FEC): {_error(got)}")
        return ctypes.string_at(self._pcm, got * 2)

    def decode(self, packet: bytes) -> bytes:
        """PCM of one packet; OpusError for a corrupt one."""
        samples = self._decode(self._state, packet, len(packet), self._pcm, self._max_samples, 0)
        if samples < 0:
            raise OpusError(f"opus_decode: {_error(samples)}")
        return ctypes.string_at(self._pcm, samples * 2)

    def __del__(self) -> None:
        state, self._state = getattr(self, "_state", None), None
        if state and _lib is not None:
            _lib.opus_decoder_destroy(state)


class Encoder:
    """Mono s16le PCM frames at `rate_hz` -> Opus packets."""

    def __init__(
        self,
        rate_hz: int,
        application: str,
        bitrate: int,
        complexity: int,
        *,
        inband_fec: bool = False,
        packet_loss_percent: int = 0,
        dtx: bool = False,
    ) -> None:
        if rate_hz not in RATES:
            raise ValueError(f"opus encoder: rate {rate_hz} not one of {RATES}")
        if application not in APPLICATIONS:
            raise ValueError(f"opus encoder: application {application!r} unknown")
        error = ctypes.c_int()
        self._state = lib().opus_encoder_create(
            rate_hz, 1, APPLICATIONS[application], ctypes.byref(error)
        )
        if not self._state:
            raise OpusError(f"opus_encoder_create: {_error(error.value)}")
        requests = [(SET_BITRATE, bitrate), (SET_COMPLEXITY, complexity)]
        if inband_fec:  # LBRR: each packet carries a coarse copy of the previous frame
            requests += [(SET_INBAND_FEC, 1), (SET_PACKET_LOSS_PERC, packet_loss_percent)]
        if dtx:
            requests.append((SET_DTX, 1))
        for request, value in requests:
            # opus_encoder_ctl is variadic: ctypes passes the int arguments as C ints.
            code = lib().opus_encoder_ctl(
                ctypes.c_void_p(self._state), ctypes.c_int(request), ctypes.c_int(value)
            )
            if code != 0:
                raise OpusError(f"opus_encoder_ctl({request}, {value}): {_error(code)}")
        self._encode = lib().opus_encode  # looked up once: called per 20 ms frame
        self._out = ctypes.create_string_buffer(MAX_PACKET)

    def encode(self, pcm: bytes, samples: int) -> bytes:
        if len(pcm) != samples * 2:  # libopus reads samples * 2 bytes, whatever pcm holds
            raise ValueError(f"opus encode: {len(pcm)} bytes for {samples} samples")
        size = self._encode(self._state, pcm, samples, self._out, MAX_PACKET)
        if size < 0:
            raise OpusError(f"opus_encode: {_error(size)}")
        return ctypes.string_at(self._out, size)

    def __del__(self) -> None:
        state, self._state = getattr(self, "_state", None), None
        if state and _lib is not None:
            _lib.opus_encoder_destroy(state)
