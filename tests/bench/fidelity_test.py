"""The audio fidelity metrics (tests/bench/fidelity.py) on signals whose answer is known:
a looped reference found at its offset, gaps as silence, broken frames counted (a gap, a
wrong level) and not counted (a clean copy, a copy whose delay grows by one frame), the
delivery rate, PESQ/STOI at their ends of the scale, and the word error rate of the
sentences wholly inside a stretch (the recogniser is the real PocketSphinx)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.bench import fidelity, speech

RATE = fidelity.RATE
FRAME = fidelity.frame_samples()


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> speech.SpeechReference:
    return speech.synthesise(tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="module")
def reference(spoken: speech.SpeechReference) -> np.ndarray:
    return spoken.samples_16k


def looped(reference: np.ndarray, start: int, length: int) -> np.ndarray:
    return np.tile(reference, 3)[start : start + length]


def test_the_reference_is_a_few_seconds_of_speech_at_the_level_asked(
    reference: np.ndarray,
) -> None:
    assert 6.0 < len(reference) / RATE < 12.0
    loud = reference[np.abs(reference) > 10 ** (-50 / 20)]
    level = 20 * np.log10(np.sqrt(np.mean(loud**2)))
    assert abs(level - speech.LEVEL_DBFS) < 1.0


def test_align_finds_where_in_the_loop_the_received_stretch_starts(
    reference: np.ndarray,
) -> None:
    start = len(reference) - 7 * RATE // 10  # the stretch wraps round the loop's end
    received = looped(reference, start, 5 * RATE)
    alignment = fidelity.align(reference, received, margin=3200)
    np.testing.assert_allclose(alignment.matched(), received)
    assert len(alignment.reference) == len(received) + 2 * 3200


def test_assemble_places_frames_by_sequence_with_gaps_as_silence() -> None:
    one = (np.full(480, 1000, dtype="<i2")).tobytes()
    samples, missing = fidelity.assemble({10: one, 12: one, 13: one}, 10, 4)
    assert missing == 1
    assert len(samples) == 4 * 480
    assert not samples[480:960].any()
    assert samples[:480].min() == pytest.approx(1000 / 32768)
    with pytest.raises(ValueError, match="no frame"):
        fidelity.assemble({}, 0, 4)


def verdicts(reference: np.ndarray, received: np.ndarray) -> fidelity.FrameVerdicts:
    return fidelity.frame_verdicts(fidelity.align(reference, received, 3200), received)


def test_a_clean_copy_has_no_broken_frame(reference: np.ndarray) -> None:
    clean = verdicts(reference, looped(reference, 4000, 6 * RATE))
    assert clean.active > 100
    assert clean.broken == 0


def test_gaps_and_wrong_levels_are_broken(reference: np.ndarray) -> None:
    received = looped(reference, 4000, 6 * RATE).copy()
    clean = verdicts(reference, received)
    alignment = fidelity.align(reference, received, 3200)
    matched = alignment.matched()
    active = [
        k
        for k in range(len(received) // FRAME)
        if np.sqrt(np.mean(matched[k * FRAME : (k + 1) * FRAME] ** 2)) > 0.02
    ]
    gap, quiet = active[10], active[40]
    received[gap * FRAME : (gap + 1) * FRAME] = 0.0
    received[quiet * FRAME : (quiet + 1) * FRAME] *= 0.1  # 20 dB down
    hurt = verdicts(reference, received)
    assert hurt.active == clean.active
    assert hurt.broken == 2
    assert hurt.broken_pct == pytest.approx(200 / clean.active)


def test_a_delay_that_grows_by_one_frame_is_followed(reference: np.ndarray) -> None:
    # A jitter buffer that inserts one concealed frame: everything after it is 20 ms late.
    received = looped(reference, 4000, 6 * RATE)
    half = (len(received) // FRAME // 2) * FRAME
    later = np.concatenate([received[:half], np.zeros(FRAME), received[half:-FRAME]])
    assert verdicts(reference, later).broken <= 3


def test_delivery_is_frames_per_second_and_the_longest_wait() -> None:
    paced = fidelity.delivery([i * 0.02 for i in range(51)])
    assert paced.frames_per_s == pytest.approx(50.0)
    assert paced.max_interval_ms == pytest.approx(20.0)
    bunched = fidelity.delivery([0.0, 0.0, 0.0, 0.1, 0.1])
    assert bunched.max_interval_ms == pytest.approx(100.0)
    assert np.isnan(fidelity.delivery([1.0]).frames_per_s)


def test_pesq_and_stoi_span_their_scales(reference: np.ndarray) -> None:
    received = looped(reference, 4000, 6 * RATE)
    same = fidelity.Stretch(received, received)
    assert fidelity.pesq_wideband(same) > 4.5
    assert fidelity.stoi_score(same) > 0.99
    noise = np.random.default_rng(1).normal(0, 0.05, len(received))
    noisy = fidelity.Stretch(received, noise)
    assert fidelity.pesq_wideband(noisy) < 1.5
    assert fidelity.stoi_score(noisy) < 0.5


def test_pesq_without_speech_is_no_score_not_a_crash() -> None:
    silence = np.zeros(4 * RATE)
    assert np.isnan(fidelity.pesq_wideband(fidelity.Stretch(silence, silence)))


def test_speech_wav_is_48k_mono(tmp_path: Path) -> None:
    made = speech.synthesise(tmp_path)
    samples, rate = speech.read_wav(made.wav_path)
    assert rate == speech.BROWSER_RATE
    assert len(samples) / rate == pytest.approx(made.seconds, abs=0.01)


def test_each_sentence_is_found_between_the_pauses(spoken: speech.SpeechReference) -> None:
    texts = [s.text for s in spoken.sentences]
    assert texts == speech.split_sentences(speech.SENTENCES)
    assert len(texts) == 3
    for before, after in zip(spoken.sentences, spoken.sentences[1:], strict=False):
        assert after.start - before.end >= speech.SENTENCE_PAUSE_MS * RATE // 1000
    for sentence in spoken.sentences:
        assert 2.0 < (sentence.end - sentence.start) / RATE < 4.5, sentence
    with pytest.raises(ValueError, match="2 sentences but 3 stretches"):
        speech.locate_sentences(spoken.samples_16k, RATE, "One. Two.")


def test_the_sentences_inside_a_stretch_come_from_its_place_in_the_loop(
    spoken: speech.SpeechReference,
) -> None:
    period = len(spoken.samples_16k)
    first = spoken.sentences[0]
    start = first.end + RATE // 10  # just after the first sentence: the other two, then it
    received = looped(spoken.samples_16k, start, 8 * RATE)
    alignment = fidelity.align(spoken.samples_16k, received, margin=3200)
    assert alignment.offset == start
    inside = fidelity.sentences_in(spoken.sentences, period, alignment.offset, len(received))
    assert [s.text for s in inside] == [s.text for s in spoken.sentences[1:]]
    pad = fidelity.SENTENCE_PAD_MS * RATE // 1000
    assert inside[0].start == spoken.sentences[1].start - start - pad
    assert all(0 <= s.start < s.end <= len(received) for s in inside)
    assert fidelity.sentences_in(spoken.sentences, period, first.start + 1, 2 * RATE) == ()


def test_word_error_rate_of_clean_silenced_and_sentence_free_stretches(
    spoken: speech.SpeechReference,
) -> None:
    samples = spoken.samples_16k
    inside = fidelity.sentences_in(spoken.sentences, len(samples), 0, len(samples))
    assert len(inside) == 3
    clean = fidelity.Stretch(samples, samples, sentences=inside, vocabulary=spoken.vocabulary)
    floor = fidelity.word_error_rate(clean)
    assert floor <= 0.4  # the recogniser on espeak-ng's voice: 0.30 here
    assert fidelity.word_error_rate(clean) == floor  # the same words every time
    silenced = fidelity.Stretch(samples, np.zeros_like(samples), sentences=inside)
    assert fidelity.word_error_rate(silenced) == 1.0  # every word deleted
    assert np.isnan(fidelity.word_error_rate(fidelity.Stretch(samples, samples)))
