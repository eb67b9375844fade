"""The bad-input corpus: one input per kind of bad, broken or merely unusual input a user may give.

    python tests/make_bad_inputs.py OUT [--model MODEL_FOLDER]

writes ``OUT/audio/`` (files for ``harmonifuse analyze`` and ``model.analyze``),
``OUT/manifest/`` (for ``harmonifuse evaluate`` and ``read_manifest``), ``OUT/config/`` (for
``harmonifuse train`` and ``load_run_config``), with ``--model`` ``OUT/model/`` (damaged copies
of a good model folder, for ``--model`` and ``HarmoniFuse.from_pretrained``; ``--other-weights``
adds a copy holding the weights of another configuration), and ``OUT/kinds.json``:
per kind its group, input and what the user must see. ``tests/test_bad_inputs.py`` runs every
kind through the CLI and the Python API; ``docs/bad-input.md`` is the table of what users see.

Outcomes: ``answer`` (it works: transcript and emotion), ``no_speech`` (answered as no speech:
with voice activity detection on, the default), ``error`` (one message naming the file, line or
field and saying what to do; each needle must appear in it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

RATE = 16_000
SENTENCE = "the quick brown fox jumps over the lazy dog"


@dataclass
class Kind:
    name: str
    group: str  # audio | manifest | config | model
    title: str  # what the input is, for the table
    outcome: str  # answer | no_speech | error
    needles: list[str] = field(default_factory=list)  # substrings the message must contain
    path: str = ""  # the input, filled in by build()
    note: str = ""  # for the table: a qualification of the outcome

    @property
    def is_error(self) -> bool:
        return self.outcome == "error"


KINDS: list[Kind] = []
_BUILDERS: dict[str, Callable] = {}


def kind(name: str, group: str, title: str, outcome: str, *needles: str, note: str = ""):
    """Register a builder ``build(folder, speech) -> path`` for one kind."""
    def register(build: Callable) -> Callable:
        KINDS.append(Kind(name, group, title, outcome, list(needles), note=note))
        _BUILDERS[name] = build
        return build
    return register


# -- the speech every audio kind is made of ----------------------------------------------------------


def speech_clip() -> np.ndarray:
    """About 2.5 s of 16 kHz speech from flite when it is installed (so the voice activity detector
    finds speech), else a vowel-like harmonic signal with a syllable rhythm."""
    import soxr

    if shutil.which("flite"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "s.wav"
            subprocess.run(["flite", "-voice", "slt", "-t", SENTENCE, "-o", str(out)], check=True,
                           capture_output=True)
            wave, rate = sf.read(out, dtype="float32")
        wave = soxr.resample(wave, rate, RATE) if rate != RATE else wave
        return (0.5 * wave / np.abs(wave).max()).astype(np.float32)
    t = np.arange(int(2.5 * RATE)) / RATE
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.5 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / RATE) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (0.3 * voiced * envelope / np.abs(voiced).max()).astype(np.float32)


def _write(path: Path, samples: np.ndarray, rate: int = RATE, **options) -> Path:
    sf.write(str(path), samples, rate, **options)
    return path


def _resampled(speech: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    return soxr.resample(speech, RATE, rate).astype(np.float32)


# -- audio ---------------------------------------------------------------------------------------------

A = "audio"


@kind("missing_file", A, "a path that does not exist", "error", "audio file not found", "check the path")
def _(d, s):
    return d / "not-there.wav"


@kind("directory", A, "a folder (no audio inside)", "error", "folder", "point at",
      note="API: `is a directory`; CLI: `folder holds no audio files` (a folder with audio is expanded)")
def _(d, s):
    (d / "a-folder").mkdir()
    return d / "a-folder"


@kind("permission_denied", A, "a file the user may not read (mode 000)", "error", "permission denied", "chmod")
def _(d, s):
    path = _write(d / "locked.wav", s, subtype="PCM_16")
    os.chmod(path, 0)
    return path


@kind("empty_file", A, "an empty file (0 bytes)", "error", "empty (0 bytes)", "re-extract or re-download")
def _(d, s):
    (d / "empty.wav").write_bytes(b"")
    return d / "empty.wav"


@kind("header_only", A, "a WAV header and no samples", "error", "contains no samples", "re-extract or re-download")
def _(d, s):
    data = _write(d / "h.tmp.wav", s, subtype="PCM_16").read_bytes()
    (d / "h.tmp.wav").unlink()
    (d / "header-only.wav").write_bytes(data[:44])
    return d / "header-only.wav"


@kind("truncated_wav", A, "a WAV cut off half-way (header promises more)", "answer", "truncated", "missing",
      note="answered from the part present, with a warning saying how much of the recording is missing")
def _(d, s):
    data = _write(d / "t.tmp.wav", s, subtype="PCM_16").read_bytes()
    (d / "t.tmp.wav").unlink()
    (d / "truncated.wav").write_bytes(data[: len(data) // 2])
    return d / "truncated.wav"


@kind("text_as_wav", A, "a text file named .wav", "error", "not a readable audio file", "convert it")
def _(d, s):
    (d / "notes.wav").write_text("this is not audio\n" * 20)
    return d / "notes.wav"


@kind("random_bytes_as_wav", A, "random bytes named .wav", "error", "not a readable audio file", "convert it")
def _(d, s):
    (d / "noise-bytes.wav").write_bytes(np.random.default_rng(0).bytes(20_000))
    return d / "noise-bytes.wav"


@kind("wrong_extension", A, "a FLAC file named .wav", "answer")
def _(d, s):
    return _write(d / "really-flac.wav", s, format="FLAC", subtype="PCM_16")


@kind("mp3", A, "MP3", "answer")
def _(d, s):
    return _write(d / "clip.mp3", s, format="MP3")


@kind("ogg_vorbis", A, "OGG Vorbis", "answer")
def _(d, s):
    return _write(d / "clip.ogg", s, format="OGG", subtype="VORBIS")


@kind("ogg_opus", A, "OGG Opus (48 kHz)", "answer")
def _(d, s):
    return _write(d / "clip.opus.ogg", _resampled(s, 48_000), 48_000, format="OGG", subtype="OPUS")


@kind("flac", A, "FLAC", "answer")
def _(d, s):
    return _write(d / "clip.flac", s, subtype="PCM_16")


@kind("aiff", A, "AIFF", "answer")
def _(d, s):
    return _write(d / "clip.aiff", s, subtype="PCM_16")


for _rate in (8_000, 22_050, 44_100, 48_000):
    kind(f"wav_{_rate}hz", A, f"WAV at {_rate / 1000:g} kHz", "answer")(
        lambda d, s, rate=_rate: _write(d / f"clip-{rate}.wav", _resampled(s, rate), rate, subtype="PCM_16"))


@kind("stereo", A, "stereo WAV (different channels)", "answer", note="the channels are averaged")
def _(d, s):
    return _write(d / "stereo.wav", np.stack([s, 0.5 * s], axis=1), subtype="PCM_16")


@kind("pcm_24bit", A, "24-bit WAV", "answer")
def _(d, s):
    return _write(d / "clip-24bit.wav", s, subtype="PCM_24")


@kind("pcm_8bit", A, "8-bit unsigned WAV", "answer")
def _(d, s):
    return _write(d / "clip-8bit.wav", s, subtype="PCM_U8")


@kind("float_wav", A, "32-bit float WAV", "answer")
def _(d, s):
    return _write(d / "clip-float.wav", s, subtype="FLOAT")


@kind("float_over_full_scale", A, "float WAV with peaks at 4.0 (beyond full scale)", "answer",
      note="scaled down so the peak is 1, not clipped")
def _(d, s):
    return _write(d / "clip-loud-float.wav", 8 * s, subtype="FLOAT")


@kind("nan_samples", A, "float WAV with NaN samples", "error", "NaN/inf samples (first at", "re-export")
def _(d, s):
    x = s.copy()
    x[RATE // 2: RATE // 2 + 10] = np.nan
    return _write(d / "nan.wav", x, subtype="FLOAT")


@kind("inf_samples", A, "float WAV with +/-inf samples", "error", "NaN/inf samples (first at", "re-export")
def _(d, s):
    x = s.copy()
    x[100], x[200] = np.inf, -np.inf
    return _write(d / "inf.wav", x, subtype="FLOAT")


@kind("full_scale_clipping", A, "speech clipped hard at full scale", "answer")
def _(d, s):
    return _write(d / "clipped.wav", np.clip(6 * s, -1, 1), subtype="PCM_16")


@kind("all_zeros", A, "all-zero samples (digital silence)", "no_speech", "audio is silent", "remove it",
      note="`no_speech: true` with voice activity detection on (the default); with it off, an error: audio is silent")
def _(d, s):
    return _write(d / "zeros.wav", np.zeros(2 * RATE, np.float32), subtype="PCM_16")


@kind("near_silence", A, "near-silence (noise at -100 dBFS)", "no_speech", "audio is silent", "remove it",
      note="`no_speech: true` with voice activity detection on; with it off, an error: audio is silent")
def _(d, s):
    x = 1e-5 * np.random.default_rng(1).standard_normal(2 * RATE)
    return _write(d / "near-silence.wav", x.astype(np.float32), subtype="FLOAT")


@kind("ten_milliseconds", A, "10 ms of audio", "error", "too short", "written completely")
def _(d, s):
    return _write(d / "10ms.wav", s[RATE: RATE + RATE // 100], subtype="PCM_16")


@kind("header_bomb", A, "an audio bomb: a 11 KB FLAC whose header declares 655,350 Hz x 8 channels", "error",
      "sample rate of 655,350 Hz", "resample it")
def _(d, s):
    from serve_tiny import write_header_bomb

    return write_header_bomb(d / "bomb.flac", 655_350, 8, 2.0)


@kind("long_recording", A, "a recording longer than the encoder's window (40 s; the 2-hour case is "
      "benchmarks/bench_long_audio.py)", "answer", note="cut at pauses and answered segment by segment (`segments`)")
def _(d, s):
    pause = np.zeros(RATE, np.float32)
    pieces, total = [], 0
    while total < 40 * RATE:
        pieces += [s, pause]
        total += len(s) + len(pause)
    return _write(d / "long-40s.flac", np.concatenate(pieces)[: 40 * RATE], subtype="PCM_16")


@kind("unicode_name", A, "a file name with accents, CJK, emoji and spaces", "answer")
def _(d, s):
    return _write(d / "Grüße 录音 🎙.wav", s, subtype="PCM_16")


@kind("upper_case_extension", A, "an upper-case extension (.WAV)", "answer")
def _(d, s):
    return _write(d / "SHOUT.WAV", s, subtype="PCM_16")


@kind("symlink_loop", A, "a symbolic link loop", "error", "symbolic link loop", "readlink")
def _(d, s):
    os.symlink("loop-b.wav", d / "loop-a.wav")
    os.symlink("loop-a.wav", d / "loop-b.wav")
    return d / "loop-a.wav"


@kind("broken_symlink", A, "a symbolic link to a deleted file", "error", "broken symbolic link", "readlink")
def _(d, s):
    os.symlink("deleted.wav", d / "dangling.wav")
    return d / "dangling.wav"


# -- manifests -----------------------------------------------------------------------------------------

M = "manifest"


def _line(audio: str, **fields) -> str:
    record = {"id": "u1", "audio": audio, "duration": 3.5, "corpus": "bad", "speaker": "s1", "emotion": "happy"}
    record.update(fields)
    return json.dumps({k: v for k, v in record.items() if v is not ...}, allow_nan=True)


def _manifest(d: Path, name: str, *lines: str) -> Path:
    good = _line("good.wav", id="u0")
    path = d / f"{name}.jsonl"
    path.write_text("\n".join([good, *lines]) + "\n")
    return path


def _good_audio(d: Path, s: np.ndarray) -> None:
    if not (d / "good.wav").exists():
        _write(d / "good.wav", s, subtype="PCM_16")


@kind("invalid_json_line", M, "a line that is not JSON", "error", ":2:", "not valid JSON", "one JSON object per line")
def _(d, s):
    _good_audio(d, s)
    return _manifest(d, "invalid-json", '{"id": "u1", "audio": "good.wav",')


@kind("missing_field", M, "a line without `speaker`", "error", ":2:", "field 'speaker'", "missing",
      "every line needs 'speaker'")
def _(d, s):
    _good_audio(d, s)
    return _manifest(d, "missing-field", _line("good.wav", speaker=...))


@kind("wrong_type", M, "`duration` as a string", "error", ":2:", "field 'duration'", "expected a number",
      "write it as a number")
def _(d, s):
    _good_audio(d, s)
    return _manifest(d, "wrong-type", _line("good.wav", duration="3.5 s"))


@kind("duplicate_id", M, "two lines with one id", "error", ":2:", "duplicate id 'u0'", "unique id")
def _(d, s):
    _good_audio(d, s)
    return _manifest(d, "duplicate-id", _line("good.wav", id="u0"))


@kind("negative_duration", M, "a negative duration", "error", ":2:", "field 'duration'", "finite number > 0",
      "re-measure")
def _(d, s):
    _good_audio(d, s)
    return _manifest(d, "negative-duration", _line("good.wav", duration=-1.0))


@kind("nan_duration", M, "a NaN duration", "error", ":2:", "field 'duration'", "finite number > 0", "re-measure")
def _(d, s):
    _good_audio(d, s)
    return _manifest(d, "nan-duration", _line("good.wav", duration=float("nan")))


@kind("unknown_emotion", M, "an emotion label the model does not know", "error", ":2:", "field 'emotion'",
      "unknown label 'joyful'", "use one of")
def _(d, s):
    _good_audio(d, s)
    return _manifest(d, "unknown-emotion", _line("good.wav", emotion="joyful"))


@kind("manifest_audio_missing", M, "a line whose audio file is missing", "error", ":2:", "field 'audio'",
      "file not found", "fix the path")
def _(d, s):
    _good_audio(d, s)
    return _manifest(d, "audio-missing", _line("gone.wav"))


@kind("empty_manifest", M, "an empty manifest", "error", "manifest has no utterances", "harmonifuse prepare")
def _(d, s):
    (d / "empty.jsonl").write_text("")
    return d / "empty.jsonl"


@kind("manifest_not_found", M, "a manifest path that does not exist", "error", "manifest not found",
      "check the path")
def _(d, s):
    return d / "nowhere.jsonl"


@kind("binary_manifest", M, "random bytes named .jsonl", "error", ":1:", "not UTF-8 text", "UTF-8 JSON lines")
def _(d, s):
    (d / "binary.jsonl").write_bytes(b"\x80\xff" + np.random.default_rng(2).bytes(200).replace(b"\n", b" "))
    return d / "binary.jsonl"


# -- configs -------------------------------------------------------------------------------------------

C = "config"


def _config(d: Path, name: str, text: str) -> Path:
    path = d / f"{name}.yaml"
    path.write_text(text)
    return path


@kind("unknown_key", C, "a misspelt key (`train.max_step`)", "error", "'train.max_step' is unknown",
      "did you mean 'train.max_steps'")
def _(d, s):
    return _config(d, "unknown-key", "train:\n  max_step: 10\n")


@kind("config_wrong_type", C, "a value of the wrong type (`train.max_steps: ten`)", "error",
      "'train.max_steps'", "expected an integer, got 'ten'")
def _(d, s):
    return _config(d, "wrong-type", "train:\n  max_steps: ten\n")


@kind("out_of_range", C, "a value out of range (`optim.lr: -0.1`)", "error", "'optim.lr'", "must be > 0")
def _(d, s):
    return _config(d, "out-of-range", "optim:\n  lr: -0.1\n")


@kind("bad_choice", C, "a value not among the choices (`model.fusion.mode: layerwise`)", "error",
      "'model.fusion.mode'", "'layerwise' is not one of")
def _(d, s):
    return _config(d, "bad-choice", "model:\n  fusion:\n    mode: layerwise\n")


@kind("invalid_yaml", C, "a file that is not YAML", "error", "is not valid YAML", "line 2")
def _(d, s):
    return _config(d, "invalid-yaml", "train:\n  max_steps: [1, 2\n")


@kind("binary_config", C, "random bytes named .yaml", "error", "is not UTF-8 text", "point at a YAML file")
def _(d, s):
    (d / "binary.yaml").write_bytes(b"\x80\xff\xfe" + bytes(range(256)))
    return d / "binary.yaml"


@kind("config_missing", C, "a config path that does not exist", "error", "does not exist", "check the path")
def _(d, s):
    return d / "absent.yaml"


# -- model folders (damaged copies of a good one) ------------------------------------------------------

MD = "model"


def _copy_model(model: Path, d: Path, name: str) -> Path:
    target = d / name
    shutil.copytree(model, target)
    return target


@kind("model_folder_missing", MD, "a model folder that does not exist", "error", "no model folder", "check the path")
def _(d, model):
    return d / "no-such-model"


@kind("model_config_missing", MD, "a model folder without config.yaml", "error", "config.yaml is missing",
      "copy the whole folder again")
def _(d, model):
    path = _copy_model(model, d, "no-config")
    (path / "config.yaml").unlink()
    return path


@kind("model_weights_missing", MD, "a model folder without trained.safetensors", "error",
      "trained.safetensors is missing", "copy the whole folder again",
      note="refused: an untrained model would answer nonsense")
def _(d, model):
    path = _copy_model(model, d, "no-weights")
    (path / "trained.safetensors").unlink()
    return path


@kind("truncated_weights", MD, "truncated trained.safetensors", "error", "trained.safetensors",
      "truncated or corrupt", "copy or download the model folder again")
def _(d, model):
    path = _copy_model(model, d, "truncated-weights")
    data = (path / "trained.safetensors").read_bytes()
    (path / "trained.safetensors").write_bytes(data[: len(data) // 2])
    return path


@kind("corrupt_weights_header", MD, "trained.safetensors with a damaged header", "error", "trained.safetensors",
      "truncated or corrupt", "copy or download the model folder again")
def _(d, model):
    path = _copy_model(model, d, "corrupt-header")
    data = bytearray((path / "trained.safetensors").read_bytes())
    data[12:40] = b"\xff" * 28
    (path / "trained.safetensors").write_bytes(bytes(data))
    return path


@kind("corrupt_weights_data", MD, "trained.safetensors with flipped bytes in the tensors", "error",
      "trained.safetensors", "checksum mismatch", "copy or download the model folder again",
      note="caught by the SHA-256 that save_pretrained stores in the file (older files load unchecked)")
def _(d, model):
    path = _copy_model(model, d, "corrupt-data")
    data = bytearray((path / "trained.safetensors").read_bytes())
    for i in range(len(data) - 64, len(data) - 32):
        data[i] ^= 0x5A
    (path / "trained.safetensors").write_bytes(bytes(data))
    return path


@kind("weights_of_another_model", MD, "weights trained with another base model / sizes", "error",
      "trained.safetensors", "has shape", "this model expects", "use the config.yaml saved with these weights")
def _(d, model):
    path = _copy_model(model, d, "other-weights")
    shutil.copy(model.other_weights, path / "trained.safetensors")
    return path


@kind("config_from_newer_version", MD, "config.yaml saved by a newer HarmoniFuse (an unknown field)", "error",
      "config.yaml", "'model.encoder.chunk_overlap' is unknown", "saved by HarmoniFuse 9.0.0", "upgrade")
def _(d, model):
    import yaml

    path = _copy_model(model, d, "newer-version")
    config = yaml.safe_load((path / "config.yaml").read_text())
    config["encoder"]["chunk_overlap"] = 0.5
    (path / "config.yaml").write_text("# written by harmonifuse 9.0.0\n" + yaml.safe_dump(config, sort_keys=False))
    return path


# -- building ------------------------------------------------------------------------------------------


class _Model(type(Path())):
    """A good model folder, carrying the weights file of another configuration."""

    other_weights: Path


def build(out: str | os.PathLike, model: str | os.PathLike | None = None, other_weights: str | os.PathLike | None = None,
          speech: np.ndarray | None = None) -> list[Kind]:
    """Write every kind's input under ``out`` (model kinds only with ``model``, a good model folder,
    and ``other_weights``, a trained.safetensors of another configuration); returns the kinds with
    their paths, also written to ``out/kinds.json``."""
    out = Path(out)
    speech = speech_clip() if speech is None else speech
    good_model = None
    if model is not None:
        good_model = _Model(model)
        good_model.other_weights = Path(other_weights) if other_weights else None
    built = []
    for k in KINDS:
        if k.group == MD and (good_model is None or (k.name == "weights_of_another_model" and not other_weights)):
            continue
        folder = out / k.group
        folder.mkdir(parents=True, exist_ok=True)
        path = _BUILDERS[k.name](folder, good_model if k.group == MD else speech)
        built.append(Kind(**{**asdict(k), "path": str(path)}))
    (out / "kinds.json").write_text(json.dumps([asdict(k) for k in built], indent=1, ensure_ascii=False) + "\n")
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--model", help="a good model folder, to make damaged copies of")
    parser.add_argument("--other-weights", help="a trained.safetensors of another model configuration")
    args = parser.parse_args()
    kinds = build(args.out, args.model, args.other_weights)
    for group in ("audio", "manifest", "config", "model"):
        print(f"{group}: {sum(k.group == group for k in kinds)} kinds")
    print(f"{len(kinds)} kinds in {args.out} (see kinds.json)")


if __name__ == "__main__":
    main()
