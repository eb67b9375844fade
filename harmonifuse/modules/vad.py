"""Voice activity detection: Silero VAD, whose weights ship inside its PyPI wheel (offline).

A speech LLM asked to transcribe noise writes a sentence anyway; the detector decides first
whether a recording holds speech at all, and where (the segments long recordings are cut at).
"""
from __future__ import annotations

import numpy as np
import torch

from harmonifuse.audio import SAMPLE_RATE

WINDOW = 512
"""Samples per decision at 16 kHz (32 ms), the window Silero VAD is trained on."""


def _load_silero():
    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad
    except ImportError as error:  # pragma: no cover - the package is a dependency
        raise ImportError("voice activity detection needs the silero-vad package: pip install silero-vad "
                          "(not its [audio] extras), or set model.vad.enabled=false") from error
    finally:
        torch.set_num_threads(threads)  # importing silero_vad sets one thread for the whole process
    return load_silero_vad()


class SileroVAD:
    """Speech probabilities per 32 ms window, and whether a waveform holds speech.

    Args:
        threshold: a window with a speech probability above it counts as speech.
        min_speech_seconds: a waveform with less speech than this holds none.
    """

    def __init__(self, threshold: float = 0.5, min_speech_seconds: float = 0.25) -> None:
        self.threshold = threshold
        self.min_speech_seconds = min_speech_seconds
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = _load_silero()
        return self._model

    @torch.no_grad()
    def speech_probabilities(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        """16 kHz mono waveforms (S_i,) -> per waveform its speech probability per window (ceil(S_i / 512),).

        The waveforms run side by side as one batch of streams (the detector is recurrent over windows)."""
        if not waveforms:
            return []
        counts = [max(1, -(-len(w) // WINDOW)) for w in waveforms]
        frames = np.zeros((len(waveforms), max(counts) * WINDOW), dtype=np.float32)
        for i, wave in enumerate(waveforms):
            frames[i, : len(wave)] = wave
        batch = torch.from_numpy(frames).view(len(waveforms), -1, WINDOW)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # thousands of tiny calls: a second thread only adds waiting (10x on a busy machine)
        try:
            self.model.reset_states()
            with torch.autocast("cpu", enabled=False):  # the TorchScript model takes float32 only
                probs = torch.stack([self.model(batch[:, k], SAMPLE_RATE).reshape(-1)
                                     for k in range(batch.shape[1])], dim=1)
        finally:
            torch.set_num_threads(threads)
        return [row[:n].numpy() for row, n in zip(probs, counts)]

    def speech_seconds(self, waveforms: list[np.ndarray]) -> list[float]:
        """Seconds of speech in each waveform."""
        return [float((p > self.threshold).sum()) * WINDOW / SAMPLE_RATE for p in self.speech_probabilities(waveforms)]

    def has_speech(self, waveforms: list[np.ndarray]) -> list[bool]:
        return [s >= self.min_speech_seconds for s in self.speech_seconds(waveforms)]
