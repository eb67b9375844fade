"""Recordings of any length: read in blocks, cut at pauses, answered segment by segment.

A recording longer than the encoder's window (``model.encoder.max_seconds``) is never cut
silently at 30 s. It is read in blocks (memory stays bounded whatever its length), the voice
activity detector marks where speech is, and the speech is cut into segments:

- at pauses of at least ``min_silence`` seconds (0.5 s: a comma's pause inside a sentence stays in
  it; Silero VAD's own segmentation);
- a segment still longer than ``max_seconds`` is cut at its quietest point (the window with the
  lowest speech probability), again and again until every piece fits;
- a segment shorter than ``min_seconds`` joins its neighbour across a short gap.

Each segment is then read back from the source (a seek, not the whole file) and answered like a
short recording. Segment times are in seconds from the start of the recording.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr

from harmonifuse.audio import DEFAULT_LIMITS, SAMPLE_RATE, AudioError, HeaderLimits, check_header, to_mono_16k
from harmonifuse.cancellation import checkpoint
from harmonifuse.modules.vad import WINDOW

WINDOW_SECONDS = WINDOW / SAMPLE_RATE


@dataclass(frozen=True)
class Segment:
    """A stretch of a recording, in seconds."""

    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


class AudioSource:
    """A recording read in pieces: 16 kHz mono blocks in order, or any stretch by seeking.

    ``path``: an audio file (read with soundfile, never wholly in memory; its header checked
    against ``limits`` first), or ``samples`` (S,) or (S, C) with their ``rate`` (already in memory).
    """

    def __init__(self, path: str | os.PathLike | None = None, samples: np.ndarray | None = None,
                 rate: int | None = None, limits: HeaderLimits = DEFAULT_LIMITS) -> None:
        self.path = None if path is None else os.fspath(path)
        self.samples = samples
        if self.path is not None:
            try:
                info = sf.info(self.path)
            except (sf.LibsndfileError, RuntimeError) as error:
                raise AudioError(self.path, f"not a readable audio file ({error})",
                                 "convert it to WAV or FLAC") from error
            check_header(self.path, info, limits)
            self.rate, self.frames = info.samplerate, info.frames
        else:
            self.rate, self.frames = int(rate), len(samples)
        self.name = self.path or "<array>"

    @property
    def duration(self) -> float:
        return self.frames / self.rate

    def _frames(self, start: int, stop: int) -> np.ndarray:
        """Original-rate frames [start, stop) as float32 (S,) or (S, C)."""
        if self.path is None:
            return np.asarray(self.samples[start:stop])
        try:
            with sf.SoundFile(self.path) as f:
                f.seek(start)
                return f.read(stop - start, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as error:
            raise AudioError(self.path, f"audio file is corrupt or truncated near {start / self.rate:.1f} s ({error})",
                             "re-export the file") from error

    def blocks(self, seconds: float = 30.0) -> Iterator[np.ndarray]:
        """16 kHz mono float32 blocks of about ``seconds`` each, in order (a streaming resampler)."""
        size = int(seconds * self.rate)
        resampler = None if self.rate == SAMPLE_RATE else soxr.ResampleStream(self.rate, SAMPLE_RATE, 1,
                                                                                dtype="float32")
        position = 0
        while position < self.frames:
            checkpoint()  # between blocks: work nobody waits for any more stops here
            stop = min(self.frames, position + size)
            block = self._frames(position, stop)
            position = stop
            mono = _mono(block, self.name, position / self.rate)
            if resampler is not None:
                mono = resampler.resample_chunk(mono, last=position >= self.frames)
            yield np.clip(mono, -1.0, 1.0)

    def read(self, segment: Segment) -> np.ndarray:
        """One segment as a 16 kHz mono waveform (S,), validated as any short recording."""
        start = int(round(segment.start * self.rate))
        stop = min(self.frames, int(round(segment.end * self.rate)))
        return to_mono_16k(self._frames(start, stop), self.rate,
                           source=f"{self.name} [{segment.start:.2f}-{segment.end:.2f} s]",
                           max_seconds=None, min_seconds=0.0, silence_threshold=0.0)


def _mono(block: np.ndarray, name: str, at: float) -> np.ndarray:
    block = np.asarray(block, dtype=np.float32)
    if not np.isfinite(block).all():
        raise AudioError(name, f"NaN/inf samples before {at:.1f} s", "re-export or remove the file")
    return block.mean(axis=1) if block.ndim == 2 else block


def speech_probabilities(source: AudioSource, vad, *, block_seconds: float = 30.0, streams: int = 16,
                         progress=None) -> np.ndarray:
    """The detector's speech probability per 32 ms window over the whole recording (n_windows,).

    Blocks run side by side as independent streams, ``streams`` at a time (the detector's state
    restarts at each block; it needs well under a second of context), so a long recording costs
    few detector calls and at most ``streams`` blocks of memory."""
    probs: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    # whole windows per block, so that window k of the recording is window k of the concatenation
    samples_per_block = int(block_seconds * SAMPLE_RATE) // WINDOW * WINDOW
    carry = np.zeros(0, dtype=np.float32)
    for block in source.blocks(block_seconds):
        carry = np.concatenate([carry, block])
        while len(carry) >= samples_per_block:
            pending.append(carry[:samples_per_block])
            carry = carry[samples_per_block:]
            if len(pending) == streams:
                probs += vad.speech_probabilities(pending)
                if progress is not None:
                    progress.update(len(pending) * samples_per_block / SAMPLE_RATE)
                pending = []
    if len(carry):
        pending.append(carry)
    if pending:
        probs += vad.speech_probabilities(pending)
        if progress is not None:
            progress.update(sum(len(p) for p in pending) / SAMPLE_RATE)
    return np.concatenate(probs) if probs else np.zeros(0, dtype=np.float32)


def split_at_pauses(probs: np.ndarray, *, duration: float, threshold: float = 0.5, max_seconds: float = 30.0,
                    min_seconds: float = 1.0, min_silence: float = 0.5, pad: float = 0.1,
                    min_speech: float = 0.25) -> list[Segment]:
    """Speech segments from per-window speech probabilities (n,), each at most ``max_seconds`` long."""
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    stamps = get_speech_timestamps_from_probs(
        list(map(float, probs)), sampling_rate=SAMPLE_RATE, threshold=threshold,
        min_speech_duration_ms=int(min_speech * 1000), min_silence_duration_ms=int(min_silence * 1000),
        speech_pad_ms=int(pad * 1000), audio_length_samples=int(round(duration * SAMPLE_RATE)))
    segments = [Segment(s["start"] / SAMPLE_RATE, min(duration, s["end"] / SAMPLE_RATE)) for s in stamps]
    fitted = [piece for segment in segments for piece in _cut_to_fit(segment, probs, max_seconds)]
    return _merge_short(fitted, min_seconds, max_seconds, max_gap=1.0)


def _cut_to_fit(segment: Segment, probs: np.ndarray, max_seconds: float) -> list[Segment]:
    """Cut at the window of lowest speech probability, keeping both sides at least a quarter of
    the limit long, until every piece is at most ``max_seconds``."""
    if segment.duration <= max_seconds:
        return [segment]
    margin = max_seconds / 4
    first = int((segment.start + margin) / WINDOW_SECONDS)
    last = int(min(segment.end - margin, segment.start + max_seconds) / WINDOW_SECONDS)
    window = first + int(np.argmin(probs[first:last + 1])) if last > first else first
    cut = (window + 0.5) * WINDOW_SECONDS
    return (_cut_to_fit(Segment(segment.start, cut), probs, max_seconds)
            + _cut_to_fit(Segment(cut, segment.end), probs, max_seconds))


def _merge_short(segments: list[Segment], min_seconds: float, max_seconds: float, max_gap: float) -> list[Segment]:
    """Join a segment shorter than ``min_seconds`` to its nearer neighbour when the gap is at most
    ``max_gap`` and the joined segment fits."""
    merged = list(segments)
    i = 0
    while i < len(merged):
        short = merged[i]
        if short.duration >= min_seconds:
            i += 1
            continue
        options = []
        if i > 0 and short.start - merged[i - 1].end <= max_gap and short.end - merged[i - 1].start <= max_seconds:
            options.append((short.start - merged[i - 1].end, i - 1))
        if (i + 1 < len(merged) and merged[i + 1].start - short.end <= max_gap
                and merged[i + 1].end - short.start <= max_seconds):
            options.append((merged[i + 1].start - short.end, i + 1))
        if not options:
            i += 1
            continue
        _, j = min(options)
        a, b = sorted((i, j))
        merged[a:b + 1] = [Segment(merged[a].start, merged[b].end)]
        i = a
    return merged


def combine(segment_results: list[dict], segments: list[Segment], labels: list[str]) -> dict:
    """One answer for the recording from its segments' answers.

    The transcript joins the segments' transcripts; its confidence and the emotion probabilities
    are means weighted by each segment's duration (no-speech segments carry no emotion)."""
    spoken = [(r, s) for r, s in zip(segment_results, segments) if not r.get("no_speech")]
    answer: dict = {"no_speech": not spoken}
    if segment_results and "transcript" in segment_results[0]:
        answer["transcript"] = " ".join(r["transcript"] for r, _ in spoken if r["transcript"]).strip()
        weights = np.array([s.duration for _, s in spoken])
        answer["transcript_confidence"] = (round(float(np.average([r["transcript_confidence"] for r, _ in spoken],
                                                                  weights=weights)), 4) if spoken else 1.0)
    if segment_results and "emotion" in segment_results[0]:
        if spoken:
            weights = np.array([s.duration for _, s in spoken])
            probs = np.average([[r["emotion_probs"][k] for k in labels] for r, _ in spoken], axis=0, weights=weights)
            best = int(np.argmax(probs))
            answer.update(emotion=labels[best], emotion_confidence=round(float(probs[best]), 6),
                          emotion_probs={k: round(float(p), 6) for k, p in zip(labels, probs)})
        else:
            answer.update(emotion=None, emotion_confidence=None, emotion_probs=None)
    answer["segments"] = [{"start": round(s.start, 3), "end": round(s.end, 3), **r}
                          for r, s in zip(segment_results, segments)]
    return answer
