"""A built-in set of non-speech clips: what a speech model must answer with "no speech".

Noise of three colours at three levels, tones, mains hum, clicks, music-like chords, a sweep,
near-silence and digital silence, all generated from a seed (no files, no downloads). Used by
``make demo`` and ``harmonifuse evaluate --nonspeech`` to measure how often a model invents a
transcript where nobody speaks.
"""
from __future__ import annotations

import numpy as np

from harmonifuse.audio import SAMPLE_RATE


def _coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise whose power falls as 1 / f**exponent (0 white, 1 pink, 2 brown), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n)
    freqs[0] = freqs[1]
    noise = np.fft.irfft(spectrum / freqs ** (exponent / 2), n)
    return noise / np.sqrt(np.mean(noise ** 2))


def _at_dbfs(signal: np.ndarray, dbfs: float) -> np.ndarray:
    """Scale to an RMS level in dB relative to full scale."""
    return signal / np.sqrt(np.mean(signal ** 2) + 1e-20) * 10 ** (dbfs / 20)


def _chord(t: np.ndarray, freqs: list[float], note_seconds: float | None = None) -> np.ndarray:
    """Harmonic tones with a plucked envelope, together (a chord) or one after another (an arpeggio)."""
    out = np.zeros_like(t)
    for k, f in enumerate(freqs):
        start = k * note_seconds if note_seconds else 0.0
        local = np.clip(t - start, 0, None) * (t >= start)
        envelope = np.exp(-3.0 * local) * (t >= start)
        out += envelope * sum(np.sin(2 * np.pi * f * h * t) / h for h in (1, 2, 3))
    return out


def nonspeech_clips(seconds: float = 3.0, seed: int = 0) -> dict[str, np.ndarray]:
    """{name: 16 kHz float32 waveform (S,)}: 22 clips without speech."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    clips: dict[str, np.ndarray] = {}
    for colour, exponent in (("white", 0.0), ("pink", 1.0), ("brown", 2.0)):
        for level in (-15, -30, -45):
            clips[f"{colour} noise {level} dBFS"] = _at_dbfs(_coloured_noise(rng, n, exponent), level)
    clips["tone 440 Hz"] = 0.3 * np.sin(2 * np.pi * 440 * t)
    clips["tone 1 kHz"] = 0.3 * np.sin(2 * np.pi * 1000 * t)
    clips["dual tone 697+1209 Hz"] = 0.2 * (np.sin(2 * np.pi * 697 * t) + np.sin(2 * np.pi * 1209 * t))
    clips["sweep 100 Hz-8 kHz"] = 0.3 * np.sin(2 * np.pi * 100 * seconds / np.log(80) * (80 ** (t / seconds) - 1))
    clips["hum 50 Hz"] = _at_dbfs(sum(np.sin(2 * np.pi * 50 * h * t) / h for h in (1, 2, 3, 4)), -20)
    clips["hum 60 Hz + white noise"] = (_at_dbfs(sum(np.sin(2 * np.pi * 60 * h * t) / h for h in (1, 2, 3)), -20)
                                       + _at_dbfs(rng.standard_normal(n), -40))
    clicks = np.zeros(n)
    clicks[:: SAMPLE_RATE // 4] = 0.8
    clips["clicks 4 per second"] = clicks
    clips["C major chord"] = _at_dbfs(_chord(t, [261.6, 329.6, 392.0]), -18)
    clips["A minor arpeggio"] = _at_dbfs(_chord(t, [220.0, 261.6, 329.6, 440.0], note_seconds=seconds / 4), -18)
    clips["organ chord G7"] = _at_dbfs(sum(np.sin(2 * np.pi * f * t) for f in (196.0, 246.9, 293.7, 349.2)), -18)
    clips["drum-like pulses"] = _at_dbfs(np.sin(2 * np.pi * 80 * t) * np.exp(-20 * (t % 0.5)), -15)
    clips["near-silence -70 dBFS"] = _at_dbfs(rng.standard_normal(n), -70)
    clips["digital silence"] = np.zeros(n)
    return {name: np.clip(wave, -1, 1).astype(np.float32) for name, wave in clips.items()}
