"""The model's configuration (``model:`` in a run config, ``config.yaml`` in a model folder)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Union

from harmonifuse.config.loading import _check
from harmonifuse.tasks import EMOTION_LABELS, TASK_NAMES, TASKS

DEFAULT_PROMPTS = {name: task.default_prompt for name, task in TASKS.items()}
DEFAULT_TRAIN_PROMPTS = {
    "asr": ["What does the speaker say?", "Repeat exactly what you hear.", "Convert this speech to text.",
            "Please transcribe this recording word for word.", "Type out the spoken words."],
    "ser": ["How does the speaker feel? Answer with one word.", "Name the emotion in this voice.",
            "Which emotion do you hear? One word.", "Tell me the mood of the speaker in one word.",
            "Classify the speaker's emotion in one word."],
}
"""The shipped recipe's further phrasings per task in training (configs/demo.yaml)."""


@dataclass
class EncoderConfig:
    source: str = "whisper-tiny.en"
    """Built-in name, local folder or hub id of the speech encoder."""
    trainable: bool = True
    """Fine-tune the encoder with the rest (``optim.encoder_lr``); frozen, its features are cached."""
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
class FeatureMaskingConfig:
    """SpecAugment-style masking of the encoder's hidden states in training, cached features too
    (see harmonifuse/modules/feature_masking.py). Waveform augmentation is ``data.augment``."""

    time_masks: int = 2
    time_width: int = 10
    """Frames per time mask at most (Whisper: 50 frames per second)."""
    channel_masks: int = 2
    channel_width: int = 32

    def validate(self, prefix: str) -> None:
        _check(self.time_masks >= 0, f"{prefix}.time_masks", "must be >= 0")
        _check(self.channel_masks >= 0, f"{prefix}.channel_masks", "must be >= 0")
        _check(self.time_width >= 1, f"{prefix}.time_width", "must be >= 1")
        _check(self.channel_width >= 1, f"{prefix}.channel_width", "must be >= 1")


@dataclass
class ProjectorConfig:
    stack: int = 5
    """Frames stacked into one LLM position (50 Hz -> 10 Hz for Whisper)."""
    hidden_size: int = 1024
    match_embedding_norm: bool = True
    """Scale every projected position to the RMS of the LLM's token embeddings (fixed, not learned)."""

    def validate(self, prefix: str) -> None:
        _check(self.stack >= 1, f"{prefix}.stack", "must be >= 1")
        _check(self.hidden_size >= 1, f"{prefix}.hidden_size", "must be >= 1")


@dataclass
class CTCConfig:
    """The embedding-CTC head: CTC of the projector output against the LLM's token embeddings (see
    harmonifuse/modules/ctc.py). Alone in the alignment stage, then an auxiliary training loss; its
    scores also guide the joint beam search (``decoding.ctc_weight``, a search weight)."""

    loss_weight: float = 0.3
    """Weight of the embedding-CTC as an auxiliary training loss beside the LLM's (items of
    ``tasks``; 0 disables it; the alignment stage trains it alone whatever this is)."""
    tasks: list[str] = field(default_factory=lambda: ["asr", "ser"])
    """Tasks whose answer the embedding-CTC targets, in the alignment stage and as the auxiliary
    loss: the transcript for ASR, the label word for SER (the SER path then starts aligned too)."""
    scale: float = 3.0
    """Logit scale of the embedding-CTC (its start value when learned)."""
    learn_scale: bool = False
    """Learn the CTC logit scale. With ``projector.match_embedding_norm`` the scale must exceed 1
    (unit-scale logits over 49k tokens stay flat); a fixed small one keeps outputs closer to the
    token embeddings."""
    learned_blank: bool = True
    """CTC blank as a learned vector instead of a special token of the LLM (see harmonifuse/modules/ctc.py)."""
    vocab_chunk: Union[int, Literal["auto"]] = "auto"
    """Compute the embedding-CTC over the LLM vocabulary in blocks of this many tokens, never the
    whole (B, N, V) logits at once (the loss: only the blank's and the targets' classes plus a
    chunked normaliser; same values and gradients). 0: the whole table at once, fastest for small
    vocabularies; 8192 keeps a 152k vocabulary (Qwen2.5) within a few hundred MB per batch. auto:
    8192 for a vocabulary above 64k tokens (Llama 3, Qwen2.5), else 0 (SmolLM2's 49k)."""

    def validate(self, prefix: str) -> None:
        _check(self.loss_weight >= 0, f"{prefix}.loss_weight", "must be >= 0")
        _check(self.scale > 0, f"{prefix}.scale", "must be > 0")
        _check(self.vocab_chunk == "auto" or self.vocab_chunk >= 0, f"{prefix}.vocab_chunk",
               f"must be auto or >= 0 (0: the whole vocabulary at once; e.g. 8192 for a 152k vocabulary), "
               f"got {self.vocab_chunk}")
        _check(bool(self.tasks) and set(self.tasks) <= set(TASK_NAMES), f"{prefix}.tasks",
               f"must list some of {', '.join(TASK_NAMES)}; got {self.tasks!r}")


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
    attention: Literal["sdpa", "eager"] = "eager"
    """transformers attention kernel; eager made training steps 1.24x faster on a 2-core CPU at
    these short sequences (benchmarks/bench_train_step.py)."""
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype the frozen LLM weights load in; auto: bfloat16 when CUDA is available, else float32.
    The trained parts (LoRA, projector, fusion, gate) stay float32 either way."""
    repetition_penalty: float = 1.0
    """transformers' repetition penalty in ASR decoding (1.0: none). The base model's own
    generation settings (sampling, temperature, top-p, its repetition penalty) are never used."""

    def validate(self, prefix: str) -> None:
        _check(self.repetition_penalty > 0, f"{prefix}.repetition_penalty", "must be > 0 (1.0: no penalty)")
        _check(self.lora_rank >= 0, f"{prefix}.lora_rank", "must be >= 0 (0 disables LoRA)")
        _check(0 <= self.lora_dropout < 1, f"{prefix}.lora_dropout", "must be in [0, 1)")
        _check(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", "must be >= 1")


@dataclass
class TasksConfig:
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    """The prompt each task answers by default (evaluation, analyze, dev scoring)."""
    train_prompts: dict[str, list[str]] = field(
        default_factory=lambda: {task: list(options) for task, options in DEFAULT_TRAIN_PROMPTS.items()})
    """Further phrasings per task for training: each training item reads ``prompts[task]`` or one of
    these, drawn uniformly (see harmonifuse/data/prompt_choice.py)."""
    emotion_labels: list[str] = field(default_factory=lambda: list(EMOTION_LABELS))

    def validate(self, prefix: str) -> None:
        _check(set(self.prompts) >= set(TASK_NAMES), f"{prefix}.prompts",
               "needs a prompt for " + " and ".join(repr(t) for t in TASK_NAMES))
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

    beam_size: int = 4
    """Hypotheses kept per utterance (1: greedy)."""
    ctc_weight: float = 0.3
    """Search weight w in score = (1 - w) log p_LLM + w log p_CTC-prefix: how much the CTC head
    (``model.ctc``), which only writes what it hears, restrains the LLM's prior (0: the LLM alone).
    Not the training loss's weight (``ctc.loss_weight``)."""
    llm_candidates: int = 8
    """The LLM's top tokens scored as extensions of each hypothesis per step; the tokens of the
    utterance's greedy CTC transcript are always scored too."""
    draft: Literal["none", "ctc"] = "none"
    """ctc: the CTC head's greedy transcript drafts the answer and the LLM checks up to
    ``draft_tokens`` of it per forward pass: the same transcript as without (greedy, with or
    without ``ctc_weight``), in fewer forward passes; faster only when most drafts are kept (with
    the shipped model's CTC head a fifth are: 21-28 % fewer passes, up to 28 % more time on a CPU;
    docs/research/results.md). Needs ``beam_size: 1``."""
    draft_tokens: int = 4
    """The most draft tokens one forward pass checks (``draft: ctc``); each costs a share of a
    forward pass whether it is kept or not (docs/research/results.md)."""
    int8: bool = False
    """On a CPU, answer with the LLM's (LoRA merged into it) and the projector's Linear layers in
    dynamic int8 (torch.ao quantize_dynamic; the MLPs' output projections stay float), copies made
    at first use: the shipped model decodes 1.35x (beam 4) to 1.6x (greedy) faster, answers close
    to float32's but not always equal. Training and saved models keep their float weights."""

    def validate(self, prefix: str) -> None:
        _check(self.beam_size >= 1, f"{prefix}.beam_size", "must be >= 1")
        _check(0.0 <= self.ctc_weight < 1.0, f"{prefix}.ctc_weight", "must be in [0, 1)")
        _check(self.llm_candidates >= 1, f"{prefix}.llm_candidates", "must be >= 1")
        _check(self.draft == "none" or self.beam_size == 1, f"{prefix}.draft",
               f"ctc drafts decode greedily: needs beam_size 1, got {self.beam_size}")
        _check(self.draft_tokens >= 1, f"{prefix}.draft_tokens", "must be >= 1")


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
    """The model; every default is the shipped recipe's (configs/demo.yaml), so ``ModelConfig()``
    builds the shipped architecture (only the fitted ``calibration`` differs)."""

    config_scope: ClassVar[str] = "model"
    """Where this config sits in a run config: old keys are renamed by harmonifuse/config/renames.py."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    feature_masking: FeatureMaskingConfig = field(default_factory=FeatureMaskingConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    ctc: CTCConfig = field(default_factory=CTCConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    vad: VADConfig = field(default_factory=VADConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


