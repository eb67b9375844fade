"""Recordings of any length: blocks, pauses, cuts at the quietest point, subtitles."""
import numpy as np
import pytest
import soundfile as sf
from tiny import LoudIsSpeechVAD, tiny_harmonifuse

from harmonifuse.segments import (
    WINDOW_SECONDS,
    AudioSource,
    Segment,
    _cut_to_fit,
    _merge_short,
    combine,
    split_at_pauses,
)


def _probs(spans, seconds):
    """Speech probability per 32 ms window: 0.95 inside the (start, end) spans, 0.02 elsewhere."""
    t = (np.arange(int(seconds / WINDOW_SECONDS)) + 0.5) * WINDOW_SECONDS
    probs = np.full(len(t), 0.02)
    for start, end in spans:
        probs[(t >= start) & (t < end)] = 0.95
    return probs


def test_segments_follow_the_pauses_within_a_window():
    spans = [(1.0, 4.0), (5.5, 9.0), (11.0, 12.5)]
    segments = split_at_pauses(_probs(spans, 14.0), duration=14.0, max_seconds=30.0)
    assert len(segments) == 3
    for segment, (start, end) in zip(segments, spans):
        assert abs(segment.start - start) < 0.15 and abs(segment.end - end) < 0.15


def test_overlong_speech_is_cut_at_its_quietest_point():
    probs = _probs([(0.0, 70.0)], 70.0)
    quiet = int(24.0 / WINDOW_SECONDS)
    probs[quiet] = 0.4  # a dip too short to be a pause
    pieces = _cut_to_fit(Segment(0.0, 70.0), probs, max_seconds=30.0)
    assert all(p.duration <= 30.0 for p in pieces)
    assert pieces[0].end == pytest.approx((quiet + 0.5) * WINDOW_SECONDS)
    assert pieces[0].start == 0.0 and pieces[-1].end == 70.0
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))  # nothing lost between pieces


def test_short_segments_join_the_nearer_neighbour_when_they_fit():
    merged = _merge_short([Segment(0, 5), Segment(5.4, 5.8), Segment(7.5, 10), Segment(20, 20.5)], 1.0, 30.0, 1.0)
    assert merged == [Segment(0, 5.8), Segment(7.5, 10), Segment(20, 20.5)]  # the last one has no near neighbour
    assert _merge_short([Segment(0, 29.5), Segment(29.6, 30.2)], 1.0, 30.0, 1.0) == [Segment(0, 29.5),
                                                                                         Segment(29.6, 30.2)]


@pytest.mark.parametrize("rate", [16000, 44100])
def test_blocks_and_seeks_give_the_samples_of_a_whole_read(tmp_path, rate):
    import soxr

    rng = np.random.default_rng(0)
    stereo = (rng.standard_normal((rate * 5, 2)) * 0.1).astype(np.float32)
    sf.write(tmp_path / "x.wav", stereo, rate, subtype="FLOAT")
    source = AudioSource(tmp_path / "x.wav")
    assert source.duration == pytest.approx(5.0)
    streamed = np.concatenate(list(source.blocks(seconds=1.3)))
    whole = stereo.mean(axis=1)
    whole = whole if rate == 16000 else soxr.resample(whole, rate, 16000)
    assert abs(len(streamed) - len(whole)) <= 2
    n = min(len(streamed), len(whole))
    assert np.abs(streamed[100:n - 100] - whole[100:n - 100]).max() < 1e-3
    piece = source.read(Segment(1.0, 2.0))
    assert len(piece) == 16000
    assert np.abs(piece[200:-200] - whole[16200:31800]).max() < 1e-3


def test_combine_joins_transcripts_and_weights_emotion_by_duration():
    labels = ["neutral", "happy"]
    answers = [{"no_speech": False, "transcript": "hello", "transcript_confidence": 0.5, "emotion": "neutral",
                "emotion_confidence": 0.8, "emotion_probs": {"neutral": 0.8, "happy": 0.2}},
               {"no_speech": True, "transcript": "", "transcript_confidence": 1.0, "emotion": None,
                "emotion_confidence": None, "emotion_probs": None},
               {"no_speech": False, "transcript": "world", "transcript_confidence": 0.9, "emotion": "happy",
                "emotion_confidence": 0.9, "emotion_probs": {"neutral": 0.1, "happy": 0.9}}]
    out = combine(answers, [Segment(0, 1), Segment(2, 3), Segment(3, 6)], labels)
    assert out["transcript"] == "hello world" and out["no_speech"] is False
    assert out["transcript_confidence"] == pytest.approx((0.5 * 1 + 0.9 * 3) / 4)
    assert out["emotion_probs"]["happy"] == pytest.approx((0.2 * 1 + 0.9 * 3) / 4)
    assert out["emotion"] == "happy" and [s["start"] for s in out["segments"]] == [0, 2, 3]


def _speechlike(seconds, rng):
    """Tiny-model input: loud noise bursts (the tiny model reads noise; the detector is stubbed)."""
    return (rng.standard_normal(int(seconds * 16000)) * 0.2).astype(np.float32)


def test_a_recording_longer_than_the_window_is_answered_segment_by_segment(tmp_path):
    from harmonifuse import formats

    model = tiny_harmonifuse(seed=0).eval()
    model.vad = LoudIsSpeechVAD()
    model.config.encoder.max_seconds = 4.0
    rng = np.random.default_rng(1)
    silence = np.zeros(16000, dtype=np.float32)
    wave = np.concatenate([silence, _speechlike(2.0, rng), silence, _speechlike(1.5, rng), silence, silence])
    sf.write(tmp_path / "long.wav", wave, 16000, subtype="FLOAT")
    out = model.analyze(str(tmp_path / "long.wav"))
    assert out["duration"] == pytest.approx(7.5)
    assert [(round(s["start"]), round(s["end"])) for s in out["segments"]] == [(1, 3), (4, 6)]
    direct = model.analyze([wave[int(s["start"] * 16000):int(s["end"] * 16000)] for s in out["segments"]])
    assert [s["transcript"] for s in out["segments"]] == [d["transcript"] for d in direct]
    assert out["transcript"] == " ".join(d["transcript"] for d in direct if d["transcript"]).strip()
    as_array = model.analyze((wave, 16000))
    assert as_array["segments"] == out["segments"]
    srt_text, vtt_text = formats.to_srt(out), formats.to_vtt(out)
    import srt
    import webvtt

    cues = list(srt.parse(srt_text))
    assert [c.content for c in cues] == [s["transcript"] for s in out["segments"] if s["transcript"]]
    assert cues and cues[0].start.total_seconds() == pytest.approx(out["segments"][0]["start"], abs=1e-3)
    assert [c.text for c in webvtt.from_string(vtt_text)] == [c.content for c in cues]
