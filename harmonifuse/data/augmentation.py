"""Acoustic augmentation of training waveforms, on the fly: training sound closer to real recordings.

The built-in corpus is clean synthetic speech at one microphone distance. Real recordings are
read at other speeds, in rooms, over noise and other talkers, through telephone bands and lossy
codecs, at any level. Each of those is a transform here; :class:`WaveAugment` applies a list of
them, each with its own probability, to one utterance:

- :class:`SpeedPerturb`: resampling by a factor (0.9 / 1.0 / 1.1 by default: Kaldi-style speed
  perturbation, duration x 1/factor, pitch and formants x factor);
- :class:`Reverb`: convolution with a simulated room impulse response (a direct path, then
  exponentially decaying noise with a random RT60 and direct-to-reverberant ratio);
- :class:`AddNoise`: white, pink or brown noise or babble (a sum of other training utterances,
  :class:`Babble`) at a random SNR;
- :class:`BandLimit`: a Butterworth band pass (telephone 300-3400 Hz by default);
- :class:`CodecRoundTrip`: encode and decode with a lossy codec libsndfile writes (Ogg Vorbis,
  Ogg Opus, MP3; GSM 6.10 and mu-law at 8 kHz, telephone codecs);
- :class:`Gain`: a level change, with hard clipping where it overdrives.

Every transform takes and returns a ``(S,)`` float32 waveform at 16 kHz and draws only from the
``numpy.random.Generator`` it is given. :class:`WaveAugment` gives each transform its own
generator, seeded from (seed, stage, epoch, step within the epoch, utterance id, transform), so a
resumed run draws exactly what the interrupted one would have, a data-loader worker or another
rank holding the same item draws the same, the next step draws anew, and switching one transform
off leaves the others' draws unchanged (the same scheme as :mod:`harmonifuse.data.prompt_choice`).

Where it runs: :class:`~harmonifuse.data.dataset.MultiTaskLoader` applies it to the waveform
items of training batches (in its worker processes when it has any); cached encoder features
(a frozen encoder) cannot be augmented, so the run config refuses the combination.
"""
from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "AddNoise",
    "Babble",
    "BandLimit",
    "CODECS",
    "CodecRoundTrip",
    "Gain",
    "NOISE_KINDS",
    "Reverb",
    "SpeedPerturb",
    "Transform",
    "WaveAugment",
    "available_codecs",
    "mix_at_snr",
]

SAMPLE_RATE = 16_000


class Transform(Protocol):
    """A waveform transform: ``(S,)`` float32 at 16 kHz in, ``(S',)`` float32 out."""

    name: str

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


def _power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0


def _draw(bounds: Sequence[float], rng: np.random.Generator) -> float:
    low, high = bounds
    return float(low) if low == high else float(rng.uniform(low, high))


# --------------------------------------------------------------------------- speed


@dataclass(frozen=True)
class SpeedPerturb:
    """Play the utterance ``factor`` times faster by resampling (soxr): 1.1 shortens it by 1/1.1
    and raises pitch and formants by 10%, as Kaldi's speed perturbation does."""

    factors: tuple[float, ...] = (0.9, 1.0, 1.1)
    sample_rate: int = SAMPLE_RATE
    name: str = "speed"

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        factor = float(self.factors[int(rng.integers(len(self.factors)))])
        if factor == 1.0:
            return wave
        # read as if recorded at rate * factor, written at rate: len / factor samples
        return soxr.resample(np.asarray(wave, dtype=np.float32), self.sample_rate * factor,
                             self.sample_rate).astype(np.float32)


# --------------------------------------------------------------------------- reverberation


@dataclass(frozen=True)
class Reverb:
    """Convolution with a simulated room impulse response; the length and the RMS level are kept.

    The response is a unit direct path, a pre-delay of 1-10 ms (the first reflections), then a tail
    of Gaussian noise whose amplitude falls by 60 dB in ``rt60`` seconds (drawn from the range),
    scaled to a direct-to-reverberant energy ratio drawn from ``drr_db``. The tail ends at
    ``rt60``; what it would ring past the end of the utterance is cut.
    """

    rt60: tuple[float, float] = (0.2, 0.9)
    drr_db: tuple[float, float] = (0.0, 12.0)
    sample_rate: int = SAMPLE_RATE
    name: str = "reverb"

    def impulse_response(self, rng: np.random.Generator) -> np.ndarray:
        rt60 = _draw(self.rt60, rng)
        drr = _draw(self.drr_db, rng)
        delay = max(1, int(rng.uniform(0.001, 0.010) * self.sample_rate))
        n = max(1, int(rt60 * self.sample_rate))
        decay = np.exp(-np.log(1000.0) * np.arange(n) / (rt60 * self.sample_rate))  # -60 dB at rt60
        tail = rng.standard_normal(n) * decay
        tail *= np.sqrt(10 ** (-drr / 10) / np.sum(tail ** 2))  # direct path energy 1
        response = np.zeros(delay + n)
        response[0] = 1.0
        response[delay:] += tail
        return response

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from scipy.signal import fftconvolve

        x = np.asarray(wave, dtype=np.float64)
        wet = fftconvolve(x, self.impulse_response(rng))[: x.size]
        before, after = _power(x), _power(wet)
        if after > 0:
            wet *= np.sqrt(before / after)
        return wet.astype(np.float32)


# --------------------------------------------------------------------------- noise

NOISE_KINDS = ("white", "pink", "brown", "babble")


def _coloured_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """White, pink (1/f power) or brown (1/f^2 power) Gaussian noise, shaped in the frequency domain."""
    white = rng.standard_normal(n)
    if kind == "white" or n < 4:
        return white
    spectrum = np.fft.rfft(white)
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    freqs[0] = freqs[1]
    exponent = {"pink": 0.5, "brown": 1.0}[kind]
    return np.fft.irfft(spectrum / freqs ** exponent, n)


def mix_at_snr(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``wave`` plus ``noise`` scaled so that mean power(wave) / mean power(noise) = ``snr_db``.

    Powers are means over the whole utterance, pauses included. Should the mix exceed 0.99 in
    absolute value, the whole mix is scaled down: the SNR stays what was asked.
    """
    x = np.asarray(wave, dtype=np.float64)
    noise = np.asarray(noise, dtype=np.float64)[: x.size]
    signal_power, noise_power = _power(x), _power(noise)
    if signal_power == 0 or noise_power == 0:
        return x.astype(np.float32)
    mixed = x + noise * np.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    peak = float(np.max(np.abs(mixed)))
    if peak > 0.99:
        mixed *= 0.99 / peak
    return mixed.astype(np.float32)


class Babble:
    """Babble noise: the sum of ``talkers`` utterances (at equal level) drawn from ``sources``.

    Args:
        sources: audio file paths (read with :func:`harmonifuse.audio.load_audio`) or waveforms,
            e.g. the training utterances. Each talker starts at a random point and loops to the
            length asked for.
        talkers: (fewest, most) talkers, drawn uniformly.
    """

    def __init__(self, sources: Sequence[str | np.ndarray], talkers: tuple[int, int] = (3, 7), *,
                 sample_rate: int = SAMPLE_RATE, max_seconds: float | None = 30.0) -> None:
        if not sources:
            raise ValueError("babble needs at least one source utterance")
        if not 1 <= talkers[0] <= talkers[1]:
            raise ValueError(f"talkers must be (fewest, most) with 1 <= fewest <= most, got {talkers}")
        self.sources = list(sources)
        self.talkers = (int(talkers[0]), int(talkers[1]))
        self.sample_rate = sample_rate
        self.max_seconds = max_seconds

    def _talker(self, rng: np.random.Generator) -> np.ndarray | None:
        source = self.sources[int(rng.integers(len(self.sources)))]
        if isinstance(source, np.ndarray):
            return np.asarray(source, dtype=np.float64)
        from harmonifuse.audio import AudioError, load_audio

        try:
            return load_audio(source, sample_rate=self.sample_rate, max_seconds=self.max_seconds).astype(np.float64)
        except AudioError:
            return None  # a bad file is no talker; the others still babble

    def __call__(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` samples of babble (zeros if no source could be read)."""
        out = np.zeros(n)
        count = int(rng.integers(self.talkers[0], self.talkers[1] + 1))
        for _ in range(count):
            talker = self._talker(rng)
            if talker is None or talker.size == 0 or _power(talker) == 0:
                continue
            talker = talker / np.sqrt(_power(talker))
            looped = np.resize(talker, n + talker.size)  # repeats the utterance end to end
            start = int(rng.integers(talker.size))
            out += looped[start:start + n]
        return out


@dataclass(frozen=True)
class AddNoise:
    """Additive noise at an SNR drawn from ``snr_db`` (see :func:`mix_at_snr`); its kind is drawn
    from ``kinds`` ("babble" needs a :class:`Babble` source)."""

    snr_db: tuple[float, float] = (0.0, 30.0)
    kinds: tuple[str, ...] = ("white", "pink", "brown")
    babble: Babble | None = None
    name: str = "noise"

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(NOISE_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"noise kinds must be some of {list(NOISE_KINDS)}, got {list(self.kinds)}")
        if "babble" in self.kinds and self.babble is None:
            raise ValueError("noise kind 'babble' needs a Babble source (other utterances)")

    def noise(self, kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.babble(n, rng) if kind == "babble" else _coloured_noise(kind, n, rng)

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        snr = _draw(self.snr_db, rng)
        return mix_at_snr(wave, self.noise(kind, len(wave), rng), snr)


# --------------------------------------------------------------------------- band limiting


@dataclass(frozen=True)
class BandLimit:
    """A causal Butterworth filter (as a channel would be) to one of ``bands`` (low, high) in Hz,
    drawn uniformly: a band pass, or a low pass when low is 0. The default is the telephone band."""

    bands: tuple[tuple[float, float], ...] = ((300.0, 3400.0),)
    order: int = 8
    sample_rate: int = SAMPLE_RATE
    name: str = "band"

    def __post_init__(self) -> None:
        nyquist = self.sample_rate / 2
        for low, high in self.bands:
            if not 0 <= low < high < nyquist:
                raise ValueError(f"band ({low}, {high}) Hz: need 0 <= low < high < {nyquist:g}")

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from scipy.signal import butter, sosfilt

        low, high = self.bands[int(rng.integers(len(self.bands)))]
        if low > 0:
            sos = butter(self.order, [low, high], btype="bandpass", fs=self.sample_rate, output="sos")
        else:
            sos = butter(self.order, high, btype="lowpass", fs=self.sample_rate, output="sos")
        return sosfilt(sos, np.asarray(wave, dtype=np.float64)).astype(np.float32)


# --------------------------------------------------------------------------- codecs

CODECS: dict[str, tuple[str, str, int]] = {
    "vorbis": ("OGG", "VORBIS", 16_000),
    "opus": ("OGG", "OPUS", 16_000),
    "mp3": ("MP3", "MPEG_LAYER_III", 16_000),
    "gsm": ("WAV", "GSM610", 8_000),
    "ulaw": ("WAV", "ULAW", 8_000),
}
"""Codec name -> (libsndfile format, subtype, the rate it is run at). GSM 6.10 and mu-law are
telephone codecs: the audio goes through them at 8 kHz (band limited to 4 kHz on the way)."""
_COMPRESSED = {"vorbis", "opus", "mp3"}  # take a compression level
MAX_COMPRESSION = 0.95
"""libsndfile refuses MP3 at compression level 1.0 (checked with libsndfile 1.2.2)."""


def available_codecs() -> list[str]:
    """The :data:`CODECS` this libsndfile can write."""
    formats = sf.available_formats()
    return [name for name, (fmt, subtype, _) in CODECS.items()
            if fmt in formats and subtype in sf.available_subtypes(fmt)]


def codec_round_trip(wave: np.ndarray, codec: str, compression: float = 0.5, *,
                     sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Encode ``wave`` with ``codec`` in memory and decode it: float32 at ``sample_rate``, its length
    as the decoder returns it (equal for the Ogg codecs and MP3 here; GSM pads to a 320-sample frame)."""
    fmt, subtype, rate = CODECS[codec]
    x = np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0)
    if rate != sample_rate:
        x = soxr.resample(x, sample_rate, rate)
    buffer = io.BytesIO()
    options = {"compression_level": float(compression)} if codec in _COMPRESSED else {}
    sf.write(buffer, x, rate, format=fmt, subtype=subtype, **options)
    buffer.seek(0)
    decoded, decoded_rate = sf.read(buffer, dtype="float32")
    if decoded.ndim > 1:
        decoded = decoded.mean(axis=1)
    if decoded_rate != sample_rate:
        decoded = soxr.resample(decoded, decoded_rate, sample_rate)
    return np.asarray(decoded, dtype=np.float32)


@dataclass(frozen=True)
class CodecRoundTrip:
    """A lossy codec round trip, in memory: a codec drawn from ``codecs`` at a compression level
    drawn from ``compression`` (0 = best quality, 0.95 = smallest file; Opus at 0.95 is about
    6 kbit/s). The output is cut or zero padded to the input's length."""

    codecs: tuple[str, ...] = ("vorbis", "opus", "mp3")
    compression: tuple[float, float] = (0.3, 0.9)
    sample_rate: int = SAMPLE_RATE
    name: str = "codec"

    def __post_init__(self) -> None:
        missing = [c for c in self.codecs if c not in available_codecs()]
        if missing or not self.codecs:
            raise ValueError(f"codecs {missing or list(self.codecs)} are not available; this libsndfile "
                             f"writes {available_codecs()}")
        low, high = self.compression
        if not 0 <= low <= high <= MAX_COMPRESSION:
            raise ValueError(f"compression must be (low, high) with 0 <= low <= high <= {MAX_COMPRESSION}")

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        codec = self.codecs[int(rng.integers(len(self.codecs)))]
        level = _draw(self.compression, rng)
        decoded = codec_round_trip(wave, codec, level, sample_rate=self.sample_rate)
        out = np.zeros(len(wave), dtype=np.float32)
        out[: min(len(wave), decoded.size)] = decoded[: len(wave)]
        return out


# --------------------------------------------------------------------------- level


@dataclass(frozen=True)
class Gain:
    """A level change by a gain drawn from ``db``; with ``clip``, samples beyond +-1 are clipped
    (an overdriven input), otherwise left as they are."""

    db: tuple[float, float] = (-15.0, 10.0)
    clip: bool = True
    name: str = "gain"

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = np.asarray(wave, dtype=np.float32) * np.float32(10 ** (_draw(self.db, rng) / 20))
        return np.clip(out, -1.0, 1.0) if self.clip else out


# --------------------------------------------------------------------------- composition


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


@dataclass
class WaveAugment:
    """Applies ``steps`` -- (transform, probability) pairs -- in order to one utterance.

    Args:
        steps: the transforms and the probability with which each is applied to an item.
        seed: the run's seed.
        max_samples: cut the result to this many samples (speed 0.9 lengthens an utterance;
            keep it within what the encoder takes). None: no limit.
    """

    steps: list[tuple[Transform, float]] = field(default_factory=list)
    seed: int = 0
    max_samples: int | None = None

    def __post_init__(self) -> None:
        for transform, p in self.steps:
            if not 0 <= p <= 1:
                raise ValueError(f"probability of {transform.name!r} must be in [0, 1], got {p}")
        self._names = []
        counts: dict[str, int] = {}
        for transform, _ in self.steps:  # a transform used twice gets a second stream
            counts[transform.name] = counts.get(transform.name, 0) + 1
            self._names.append(transform.name if counts[transform.name] == 1
                               else f"{transform.name}#{counts[transform.name]}")

    def __bool__(self) -> bool:
        return any(p > 0 for _, p in self.steps)

    def generator(self, name: str, item_id: str, *, step: int, epoch: int = 0,
                  stage: str = "main") -> np.random.Generator:
        """The generator transform ``name`` draws from for this item at this step."""
        return np.random.default_rng([self.seed, _key(stage), epoch, step, _key(item_id), _key(name)])

    def __call__(self, wave: np.ndarray, *, item_id: str, step: int, epoch: int = 0,
                 stage: str = "main") -> np.ndarray:
        """The augmented ``(S',)`` float32 waveform (the input itself when nothing applied)."""
        out = wave
        for (transform, p), name in zip(self.steps, self._names):
            rng = self.generator(name, item_id, step=step, epoch=epoch, stage=stage)
            if p > 0 and rng.random() < p:
                out = transform(out, rng)
        if out is wave:
            return wave
        out = np.nan_to_num(np.asarray(out, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
        if self.max_samples is not None and out.size > self.max_samples:
            out = out[: self.max_samples]
        return out
