"""Loading and validating audio: every waveform the package uses comes through here.

The model wants one thing: a ``(S,)`` float32 mono waveform at 16 kHz with samples in [-1, 1].
Files and arrays that are not like that are either *converted* (documented, lossless in intent)
or *rejected* with an :class:`AudioError` that names the file and says what to do.

Conversions (silent, always applied):

- multichannel ``(S, C)`` -> mono: the mean of the channels;
- any sample rate -> ``sample_rate`` (16 kHz): resampled with soxr (``"HQ"`` quality);
- integer PCM arrays -> float: divided by the type's full scale (int16: 32768);
- float input whose peak exceeds 1 -> scaled down so the peak is 1 (clipping would distort);
  the tiny overshoot resampling can add is clipped to [-1, 1].

Rejections: missing file, broken symlink or symlink loop, directory, unreadable (permissions), not
audio / corrupt, empty, a header past :class:`HeaderLimits` (sample rate, channels, decoded size:
a few KB of FLAC can declare gigabytes of samples, so this is judged before a sample is decoded),
NaN or inf samples, too short (``min_seconds``), too long (``max_seconds``), silent (peak below
``silence_threshold``). A WAV cut short (its header announces more audio than
the file holds) is read as far as it goes, with a logged warning saying how much is missing.
Durations are judged on the input before resampling.

Training should not die on one bad file among thousands, nor hide them: :class:`BadSamplePolicy`
either re-raises (``"fail"``) or records the file and reason in a :class:`SkipCounter`
(``"skip"``) whose :meth:`SkipCounter.summary` is printed at the end of the run.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "SAMPLE_RATE",
    "AudioError",
    "AudioTooLarge",
    "HeaderLimits",
    "check_header",
    "check_readable",
    "load_audio",
    "to_mono_16k",
    "SkipCounter",
    "BadSamplePolicy",
]

SAMPLE_RATE = 16_000

log = logging.getLogger(__name__)


class AudioError(ValueError):
    """A file or array that cannot be used as speech. The message names the source and the fix."""

    def __init__(self, source: str | os.PathLike, problem: str, fix: str) -> None:
        self.source = str(source)
        self.problem = problem
        self.fix = fix
        super().__init__(f"{self.source}: {problem}; {fix}")


class AudioTooLarge(AudioError):
    """A file whose header declares more than :class:`HeaderLimits` allow; ``limit`` names which
    (``"sample_rate"``, ``"channels"`` or ``"decoded_mb"``)."""

    def __init__(self, source: str | os.PathLike, problem: str, fix: str, limit: str) -> None:
        super().__init__(source, problem, fix)
        self.limit = limit


@dataclass(frozen=True)
class HeaderLimits:
    """What a file's header may declare before any of it is decoded.

    The defaults fit real recordings (studio audio goes to 192 kHz; 7.1 surround has 8 channels)
    and refuse "audio bombs": a small compressed file declaring an absurd rate or channel count,
    whose decoding would take gigabytes. ``max_decoded_mb`` bounds frames x channels x 4 bytes
    (the float32 samples decoding would produce; None: no bound), which is what a long recording
    costs to read even in blocks.
    """

    max_sample_rate: int = 192_000
    max_channels: int = 8
    max_decoded_mb: float | None = None

    def check(self, source: str, sample_rate: int, channels: int, frames: int) -> None:
        """Raise :class:`AudioTooLarge` naming the first limit the header passes."""
        if sample_rate > self.max_sample_rate:
            raise AudioTooLarge(source, f"the header declares a sample rate of {sample_rate:,} Hz, over the limit "
                                        f"of {self.max_sample_rate:,} Hz", "resample it (e.g. ffmpeg -i FILE -ar 16000 "
                                        "out.wav); speech needs no more than 16 kHz", "sample_rate")
        if channels > self.max_channels:
            raise AudioTooLarge(source, f"the header declares {channels} channels, over the limit of "
                                        f"{self.max_channels}", "mix it down (e.g. ffmpeg -i FILE -ac 1 out.wav)",
                                "channels")
        decoded_mb = frames * channels * 4 / 2**20
        if self.max_decoded_mb is not None and decoded_mb > self.max_decoded_mb:
            raise AudioTooLarge(source, f"decoded it would be {decoded_mb:,.0f} MB of samples ({frames:,} frames x "
                                        f"{channels} channels), over the limit of {self.max_decoded_mb:g} MB",
                                "send it in shorter parts, or mixed down to mono at 16 kHz "
                                "(ffmpeg -i FILE -ac 1 -ar 16000 out.flac)", "decoded_mb")


DEFAULT_LIMITS = HeaderLimits()


def check_header(source: str | os.PathLike, info, limits: HeaderLimits = DEFAULT_LIMITS) -> None:
    """Check a ``soundfile.info`` result against ``limits`` (raises :class:`AudioTooLarge`)."""
    limits.check(os.fspath(source), int(info.samplerate), int(info.channels), int(info.frames))


def load_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = 30.0,
    min_seconds: float = 0.1,
    silence_threshold: float = 1e-4,
    limits: HeaderLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """Read an audio file as a ``(S,)`` float32 mono waveform at ``sample_rate``, in [-1, 1].

    Any format libsndfile reads (wav, flac, ogg, ...) is accepted; see the module docstring for
    the conversions applied. ``max_seconds=None`` disables the length limit.

    Raises:
        AudioError: the file is missing, not audio, corrupt, empty, non-finite, silent, too
            short or too long, or its header passes ``limits`` (:class:`AudioTooLarge`). The
            message names the file and what to do about it.
    """
    source = os.fspath(path)
    check_readable(source)
    try:
        info = sf.info(source)
    except (sf.LibsndfileError, RuntimeError) as error:
        raise AudioError(source, f"not a readable audio file ({_reason(error)})",
                         "convert it to WAV or FLAC (e.g. ffmpeg -i FILE out.wav), or remove it from the "
                         "manifest") from error
    if info.frames == 0:
        raise AudioError(source, "audio file contains no samples",
                         "re-extract or re-download it, or remove it from the manifest")
    check_header(source, info, limits)
    _warn_if_truncated(source, info)
    # Reject long files from the header alone, before paying to decode them.
    _check_duration(source, info.frames / info.samplerate, min_seconds, max_seconds)
    try:
        samples, rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as error:
        raise AudioError(source, f"audio file is corrupt or truncated ({_reason(error)})",
                         "re-extract or re-download it, or remove it from the manifest") from error
    return to_mono_16k(samples, rate, source=source, sample_rate=sample_rate,
                       max_seconds=max_seconds, min_seconds=min_seconds,
                       silence_threshold=silence_threshold)


def check_readable(source: str) -> None:
    """Raise an :class:`AudioError` saying why ``source`` cannot be opened as a file: missing, a
    broken symlink or symlink loop, a folder, unreadable (permissions), or empty."""
    if not os.path.exists(source):
        if os.path.islink(source):
            try:
                os.stat(source)
                problem = "is a broken symbolic link"
            except OSError as error:
                problem = ("is a symbolic link loop" if error.errno == errno.ELOOP
                           else f"is a broken symbolic link (to {os.readlink(source)})")
            raise AudioError(source, problem, "point at the real file (`readlink -f` shows where the link leads)")
        raise AudioError(source, "audio file not found",
                         "check the path (manifest paths are relative to the manifest's folder)")
    if os.path.isdir(source):
        raise AudioError(source, "is a directory, not an audio file",
                         "point at an audio file (.wav, .flac, .ogg, .mp3) inside it")
    try:
        with open(source, "rb") as handle:
            empty = not handle.read(1)
    except PermissionError as error:
        raise AudioError(source, "permission denied: this user cannot read the file",
                         "make it readable (chmod a+r FILE) or run as a user who can read it") from error
    except OSError as error:
        raise AudioError(source, f"cannot be opened ({error.strerror or error})",
                         "check the file and the disk it is on") from error
    if empty:
        raise AudioError(source, "audio file is empty (0 bytes)",
                         "re-extract or re-download it, or remove it from the manifest")


def _reason(error: Exception) -> str:
    """libsndfile's reason without the repeated file name: "Error opening 'x.wav': Format not
    recognised." -> "Format not recognised"."""
    text = str(error)
    if ": " in text and text.startswith("Error opening"):
        text = text.split(": ", 1)[1]
    return text.strip().rstrip(".")


def _warn_if_truncated(source: str, info) -> None:
    """A WAV whose header promises more audio than the file holds (an interrupted copy or
    recording): libsndfile reads what is there; say so, since the end of the recording is missing."""
    if info.format not in ("WAV", "WAVEX"):
        return
    try:
        with open(source, "rb") as handle:
            head = handle.read(1 << 16)
        size = os.path.getsize(source)
    except OSError:
        return
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    position = 12
    while position + 8 <= len(head):
        chunk, length = head[position:position + 4], int.from_bytes(head[position + 4:position + 8], "little")
        if chunk == b"data":
            present = size - (position + 8)
            if length != 0xFFFFFFFF and present < length:
                missing = (length - present) * info.frames / max(1, present) / info.samplerate
                log.warning("%s: the file is truncated: its header announces %d bytes of audio, %d are present "
                            "(about %.2f s of the recording is missing); the part present is used. Re-copy or "
                            "re-export the file if the end matters", source, length, present,
                            missing)
            return
        position += 8 + length + (length & 1)


def to_mono_16k(
    samples: np.ndarray,
    rate: int,
    *,
    source: str = "<array>",
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = 30.0,
    min_seconds: float = 0.1,
    silence_threshold: float = 1e-4,
) -> np.ndarray:
    """Validate and convert an in-memory waveform exactly as :func:`load_audio` does a file.

    Args:
        samples: ``(S,)`` mono or ``(S, C)`` channels-last, float or integer PCM.
        rate: its sample rate in Hz.
        source: how to name it in error messages (a path, an utterance id).

    Returns:
        ``(S',)`` float32 in [-1, 1] at ``sample_rate``, ``S' ~= S * sample_rate / rate``.
    """
    samples = np.asarray(samples)
    if not (isinstance(rate, (int, np.integer)) and rate > 0):
        raise AudioError(source, f"sample rate must be a positive integer, got {rate!r}",
                         "pass the rate the samples were recorded at")
    if samples.ndim not in (1, 2):
        raise AudioError(source, f"expected shape (S,) or (S, C), got {samples.shape}",
                         "pass one waveform, channels last")
    if samples.ndim == 2 and samples.shape[1] > samples.shape[0]:
        raise AudioError(source, f"shape {samples.shape} has more channels than samples",
                         "channels must be last: pass samples.T")
    if samples.size == 0:
        raise AudioError(source, "audio contains no samples", "remove it from the data")
    samples = _as_float(samples, source)
    finite = np.isfinite(samples)
    if not finite.all():
        first = int(np.argwhere(~finite)[0][0])
        raise AudioError(source, f"{int((~finite).sum())} NaN/inf samples (first at "
                                 f"{first / rate:.3f} s)", "re-export or remove the file")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    _check_duration(source, samples.shape[0] / rate, min_seconds, max_seconds)
    peak = float(np.abs(samples).max())
    if peak < silence_threshold:
        raise AudioError(source, f"audio is silent (peak {peak:.2e} < silence_threshold "
                                 f"{silence_threshold:g})",
                         "remove it from the data, or lower `silence_threshold` if it is very quiet speech")
    if peak > 1.0:
        samples = samples / peak
    if rate != sample_rate:
        samples = soxr.resample(samples, rate, sample_rate, quality="HQ")
    return np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False)


def _as_float(samples: np.ndarray, source: str) -> np.ndarray:
    """Integer PCM -> float by full scale; floats pass through as float32 (float64 kept for accuracy)."""
    if np.issubdtype(samples.dtype, np.floating):
        return samples.astype(np.float64 if samples.dtype == np.float64 else np.float32, copy=False)
    if np.issubdtype(samples.dtype, np.signedinteger):
        return samples.astype(np.float64) / float(-np.iinfo(samples.dtype).min)
    if samples.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
        return (samples.astype(np.float64) - 128.0) / 128.0
    raise AudioError(source, f"unsupported sample type {samples.dtype}",
                     "pass float or signed integer PCM samples")


def _check_duration(source: str, seconds: float, min_seconds: float, max_seconds: float | None) -> None:
    if seconds < min_seconds:
        raise AudioError(source, f"audio is too short ({seconds:.3f} s < min_seconds {min_seconds:g} s): too "
                                 "short to hold a word", "check that the file was written completely, or remove it")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(source, f"audio is too long ({seconds:.2f} s > max_seconds {max_seconds:g} s)",
                         "raise `max_seconds` in the data config (null disables the limit), "
                         "or cut the recording into shorter utterances")


@dataclass
class SkipCounter:
    """Which samples were skipped and why: ``reasons`` holds ``(source, reason)`` pairs."""

    reasons: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.reasons)

    def record(self, source: str, reason: str) -> None:
        self.reasons.append((source, reason))

    def summary(self, limit: int = 10) -> str:
        """One line per skipped sample (the first ``limit``), or a note that none were skipped."""
        if not self.reasons:
            return "no samples skipped"
        lines = [f"skipped {self.count} bad sample(s):"]
        lines += [f"  {reason}" for _, reason in self.reasons[:limit]]
        if self.count > limit:
            lines.append(f"  ... and {self.count - limit} more")
        return "\n".join(lines)


class BadSamplePolicy:
    """What to do with an :class:`AudioError`: ``"fail"`` re-raises, ``"skip"`` records and goes on.

    With ``max_skips`` set, skipping more than that many raises anyway: a corpus where most files
    are bad is a broken setup, not noise to ride through.

    Note: a counter lives in one process; DataLoader workers each count their own skips.
    """

    def __init__(self, policy: Literal["skip", "fail"] = "skip", *,
                 counter: SkipCounter | None = None, max_skips: int | None = None) -> None:
        if policy not in ("skip", "fail"):
            raise ValueError(f"bad-sample policy must be 'skip' or 'fail', got {policy!r}")
        self.policy = policy
        self.counter = counter if counter is not None else SkipCounter()
        self.max_skips = max_skips

    def handle(self, source: str | os.PathLike, error: AudioError) -> None:
        """Re-raise ``error`` under "fail"; otherwise record it (and raise past ``max_skips``)."""
        if self.policy == "fail":
            raise error
        self.counter.record(os.fspath(source), str(error))
        log.warning("skipping bad sample: %s", error)
        if self.max_skips is not None and self.counter.count > self.max_skips:
            raise AudioError(source, f"more than max_skips={self.max_skips} bad samples",
                             "fix the data (see the skipped files above) or raise `max_skips`") from error

    def load(self, path: str | os.PathLike, **kwargs) -> np.ndarray | None:
        """:func:`load_audio` under this policy: ``None`` for a skipped file."""
        try:
            return load_audio(path, **kwargs)
        except AudioError as error:
            self.handle(path, error)
            return None
