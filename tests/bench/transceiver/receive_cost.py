"""CPU per caller frame of the two receive paths (issue 19: the adaptive path must not cost
more than 15 % of the sessions per core), in-process: the part of a session's work the
`receive_path` setting changes, measured where the shared machine's noise cannot reach it
as it reaches the saturation benchmark's lateness figures. Prints figures, asserts nothing.

    ./bazelw run //tests/bench/transceiver:receive_cost [-- --frames 20000 --profile]

Per path and mode (transcoding 24 kHz, Opus passthrough): `media.CallerAudio` fed a 440 Hz
Opus tone one packet per 20 ms on an injected clock, `direct` through `on_opus`, `adaptive`
through `on_packet` and the pacer's `tick` (the jitter buffer, the slot's delivery), into a
bridge stub that only counts. CPU seconds (process time) per frame, the best of `--repeats`.
The RTP layer before it (SRTP, `rtp.RtpReceiver` with or without `reorder`) and the bridge
stream after it are the same code on both paths, and not in these figures: set them against
a whole session's CPU per frame, which the saturation benchmark gives (server CPU over
sessions x 50 frames/s). `--profile` prints where the adaptive path's time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from services.transceiver.media import CallerAudio
from services.transceiver.settings import ReceiveSettings
from tests.bench.transceiver.saturation import tone_packets

FRAME_S = 0.02
OPUS_TICKS = 960
TRANSCODING_HZ = 24000  # the saturation benchmark's transcoding sessions
MODES = ("transcoding", "passthrough")
PATHS = ("direct", "adaptive")
# Whole-session CPU per caller frame in the saturation benchmark's last quiet-machine rows
# (BENCHMARKS.md, "Latest: sessions per core"): server CPU / (sessions x 50 frames/s).
SESSION_US_PER_FRAME = {
    "transcoding": 0.75 / (150 * 50) * 1e6,
    "passthrough": 0.72 / (400 * 50) * 1e6,
}


class CountingBridge:
    """The BridgeSession calls CallerAudio makes, counted."""

    def __init__(self) -> None:
        self.frames = 0
        self.skipped = 0
        self.address = "stub"
        self.accepted = None

    def send_audio(self, data: bytes, samples: int) -> None:
        self.frames += 1

    def skip_audio(self, frames: int, samples_per_frame: int) -> None:
        self.skipped += frames


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Cost:
    mode: str
    path: str
    us_per_frame: float
    delivered: int
    frames: int


def _feeder(path: str, mode: str) -> tuple[CallerAudio, CountingBridge, Clock]:
    clock = Clock()
    audio = CallerAudio(
        TRANSCODING_HZ, 5, lambda: 1.0, ReceiveSettings(receive_path=path), clock=clock
    )
    bridge = CountingBridge()
    audio.bridge = bridge  # type: ignore[assignment]  # the stub has what CallerAudio calls
    audio.passthrough = mode == "passthrough"
    return audio, bridge, clock


def run_frames(path: str, mode: str, packets: list[bytes], frames: int) -> tuple[float, int]:
    """Process seconds for `frames` frames on one fresh CallerAudio; frames delivered."""
    audio, bridge, clock = _feeder(path, mode)
    count = len(packets)
    started = time.process_time()
    if path == "direct":
        for index in range(frames):
            clock.now += FRAME_S
            audio.on_opus(packets[index % count], index * OPUS_TICKS)
    else:
        for index in range(frames):
            clock.now += FRAME_S
            audio.on_packet(packets[index % count], index * OPUS_TICKS, index & 0xFFFF, False)
            audio.tick(index, clock.now)
    elapsed = time.process_time() - started
    return elapsed, bridge.frames


def measure(path: str, mode: str, packets: list[bytes], frames: int, repeats: int) -> Cost:
    best = min(run_frames(path, mode, packets, frames) for _ in range(repeats))
    return Cost(mode, path, 1e6 * best[0] / frames, best[1], frames)


def profile(mode: str, packets: list[bytes], frames: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run_frames("adaptive", mode, packets, frames)
    profiler.disable()
    print(f"\nadaptive, {mode}: where the time goes (cProfile, {frames} frames)")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(12)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20000, help="frames per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per row (best)")
    parser.add_argument("--profile", action="store_true", help="cProfile the adaptive path")
    args = parser.parse_args(argv)
    if args.frames < 100 or args.repeats < 1:
        parser.error("--frames: at least 100; --repeats: at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    packets = tone_packets(50)
    print(f"receive path CPU per caller frame, best of {args.repeats} x {args.frames} frames")
    print("| mode | direct us/frame | adaptive us/frame | adaptive - direct | share of a session |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        direct, adaptive = (measure(p, mode, packets, args.frames, args.repeats) for p in PATHS)
        extra = adaptive.us_per_frame - direct.us_per_frame
        share = 100 * extra / SESSION_US_PER_FRAME[mode]
        print(
            f"| {mode} | {direct.us_per_frame:.2f} | {adaptive.us_per_frame:.2f} | "
            f"{extra:+.2f} us | {share:+.1f} % of {SESSION_US_PER_FRAME[mode]:.0f} us |"
        )
        for cost in (direct, adaptive):
            if cost.delivered < cost.frames * 0.99:
                print(f"  ({cost.path}: {cost.delivered} of {cost.frames} frames delivered)")
    if args.profile:
        for mode in MODES:
            profile(mode, packets, args.frames)
    return 0


if __name__ == "__main__":
    sys.exit(main())
