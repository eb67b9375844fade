"""One batching plan for every entry point (Python API, CLI, evaluation, benchmarks): inputs in
windows of consecutive items, each window cut into batches of similar duration, so memory stays
flat in the number of inputs and a short clip is never padded to a long one's length."""
from __future__ import annotations

import os

import numpy as np


def duration_batches(durations: list[float], batch_size: int, window_batches: int = 8) -> list[list[list[int]]]:
    """Indices in windows of ``batch_size * window_batches`` consecutive items, each window cut into
    batches of similar duration: a short clip batched with a long one would be padded to its length
    through the encoder and the LLM. Windows keep results flowing out in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    window = batch_size * window_batches
    plan = []
    for start in range(0, len(durations), window):
        index = sorted(range(start, min(start + window, len(durations))), key=lambda i: durations[i])
        plan.append([index[i:i + batch_size] for i in range(0, len(index), batch_size)])
    return plan


def header_duration(path: str | os.PathLike) -> float:
    """Seconds from an audio file's header (0 when unusable: decoding reports the error later)."""
    import soundfile as sf

    try:
        info = sf.info(os.fspath(path))
    except Exception:  # noqa: BLE001 - any unreadable file: the decoder names the problem
        return 0.0
    return info.frames / info.samplerate if info.samplerate > 0 else 0.0


def input_duration(item, sample_rate: int = 16_000) -> float:
    """Seconds of one input of ``HarmoniFuse.analyze`` (a path, an array, or an (array, rate) pair),
    without decoding a file; 0 when it cannot be told (the decoder reports the problem later)."""
    if isinstance(item, (str, os.PathLike)):
        return header_duration(item)
    if isinstance(item, tuple) and len(item) == 2:
        samples, rate = item
        return len(np.asarray(samples)) / float(rate) if rate else 0.0
    return len(np.asarray(item)) / sample_rate
