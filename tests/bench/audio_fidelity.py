"""What the bridge hears of a caller through an impaired access link (issue 19, "Receive
path"): PESQ wideband, STOI, word error rate (PocketSphinx), broken 20 ms frames and frame
delivery of the audio a real InferenceBridgeService receives, against the clean speech
reference Chromium sends and its sentences.
Printed, never asserted; recorded in BENCHMARKS.md. Needs root (network namespaces).

    ./bazelw run //tests/bench:audio_fidelity                      # every condition, both paths
    ./bazelw run //tests/bench:audio_fidelity -- --conditions clean,loss5 --seconds 5 --calls 1
    ./bazelw run //tests/bench:audio_fidelity -- --paths direct

How: the netsim standard layout with the whole edge (tools/netsim/edge.py); headless
Chromium on the client host plays a speech WAV made with espeak-ng (tests/bench/speech.py)
as its microphone (the demo page, its microphone processing off: echo cancellation, noise
suppression and gain control would change the reference before it is sent) and calls the
edge; the transceiver's bridge is the capturing bridge (capture_bridge.py) in the cluster
host. Per condition and receive path, one call: connected over a clean link, then the
caller-to-edge direction ("up") gets the condition's impairment, `--warmup-s` for
Chromium's encoder and the receive path to settle, then `--seconds` of frames by sequence
number (a missing one is silence) are scored (fidelity.py says how). `--calls` calls per
row, each with its own seeded loss pattern (the same seeds for both paths), averaged: one
8 s call's PESQ under 5 % loss moves by +-0.3 with which frames are lost. The receive
path is the transceiver setting `receive_path` (`direct`: today's, `adaptive`: the jitter
buffer); a build without it measures `direct` only and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from services.transceiver.settings import TransceiverSettings
from tests.bench import fidelity, speech
from tests.bench.capture_bridge import BridgeThread, Capture
from tests.e2e.browser import chromium, js
from tests.netsim import calls, pages
from tests.netsim.calls import API_KEY
from tools.netsim.edge import ADDR, NetEdge, standard_edge
from tools.netsim.impair import Profile
from voiceedge.transceiver.v1 import transceiver_pb2

PATHS = ("direct", "adaptive")
# The capturing bridge's port on the cluster host: fixed, since the transceiver is started
# with its address before the bridge can listen; below Linux's ephemeral range, so no
# service of the edge (all on port 0 there) can hold it.
CAPTURE_PORT = 7055
CALL_TIMEOUT_S = 45.0
HANG_UP_TIMEOUT_S = 30.0
SEED = 19
FRAMES_PER_S = 1000 // fidelity.FRAME_MS
# Chromium's microphone as the file is: no echo cancellation, noise suppression or AGC.
RAW_MICROPHONE = """
const realGetUserMedia = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = (constraints) => realGetUserMedia(
  constraints && constraints.audio
    ? { ...constraints,
        audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false } }
    : constraints);
"""


@dataclass(frozen=True)
class Condition:
    key: str  # what --conditions names
    label: str  # the table's
    profile: Profile


# Reordering needs a queue to overtake: 30 ms of delay against one packet per 20 ms makes a
# reordered packet overtake exactly the one before it (an adjacent swap).
CONDITIONS = (
    Condition("clean", "0% loss", Profile()),
    Condition("loss2", "2% loss", Profile(loss=0.02)),
    Condition("loss5", "5% loss", Profile(loss=0.05)),
    Condition("loss10", "10% loss", Profile(loss=0.10)),
    Condition("burst3", "5% loss, bursts of 3", Profile(loss=0.05, burst=3)),
    Condition("jitter40", "+-40ms jitter", Profile(delay_ms=40, jitter_ms=40)),
    Condition(
        "loss5-jitter40", "5% loss +-40ms jitter", Profile(loss=0.05, delay_ms=40, jitter_ms=40)
    ),
    Condition(
        "loss5-reorder10", "5% loss 10% reorder", Profile(loss=0.05, delay_ms=30, reorder=0.10)
    ),
)


NO_DELIVERY = fidelity.Delivery(math.nan, math.nan)


@dataclass(frozen=True)
class Row:
    condition: Condition
    path: str
    quality: dict[str, float] = field(default_factory=dict)  # fidelity.QUALITY_METRICS
    broken_pct: float = math.nan
    delivery: fidelity.Delivery = NO_DELIVERY
    missing: int = 0  # sequence numbers the bridge never got
    jitter_buffer_ms: float | None = None
    note: str = ""  # instead of figures: why there are none
    calls: int = 1  # how many calls the figures average


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def combine(rows: Sequence[Row]) -> Row:
    """The calls of one condition and path as one row: means, the longest gap, the frames
    missing in all."""
    first = rows[0]
    quality = {name: float(np.mean([r.quality[name] for r in rows])) for name in first.quality}
    return Row(
        first.condition,
        first.path,
        quality,
        float(np.mean([r.broken_pct for r in rows])),
        fidelity.Delivery(
            float(np.mean([r.delivery.frames_per_s for r in rows])),
            max(r.delivery.max_interval_ms for r in rows),
        ),
        sum(r.missing for r in rows),
        _mean([r.jitter_buffer_ms for r in rows]),
        calls=len(rows),
    )


def receive_path_supported() -> bool:
    return "receive_path" in TransceiverSettings.__dataclass_fields__


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def jitter_buffer_delay_ms(edge: NetEdge) -> float | None:
    """The session's jitter-buffer delay, when the transceiver reports one in its stats."""
    stats = calls.live_session(edge).stats
    for descriptor in stats.DESCRIPTOR.fields:
        if "jitter_buffer" in descriptor.name:
            return float(getattr(stats, descriptor.name))
    return None


def live_calls(edge: NetEdge) -> int:
    closed = transceiver_pb2.SESSION_STATE_CLOSED
    return sum(1 for s in calls.sessions(edge) if s.state != closed)


def hang_up(browser: webdriver.Chrome, edge: NetEdge) -> None:
    """Hangs up on the page; returns once the transceiver has closed the session too (the
    next call must be the only one)."""
    browser.find_element(By.ID, "talk").click()
    wait = WebDriverWait(browser, timeout=HANG_UP_TIMEOUT_S, poll_frequency=0.2)
    wait.until(lambda d: js(d, "document.getElementById('state').textContent") == "idle")
    wait.until(lambda _: live_calls(edge) == 0)


def score(
    reference: speech.SpeechReference,
    capture: Capture,
    frames: dict[int, bytes],
    arrivals: dict[int, float],
    first: int,
    count: int,
    save_as: Path | None,
) -> tuple[dict[str, float], float, fidelity.Delivery, int]:
    samples, missing = fidelity.assemble(frames, first, count)
    received = speech.resample(samples, capture.sample_rate_hz, fidelity.RATE)
    margin = fidelity.RATE * fidelity.ALIGN_MARGIN_MS // 1000
    alignment = fidelity.align(reference.samples_16k, received, margin)
    sentences = fidelity.sentences_in(
        reference.sentences, len(reference.samples_16k), alignment.offset, len(received)
    )
    stretch = fidelity.Stretch(
        alignment.matched(), received, sentences=sentences, vocabulary=reference.vocabulary
    )
    if save_as is not None:
        speech.write_wav(save_as.with_name(save_as.name + "-received.wav"), received, fidelity.RATE)
        speech.write_wav(
            save_as.with_name(save_as.name + "-reference.wav"), stretch.reference, fidelity.RATE
        )
    quality: dict[str, float] = {}
    for metric in fidelity.QUALITY_METRICS:
        started = time.monotonic()
        quality[metric.name] = metric.compute(stretch)
        progress(
            f"    {metric.name} {quality[metric.name]:.3f} in {time.monotonic() - started:.2f} s"
        )
    verdicts = fidelity.frame_verdicts(alignment, received)
    window = [arrivals[s] for s in range(first, first + count) if s in arrivals]
    return quality, verdicts.broken_pct, fidelity.delivery(window), missing


@dataclass(frozen=True)
class Options:
    seconds: float
    warmup_s: float
    save_audio: Path | None = None  # each call's received stretch and its reference, as WAVs
    calls: int = 1  # per condition and path, each with its own loss pattern; rows average them


def measure(
    edge: NetEdge,
    bridge: BridgeThread,
    browser: webdriver.Chrome,
    reference: speech.SpeechReference,
    condition: Condition,
    path: str,
    options: Options,
    call: int,
) -> Row:
    """Call number `call` under `condition` (its loss pattern: seed SEED + call); its row."""
    known = bridge.session_ids()
    edge.link.set("up", **asdict(Profile()))
    pages.start_call(browser, edge, timeout_s=CALL_TIMEOUT_S)
    capture = bridge.new_session(known, CALL_TIMEOUT_S)
    edge.link.set("up", **asdict(condition.profile))
    edge.link.reseed(SEED + call, "up")
    measured_from = time.monotonic() + options.warmup_s
    count = round(options.seconds * FRAMES_PER_S)
    bridge.wait_for(
        "audio after the warm-up",
        lambda: capture.first_after(measured_from) is not None,
        options.warmup_s + CALL_TIMEOUT_S,
    )
    with bridge.changed:
        first = capture.first_after(measured_from)
    assert first is not None
    progress(f"  {path} {condition.key}: measuring {options.seconds:.0f} s from frame {first}")
    bridge.wait_for(
        f"{options.seconds:.0f} s of audio",
        lambda: max(capture.frames, default=-1) >= first + count - 1,
        3 * options.seconds + CALL_TIMEOUT_S,
    )
    delay = jitter_buffer_delay_ms(edge)
    edge.link.set("up", **asdict(Profile()))
    hang_up(browser, edge)
    frames, arrivals = bridge.snapshot(capture)
    name = f"{path}-{condition.key}-{call}"
    saved = options.save_audio / name if options.save_audio else None
    quality, broken, delivered, missing = score(
        reference, capture, frames, arrivals, first, count, saved
    )
    return Row(condition, path, quality, broken, delivered, missing, delay)


def path_flags(path: str) -> list[str]:
    return ["--receive-path", path] if receive_path_supported() else []


@contextlib.contextmanager
def caller_and_bridge(
    workdir: Path, path: str, reference: speech.SpeechReference
) -> Iterator[tuple[NetEdge, BridgeThread, webdriver.Chrome]]:
    """The edge with the transceiver on `path` and the capturing bridge, and Chromium on
    the client host (the calling thread sits there meanwhile)."""
    bridge_address = f"{ADDR.cluster_internal}:{CAPTURE_PORT}"
    flags = {
        "signaling": ["--demo-page", "true"],
        "transceiver": ["--bridge-address", bridge_address, *path_flags(path)],
    }
    with (
        standard_edge(workdir, API_KEY, extra_flags=flags) as edge,
        BridgeThread(edge.testbed.ns("cluster"), ADDR.cluster_internal, CAPTURE_PORT) as bridge,
        edge.testbed.entered("client"),
        chromium(workdir, reference.wav_path, secure_origin=edge.http_base) as browser,
    ):
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RAW_MICROPHONE})
        try:
            yield edge, bridge, browser
        finally:
            # The transceiver first (its bridge stream ends), then the bridge.
            edge.stack.stop()


def run_path(
    workdir: Path,
    path: str,
    conditions: Sequence[Condition],
    reference: speech.SpeechReference,
    options: Options,
) -> list[Row]:
    """Every condition on one receive path; one edge and one Chromium for all of them."""
    rows = []
    progress(f"{path}: starting the edge and Chromium")
    with caller_and_bridge(workdir, path, reference) as (edge, bridge, browser):
        for index, condition in enumerate(conditions, 1):
            each = []
            for call in range(options.calls):
                step = f"{path} [{index}/{len(conditions)}] call {call + 1}/{options.calls}"
                progress(f"{step} {condition.label}: calling")
                each.append(
                    measure(edge, bridge, browser, reference, condition, path, options, call)
                )
                progress(f"{step} {format_row(each[-1])}")
            rows.append(combine(each))
    return rows


def _figure(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    return "n/a" if math.isnan(value) else fmt.format(value)


COLUMNS = (
    "condition",
    "path",
    *(m.name for m in fidelity.QUALITY_METRICS),
    "broken %",
    "frames/s",
    "max gap ms",
    "missing",
    "jb delay ms",
)
WIDTHS = (22, 9, *(6 for _ in fidelity.QUALITY_METRICS), 9, 9, 11, 8, 11)


def format_row(row: Row) -> str:
    head = [row.condition.label.ljust(WIDTHS[0]), row.path.ljust(WIDTHS[1])]
    if row.note:
        return " ".join(head) + row.note
    quality = [_figure(row.quality.get(m.name), m.fmt) for m in fidelity.QUALITY_METRICS]
    rest = [
        _figure(row.broken_pct, "{:.2f}"),
        _figure(row.delivery.frames_per_s, "{:.2f}"),
        _figure(row.delivery.max_interval_ms, "{:.0f}"),
        str(row.missing),
        _figure(row.jitter_buffer_ms, "{:.0f}"),
    ]
    cells = [c.rjust(w) for c, w in zip([*quality, *rest], WIDTHS[2:], strict=True)]
    return " ".join([*head, *cells])


def format_table(rows: Sequence[Row]) -> str:
    header = " ".join(
        name.ljust(w) if i < 2 else name.rjust(w)
        for i, (name, w) in enumerate(zip(COLUMNS, WIDTHS, strict=True))
    )
    return "\n".join([header, *(format_row(r) for r in rows)])


def _find(rows: Sequence[Row], key: str, path: str) -> Row | None:
    found = [r for r in rows if r.condition.key == key and r.path == path and not r.note]
    return found[0] if found else None


def target_line(rows: Sequence[Row]) -> str:
    """The issue's check: PESQ gain at 5 % loss with jitter, broken frames at 5 % loss with
    reordering (the adaptive path's; the direct path's when that is all there is)."""
    direct = _find(rows, "loss5-jitter40", "direct")
    adaptive = _find(rows, "loss5-jitter40", "adaptive")
    if direct is None or adaptive is None:
        gain = "n/a (adaptive: not in this build)" if not receive_path_supported() else "n/a"
    else:
        gain = f"{adaptive.quality['PESQ'] - direct.quality['PESQ']:+.2f}"
    reorder = _find(rows, "loss5-reorder10", "adaptive")
    if reorder is not None:
        broken = f"{reorder.broken_pct:.2f} % (adaptive)"
    elif (only := _find(rows, "loss5-reorder10", "direct")) is not None:
        broken = f"n/a for adaptive; direct {only.broken_pct:.2f} %"
    else:
        broken = "n/a"
    return (
        f"5% loss ±40ms jitter: PESQ adaptive - direct = {gain} (target >= 0.3); "
        f"broken frames at 5% loss + 10% reorder: {broken} (target <= 1 %)"
    )


def parse_conditions(text: str) -> list[Condition]:
    by_key = {c.key: c for c in CONDITIONS}
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown conditions {unknown}; known {list(by_key)}")
    return [by_key[k] for k in keys]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--conditions",
        type=parse_conditions,
        default=list(CONDITIONS),
        help=f"comma-separated, of {','.join(c.key for c in CONDITIONS)} (default: all)",
    )
    parser.add_argument("--paths", default=",".join(PATHS), help="direct,adaptive (default)")
    parser.add_argument("--seconds", type=float, default=8.0, help="audio scored per call")
    parser.add_argument(
        "--warmup-s", type=float, default=3.0, help="impaired audio before scoring starts"
    )
    parser.add_argument(
        "--calls", type=int, default=3, help="calls per condition and path (averaged)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument(
        "--save-audio",
        type=Path,
        default=None,
        metavar="DIR",
        help="write each call's received audio and aligned reference there (16 kHz WAVs)",
    )
    args = parser.parse_args(argv)
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not args.paths or set(args.paths) - set(PATHS):
        parser.error(f"--paths: of {','.join(PATHS)}")
    if args.calls < 1:
        parser.error("--calls: at least 1")
    if args.seconds < 3.2:
        parser.error("--seconds: PESQ needs at least 3.2 s")
    return args


def machine_load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def recogniser_floor(reference: speech.SpeechReference) -> float:
    """The WER column's floor: the clean reference pass itself, recognised sentence by
    sentence as the received audio is."""
    samples = reference.samples_16k
    inside = fidelity.sentences_in(reference.sentences, len(samples), 0, len(samples))
    clean = fidelity.Stretch(samples, samples, sentences=inside, vocabulary=reference.vocabulary)
    return fidelity.word_error_rate(clean)


def run(args: argparse.Namespace, workdir: Path) -> list[Row]:
    reference = speech.synthesise(workdir)
    progress(f"speech reference: {reference.seconds:.1f} s per loop ({reference.wav_path})")
    started = time.monotonic()
    floor = recogniser_floor(reference)
    print(
        f"WER of the clean reference (the recogniser's floor): {floor:.2f}, "
        f"{time.monotonic() - started:.1f} s with the model load",
        flush=True,
    )
    rows: list[Row] = []
    if args.save_audio is not None:
        args.save_audio.mkdir(parents=True, exist_ok=True)
    for path in args.paths:
        if path != "direct" and not receive_path_supported():
            rows += [Row(c, path, note="adaptive: not in this build") for c in args.conditions]
            progress(f"{path}: not in this build (no transceiver setting receive_path)")
            continue
        (workdir / path).mkdir(exist_ok=True)
        options = Options(args.seconds, args.warmup_s, args.save_audio, args.calls)
        rows += run_path(workdir / path, path, args.conditions, reference, options)
    return sorted(rows, key=lambda r: (CONDITIONS.index(r.condition), PATHS.index(r.path)))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"audio fidelity: {args.calls} call(s) per row, {args.seconds:.0f} s scored per call "
        f"after {args.warmup_s:.0f} s of warm-up; {machine_load()}"
    )
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        rows = run(args, workdir)
    print(format_table(rows))
    print(f"after the run: {machine_load()}")
    print(target_line(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
