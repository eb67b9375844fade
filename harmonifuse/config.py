"""Typed configuration: dataclasses loaded from YAML, with dotted ``key=value`` overrides.

Every field is checked against its type and, where it has one, its set of choices; unknown keys
and bad values raise :class:`ConfigError` naming the dotted field, e.g. ``model.fusion.mode``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown or invalid; the message names the dotted field."""


DEFAULT_PROMPTS = {
    "asr": "Transcribe the audio.",
    "ser": "What emotion does the speaker express? Answer with one word.",
}
EMOTION_LABELS = ["neutral", "happy", "sad", "angry"]


@dataclass
class EncoderConfig:
    source: str = "whisper-tiny.en"
    """Built-in name, local folder or hub id of the speech encoder."""
    trainable: bool = False
    pad_to_30s: bool = False
    """Whisper only: run on 30 s of padded audio, as Whisper was trained (slower)."""
    max_seconds: float = 30.0

    def validate(self, prefix: str) -> None:
        _check(self.max_seconds > 0, f"{prefix}.max_seconds", "must be > 0")


@dataclass
class FusionConfig:
    mode: Literal["static", "task", "prompt"] = "prompt"
    temperature: float = 1.0
    layer_norm: bool = True
    """Normalise each hidden state before weighting: layers differ in scale by orders of magnitude."""

    def validate(self, prefix: str) -> None:
        _check(self.temperature > 0, f"{prefix}.temperature", "must be > 0")


@dataclass
class GateConfig:
    mode: Literal["none", "channel", "content"] = "content"


@dataclass
class ProjectorConfig:
    stack: int = 5
    """Frames stacked into one LLM position (50 Hz -> 10 Hz for Whisper)."""
    hidden_size: int = 1024
    context_layers: int = 0
    """Transformer layers over the projected positions (0: each position sees only its own frames)."""
    context_heads: int = 8
    context_kernel: int = 1
    """Width, in projected positions, of the projector's first layer as a 1-D convolution (odd;
    1: each position alone)."""
    ctc_weight: float = 0.0
    """Weight of an auxiliary CTC loss on the projector output against the LLM's token embeddings
    (items of ``ctc_tasks``, training only; 0 disables it)."""
    ctc_tasks: list[str] = field(default_factory=lambda: ["asr"])
    """Tasks whose answer the embedding-CTC targets, in the alignment stage and as the auxiliary
    loss: the transcript for ASR, the label word for SER (the SER path then starts aligned too)."""
    match_embedding_norm: bool = False
    """Scale every projected position to the RMS of the LLM's token embeddings (fixed, not learned)."""
    ctc_scale: float = 1.0
    """Logit scale of the embedding-CTC (its start value when learned)."""
    ctc_learn_scale: bool = False
    """Learn the CTC logit scale. With ``match_embedding_norm`` the scale must exceed 1 (unit-scale
    logits over 49k tokens stay flat); a fixed small one keeps outputs closer to the token embeddings."""
    ctc_learned_blank: bool = False
    """CTC blank as a learned vector instead of a special token of the LLM (see harmonifuse/ctc.py)."""
    token_mixture: bool = False
    """Feed the LLM each position's expected token embedding under the CTC posterior instead of the
    projector output itself (the projector output is then what the CTC scores)."""

    def validate(self, prefix: str) -> None:
        _check(self.stack >= 1, f"{prefix}.stack", "must be >= 1")
        _check(self.ctc_weight >= 0, f"{prefix}.ctc_weight", "must be >= 0")
        _check(self.hidden_size >= 1, f"{prefix}.hidden_size", "must be >= 1")
        _check(self.context_layers >= 0, f"{prefix}.context_layers", "must be >= 0")
        _check(self.context_heads >= 1, f"{prefix}.context_heads", "must be >= 1")
        _check(self.context_kernel >= 1 and self.context_kernel % 2 == 1, f"{prefix}.context_kernel",
               f"must be an odd number >= 1 (a centred window), got {self.context_kernel}")
        _check(self.ctc_scale > 0, f"{prefix}.ctc_scale", "must be > 0")
        _check(bool(self.ctc_tasks) and set(self.ctc_tasks) <= {"asr", "ser"}, f"{prefix}.ctc_tasks",
               f"must list one or both of asr, ser; got {self.ctc_tasks!r}")


@dataclass
class AugmentConfig:
    """SpecAugment-style masking of the encoder's hidden states in training (see harmonifuse/augment.py)."""

    time_masks: int = 0
    time_width: int = 10
    """Frames per time mask at most (Whisper: 50 frames per second)."""
    channel_masks: int = 0
    channel_width: int = 16

    def validate(self, prefix: str) -> None:
        _check(self.time_masks >= 0, f"{prefix}.time_masks", "must be >= 0")
        _check(self.channel_masks >= 0, f"{prefix}.channel_masks", "must be >= 0")
        _check(self.time_width >= 1, f"{prefix}.time_width", "must be >= 1")
        _check(self.channel_width >= 1, f"{prefix}.channel_width", "must be >= 1")


@dataclass
class PromptConfig:
    vector: Literal["mean_embedding", "hidden_state"] = "mean_embedding"


@dataclass
class LLMConfig:
    source: str = "smollm2-135m-instruct"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    chat_template: bool = True
    """Wrap speech and prompt in the tokenizer's chat template when it has one."""
    max_new_tokens: int = 96
    attention: Literal["sdpa", "eager"] = "sdpa"
    """transformers attention kernel; eager made training steps 1.24x faster on a 2-core CPU at
    these short sequences (benchmarks/bench_train_step.py)."""

    def validate(self, prefix: str) -> None:
        _check(self.lora_rank >= 0, f"{prefix}.lora_rank", "must be >= 0 (0 disables LoRA)")
        _check(0 <= self.lora_dropout < 1, f"{prefix}.lora_dropout", "must be in [0, 1)")
        _check(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", "must be >= 1")


@dataclass
class TasksConfig:
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    """The prompt each task answers by default (evaluation, analyze, dev scoring)."""
    train_prompts: dict[str, list[str]] = field(default_factory=dict)
    """Further phrasings per task for training: each training item reads ``prompts[task]`` or one of
    these, drawn uniformly (see harmonifuse/data/prompts.py)."""
    emotion_labels: list[str] = field(default_factory=lambda: list(EMOTION_LABELS))

    def validate(self, prefix: str) -> None:
        _check(set(self.prompts) >= {"asr", "ser"}, f"{prefix}.prompts", "needs a prompt for 'asr' and 'ser'")
        _check(all(p.strip() for p in self.prompts.values()), f"{prefix}.prompts", "has an empty prompt")
        unknown = sorted(set(self.train_prompts) - set(self.prompts))
        _check(not unknown, f"{prefix}.train_prompts", f"names task(s) {unknown} that have no prompt in "
               f"{prefix}.prompts ({sorted(self.prompts)})")
        _check(all(p.strip() for options in self.train_prompts.values() for p in options),
               f"{prefix}.train_prompts", "has an empty phrasing")
        _check(len(self.emotion_labels) >= 2, f"{prefix}.emotion_labels", "needs at least two labels")
        _check(len(set(self.emotion_labels)) == len(self.emotion_labels), f"{prefix}.emotion_labels", "has duplicates")

    @property
    def task_names(self) -> list[str]:
        return sorted(self.prompts)


@dataclass
class DecodingConfig:
    """How ASR answers are decoded: joint CTC/LLM beam search (harmonifuse/decoding.py)."""

    beam_size: int = 1
    """Hypotheses kept per utterance (1: greedy)."""
    ctc_weight: float = 0.0
    """w in score = (1 - w) log p_LLM + w log p_CTC-prefix: how much the projector's CTC head, which
    only writes what it hears, restrains the LLM's prior (0: the LLM alone)."""
    llm_candidates: int = 8
    """The LLM's top tokens scored as extensions of each hypothesis per step; the tokens of the
    utterance's greedy CTC transcript are always scored too."""

    def validate(self, prefix: str) -> None:
        _check(self.beam_size >= 1, f"{prefix}.beam_size", "must be >= 1")
        _check(0.0 <= self.ctc_weight < 1.0, f"{prefix}.ctc_weight", "must be in [0, 1)")
        _check(self.llm_candidates >= 1, f"{prefix}.llm_candidates", "must be >= 1")


@dataclass
class VADConfig:
    """Voice activity detection (Silero VAD, its weights inside the silero-vad wheel): audio without
    speech is answered as no speech instead of being transcribed."""

    enabled: bool = True
    threshold: float = 0.5
    """Speech probability above which a 32 ms window counts as speech."""
    min_speech_seconds: float = 0.25
    """Less speech than this in a recording: ``no_speech``."""

    def validate(self, prefix: str) -> None:
        _check(0.0 < self.threshold < 1.0, f"{prefix}.threshold", "must be in (0, 1)")
        _check(self.min_speech_seconds >= 0, f"{prefix}.min_speech_seconds", "must be >= 0")


@dataclass
class CalibrationConfig:
    ser_temperature: float = 1.0
    """Divides the emotion label log-likelihoods before the softmax; fitted on dev by
    ``harmonifuse calibrate`` (1: uncalibrated)."""

    def validate(self, prefix: str) -> None:
        _check(self.ser_temperature > 0, f"{prefix}.ser_temperature", "must be > 0")


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    vad: VADConfig = field(default_factory=VADConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


# ----------------------------------------------------------------------------------------------
# Loading


def _check(condition: bool, name: str, problem: str) -> None:
    if not condition:
        raise ConfigError(f"config field '{name}': {problem}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (recursively), converting where lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}': expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config field '{name}': {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"config field '{name}': {value!r} does not fit {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{name}': expected a list, got {value!r}")
        return [_coerce(item, args[0], f"{name}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}': expected a mapping, got {value!r}")
        return {_coerce(k, args[0], name): _coerce(v, args[1], f"{name}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field '{name}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config field '{name}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field '{name}': expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field '{name}': expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and ill-typed values."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    dotted = (prefix + ".") if prefix else ""
    unknown = sorted(set(data) - known)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean '{dotted}{close[0]}'? " if close else ""
        raise ConfigError(
            f"config field '{dotted}{unknown[0]}' is unknown; {hint}known fields here: {sorted(known)}"
        )
    values = {key: _coerce(value, hints[key], f"{dotted}{key}") for key, value in data.items()}
    instance = cls(**values)
    validate(instance, prefix)
    return instance


def validate(instance: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}.{f.name}" if prefix else f.name)
    if hasattr(instance, "validate"):
        instance.validate(prefix or type(instance).__name__)


def to_dict(instance: Any) -> dict:
    return dataclasses.asdict(instance)


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """``["model.fusion.mode=task", "data.train={asr: a.jsonl}"]`` -> ``[(path, value), ...]`` (values parsed as YAML)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({error})") from error
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of ``data`` with each dotted key set; the named leaf is replaced, so a mapping value
    (``data.train={asr: a.jsonl}``) replaces the whole mapping instead of merging into it."""
    data = copy.deepcopy(data)
    for parts, value in parse_overrides(overrides):
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override of '{'.'.join(parts)}': '{'.'.join(parts[:i + 1])}' is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; point at a YAML file")
        raise ConfigError(f"config file {path} does not exist; check the path (e.g. configs/demo.yaml)")
    try:
        with open(path, encoding="utf-8") as handle:  # a stream: YAML's messages then name the file and line
            data = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start}); point at a YAML file") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge key by key, anything else (lists too) is replaced."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_yaml_extends(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML file with its ``extends: other.yaml`` chain resolved (relative to the file naming it):
    a recipe that builds on a frozen one holds only what it changes."""
    path = Path(path)
    data = load_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"config field 'extends' of {path} must name one YAML file, got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if parent_path in _seen or parent_path == path.resolve():
        raise ConfigError(f"config field 'extends' of {path}: {parent} extends itself through "
                          f"{' -> '.join(p.name for p in _seen)}; break the cycle")
    if not parent_path.is_file():
        raise ConfigError(f"config field 'extends' of {path}: {parent_path} does not exist; the path is "
                          "relative to the file that names it")
    return _merge(load_yaml_extends(parent_path, _seen + (path.resolve(),)), data)


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Load dataclass ``cls`` from a YAML file (optional; its ``extends`` chain resolved) and dotted overrides."""
    data = load_yaml_extends(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ConfigError as error:
        if path is None:
            raise
        raise ConfigError(f"{path}: {error}") from None
