"""The validator itself: it passes good events and names each bad line and why.

Until the transceiver's golden file lands, these hand-written fixtures are what proves that
a missing `event_id` or an old event name fails the check.
"""

from __future__ import annotations

from pathlib import Path

from tools.node.realtime_events import validate

TESTDATA = Path("tools/node/testdata")


def test_valid_events_pass() -> None:
    result = validate([TESTDATA / "events_good.jsonl"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 typed, 0 failed" in result.stdout


def test_missing_event_id_and_old_name_fail_with_their_lines() -> None:
    bad = TESTDATA / "events_bad.jsonl"
    result = validate([bad])
    assert result.returncode == 1, result.stdout + result.stderr
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 2, result.stdout
    assert failures[0].startswith(f"FAIL {bad}:11: output_audio_buffer.started parsed as generic")
    assert "event_id" in failures[0]
    assert failures[1].startswith(f"FAIL {bad}:12: response.audio_transcript.delta parsed as")
    assert "10 typed, 2 failed" in result.stdout


def test_allowed_generic_type_passes(tmp_path: Path) -> None:
    extension = tmp_path / "extension.jsonl"
    extension.write_text('{"type":"voiceedge.stats","event_id":"event_1"}\n')
    assert validate([extension]).returncode == 1
    assert validate([extension], allow_generic=["voiceedge.stats"]).returncode == 0


def test_unparseable_and_empty_files_fail(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n")
    result = validate([garbage])
    assert result.returncode == 1
    assert "unparseable" in result.stdout
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = validate([empty])
    assert result.returncode == 1
    assert "no events at all" in result.stdout
