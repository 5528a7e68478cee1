"""PCM helpers: s16le bytes <-> numpy, downmix, linear resampling, 20 ms framing.

Linear interpolation is enough here: the VAD only needs the speech band (below 4 kHz) of a
16 kHz copy, and 24 kHz -> 16 kHz keeps everything below 8 kHz. It does not low-pass before
decimating, so content above the target Nyquist aliases; voice input has little there.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import numpy.typing as npt

Samples = npt.NDArray[np.int16]

BYTES_PER_SAMPLE = 2
FRAME_MS = 20


def pcm_to_mono(data: bytes, channels: int) -> Samples:
    """s16le interleaved bytes -> mono int16 samples (channels averaged). A trailing partial
    sample or partial channel group is ignored, never an error."""
    whole = len(data) - len(data) % (BYTES_PER_SAMPLE * channels)
    samples = np.frombuffer(data[:whole], dtype="<i2")
    if channels == 1:
        return cast(Samples, samples.astype(np.int16))
    mixed = samples.reshape(-1, channels).astype(np.int32).mean(axis=1)
    return cast(Samples, mixed.astype(np.int16))


def resample_linear(samples: Samples, src_rate: int, dst_rate: int) -> Samples:
    """Resamples one chunk by linear interpolation; output length round(n * dst / src).

    Each chunk is resampled on its own (no state across chunks): with 20 ms chunks at rates
    whose ratio divides evenly (24k -> 16k: 480 -> 320) the sample grid stays exact.
    """
    if src_rate == dst_rate or len(samples) == 0:
        return samples
    count = round(len(samples) * dst_rate / src_rate)
    positions = np.arange(count) * (src_rate / dst_rate)
    out = np.interp(positions, np.arange(len(samples)), samples.astype(np.float64))
    return cast(Samples, np.clip(np.round(out), -32768, 32767).astype(np.int16))


def frame_bytes(sample_rate_hz: int, frame_ms: int = FRAME_MS) -> int:
    """Bytes in one mono s16le frame."""
    return sample_rate_hz * frame_ms // 1000 * BYTES_PER_SAMPLE


def split_frames(data: bytes, size: int) -> tuple[list[bytes], bytes]:
    """Whole `size`-byte frames of data, and the remainder."""
    whole = len(data) - len(data) % size
    return [data[i : i + size] for i in range(0, whole, size)], data[whole:]
