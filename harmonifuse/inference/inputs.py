"""What the model reads: paths, arrays and ``(array, rate)`` pairs made into 16 kHz waveforms.

Every input is validated by :mod:`harmonifuse.audio` (its header first, so an audio bomb is refused
before decoding). An input longer than the encoder's window becomes an
:class:`~harmonifuse.segments.AudioSource`, read in blocks and cut at pauses, never wholly decoded.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from harmonifuse.model import HarmoniFuse
    from harmonifuse.segments import AudioSource

AudioInput = Union[str, os.PathLike, np.ndarray, tuple]


def load_arrays(model: "HarmoniFuse", audio: Sequence[AudioInput]) -> list[np.ndarray]:
    """Paths or arrays -> 16 kHz mono float32 waveforms (S_i,), validated (see harmonifuse/audio.py).

    With voice activity detection on, silent audio is let through: it is answered as no speech."""
    from harmonifuse.audio import SAMPLE_RATE, load_audio, to_mono_16k

    limits = {"max_seconds": model.config.encoder.max_seconds}
    if model.vad is not None:
        limits["silence_threshold"] = 0.0
    waves = []
    for item in audio:
        if isinstance(item, (str, os.PathLike)):
            waves.append(load_audio(item, **limits))
        elif isinstance(item, tuple):
            samples, rate = item
            waves.append(to_mono_16k(np.asarray(samples), rate, **limits))
        else:
            waves.append(to_mono_16k(np.asarray(item), SAMPLE_RATE, **limits))
    return waves


def padded(model: "HarmoniFuse", waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Waveforms (S_i,) -> (B, S) padded and (B,) lengths on the model's device."""
    from harmonifuse.data.batch import pad_waveforms

    batch, lengths = pad_waveforms(waves)
    return batch.to(model.llm.device), lengths.to(model.llm.device)


def load_waveforms(model: "HarmoniFuse", audio: Sequence[AudioInput]) -> tuple[torch.Tensor, torch.Tensor]:
    """Paths or arrays -> (B, S) padded 16 kHz waveforms and (B,) lengths on the model's device."""
    return padded(model, load_arrays(model, audio))


def long_source(model: "HarmoniFuse", item: AudioInput) -> "AudioSource | None":
    """An AudioSource when ``item`` is longer than the encoder's window, else None (also for input
    that cannot be read: the short path reports it with its usual message)."""
    from harmonifuse.audio import SAMPLE_RATE
    from harmonifuse.segments import AudioSource

    limit = model.config.encoder.max_seconds
    try:
        if isinstance(item, (str, os.PathLike)):
            if not os.path.isfile(item):
                return None
            source = AudioSource(item)
        elif isinstance(item, tuple):
            samples, rate = item
            source = AudioSource(samples=np.asarray(samples), rate=rate)
        else:
            source = AudioSource(samples=np.asarray(item), rate=SAMPLE_RATE)
    except Exception:  # noqa: BLE001 - unreadable input takes the short path, which names the problem
        return None
    return source if source.frames > 0 and source.duration > limit else None
