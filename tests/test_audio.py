"""harmonifuse.audio: conversions (stereo, resampling, integer PCM) and every rejection."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from harmonifuse.audio import SAMPLE_RATE, AudioError, BadSamplePolicy, SkipCounter, load_audio, to_mono_16k


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path, samples, rate=SAMPLE_RATE, subtype="FLOAT"):
    sf.write(str(path), samples, rate, subtype=subtype)
    return path


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def test_mono_16k_file_passes_through_unchanged(tmp_path):
    x = sine(300, 0.5, SAMPLE_RATE)
    y = load_audio(write(tmp_path / "a.wav", x))
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, x)


def test_flac_is_read(tmp_path):
    x = sine(300, 0.5, SAMPLE_RATE)
    y = load_audio(write(tmp_path / "a.flac", x, subtype="PCM_16"))
    np.testing.assert_allclose(y, x, atol=1e-4)


def test_stereo_becomes_mean_of_channels(tmp_path):
    left, right = sine(300, 0.5, SAMPLE_RATE), sine(700, 0.5, SAMPLE_RATE, 0.2)
    y = load_audio(write(tmp_path / "st.wav", np.stack([left, right], axis=1)))
    assert y.ndim == 1
    np.testing.assert_allclose(y, (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("rate", [8_000, 44_100])
def test_other_rates_are_resampled_keeping_duration_and_pitch(tmp_path, rate):
    path = write(tmp_path / "r.wav", sine(440, 1.0, rate), rate)
    assert sf.info(str(path)).samplerate == rate
    y = load_audio(path)
    assert abs(len(y) - SAMPLE_RATE) <= 1  # 1.0 s at 16 kHz
    assert dominant_frequency(y, SAMPLE_RATE) == pytest.approx(440, abs=2)
    assert np.abs(y).max() <= 1.0


def test_missing_file_names_it(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: audio file not found"):
        load_audio(tmp_path / "nope.wav")


def test_directory_is_rejected(tmp_path):
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)


def test_not_audio_names_file_and_fix(tmp_path):
    path = tmp_path / "fake.wav"
    path.write_text("this is not audio\n" * 10)
    with pytest.raises(AudioError, match=r"fake\.wav: not a readable audio file.*convert it to WAV"):
        load_audio(path)


def test_empty_file_and_zero_frame_wav(tmp_path):
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"zero\.wav: audio file is empty"):
        load_audio(tmp_path / "zero.wav")
    with pytest.raises(AudioError, match=r"noframes\.wav: audio file contains no samples"):
        load_audio(write(tmp_path / "noframes.wav", np.zeros(0, np.float32)))


def test_nan_samples_are_rejected(tmp_path):
    x = sine(300, 0.5, SAMPLE_RATE)
    x[100] = np.nan
    with pytest.raises(AudioError, match=r"nan\.wav: 1 NaN/inf samples"):
        load_audio(write(tmp_path / "nan.wav", x))
    x[100] = np.inf
    with pytest.raises(AudioError, match="utt7: 1 NaN/inf"):
        to_mono_16k(x, SAMPLE_RATE, source="utt7")


def test_silence_is_rejected_but_quiet_speech_is_not(tmp_path):
    with pytest.raises(AudioError, match=r"silent\.wav: audio is silent.*silence_threshold"):
        load_audio(write(tmp_path / "silent.wav", np.zeros(8000, np.float32)))
    quiet = sine(300, 0.5, SAMPLE_RATE, amplitude=1e-3)
    assert load_audio(write(tmp_path / "quiet.wav", quiet)).shape == quiet.shape


def test_too_short(tmp_path):
    with pytest.raises(AudioError, match=r"short\.wav: audio is too short.*min_seconds"):
        load_audio(write(tmp_path / "short.wav", sine(300, 0.05, SAMPLE_RATE)))
    assert load_audio(tmp_path / "short.wav", min_seconds=0.01).shape == (800,)


def test_too_long_names_the_limit_and_the_config_field(tmp_path):
    path = write(tmp_path / "long.wav", sine(300, 2.0, SAMPLE_RATE))
    with pytest.raises(AudioError, match=r"long\.wav: audio is too long \(2\.00 s > max_seconds 1 s\)"
                                         r".*raise `max_seconds`"):
        load_audio(path, max_seconds=1.0)
    assert load_audio(path, max_seconds=None).shape == (32000,)


def test_array_conversions():
    pcm = np.array([16384, -32768, 0, 8192] * 800, dtype=np.int16)
    np.testing.assert_allclose(to_mono_16k(pcm, SAMPLE_RATE)[:4], [0.5, -1.0, 0.0, 0.25])
    loud = sine(300, 0.5, SAMPLE_RATE, amplitude=4.0)
    y = to_mono_16k(loud, SAMPLE_RATE)
    assert np.abs(y).max() == pytest.approx(1.0, abs=1e-3)  # scaled, not clipped:
    np.testing.assert_allclose(y, loud / np.abs(loud).max(), atol=1e-6)


def test_array_shape_errors():
    with pytest.raises(AudioError, match=r"<array>: shape \(2, 8000\).*samples\.T"):
        to_mono_16k(np.zeros((2, 8000), np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="expected shape"):
        to_mono_16k(np.zeros((2, 2, 2)), SAMPLE_RATE)
    with pytest.raises(AudioError, match="no samples"):
        to_mono_16k(np.zeros(0), SAMPLE_RATE)
    with pytest.raises(AudioError, match="sample rate"):
        to_mono_16k(np.ones(100), 0)


def test_skip_policy_records_every_file_and_reason(tmp_path):
    good = write(tmp_path / "good.wav", sine(300, 0.5, SAMPLE_RATE))
    silent = write(tmp_path / "silent.wav", np.zeros(8000, np.float32))
    policy = BadSamplePolicy("skip")
    results = [policy.load(p) for p in (good, tmp_path / "missing.wav", silent)]
    assert results[0] is not None and results[1] is None and results[2] is None
    counter = policy.counter
    assert counter.count == 2
    assert [source for source, _ in counter.reasons] == [str(tmp_path / "missing.wav"), str(silent)]
    assert "not found" in counter.reasons[0][1] and "silent" in counter.reasons[1][1]
    summary = counter.summary()
    assert summary.startswith("skipped 2 bad sample(s)") and "missing.wav" in summary


def test_fail_policy_reraises(tmp_path):
    policy = BadSamplePolicy("fail")
    with pytest.raises(AudioError, match="missing.wav"):
        policy.load(tmp_path / "missing.wav")
    assert policy.counter.count == 0


def test_max_skips_and_bad_policy_name(tmp_path):
    policy = BadSamplePolicy("skip", max_skips=1)
    policy.load(tmp_path / "a.wav")
    with pytest.raises(AudioError, match="more than max_skips=1"):
        policy.load(tmp_path / "b.wav")
    with pytest.raises(ValueError, match="'skip' or 'fail'"):
        BadSamplePolicy("ignore")


def test_summary_limits_listing():
    counter = SkipCounter()
    assert counter.summary() == "no samples skipped"
    for i in range(12):
        counter.record(f"f{i}", f"f{i}: bad")
    assert counter.summary(limit=3).splitlines()[-1] == "  ... and 9 more"
