"""``harmonifuse plan CONFIG [--gpus N] [--gpu-memory GB]``: will a run fit, before it starts.

Parameters are counted on the meta device (the architectures built without their weights) from
each base model's config: its local folder's ``config.json`` when it is on this machine, else the
published sizes of a few well-known hub ids (:data:`KNOWN_MODELS`), so the planner works offline.
Memory per GPU (per process with ``--gpus 0``, the CPU) is estimated as

* weights: the frozen LLM in its load dtype (bf16 on GPUs, ``model.llm.frozen_dtype``), a frozen
  encoder in float32;
* under ``train.parallel: fsdp`` with several GPUs, the frozen LLM and the trained state divided by
  the GPUs, plus what FSDP gathers during a step (the root unit whole, two decoder layers);
* trained parameters: float32 weights, gradients and AdamW's two moments (16 bytes each; DDP's
  gradient buckets add 4 more with several GPUs);
* activations of the larger of the two stages at its configured batch, from the architectures'
  sizes: what each layer keeps for the backward pass (its inputs only, under
  ``train.gradient_checkpointing``), the hidden states the fusion reads, the answer logits, and
  the CTC over the vocabulary (whole or in ``model.ctc.vocab_chunk`` blocks);
* with ``--gpus 0``, the process itself (Python, torch, transformers), as measured here.

Host memory is reported too, per process and per node (up to :data:`GPUS_PER_NODE` processes, one
per GPU): the process itself, the CUDA libraries' host side, the frozen encoder (built on the host,
then moved), the LLM where it passes through host memory (a CPU run; on GPUs it loads straight onto
its GPU), and the data-loader workers.

The activation counts per layer are rules of thumb (Korthikanti et al. 2022 for transformer
layers, adapted to SwiGLU and pre-norm), not a trace: read the result to within about a quarter.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

GB = 1024 ** 3
FEATURE_RATE = {"whisper": 50.0}
"""Encoder frames per second where the config does not say (SSL encoders: from their strides)."""

KNOWN_MODELS: dict[str, tuple[str, dict]] = {
    # published configs (config.json on the hub), the fields that decide sizes
    "microsoft/wavlm-large": ("wavlm", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                            intermediate_size=4096, feat_extract_norm="layer",
                                            do_stable_layer_norm=True, conv_bias=True, num_buckets=320,
                                            max_bucket_distance=800, num_conv_pos_embeddings=128,
                                            num_conv_pos_embedding_groups=16)),
    "meta-llama/Llama-3.2-1B-Instruct": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                                       num_hidden_layers=16, num_attention_heads=32,
                                                       num_key_value_heads=8, tie_word_embeddings=True)),
    "meta-llama/Llama-3.2-3B-Instruct": ("llama", dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                                                       num_hidden_layers=28, num_attention_heads=24,
                                                       num_key_value_heads=8, tie_word_embeddings=True)),
    "meta-llama/Llama-3.1-8B-Instruct": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                                       num_hidden_layers=32, num_attention_heads=32,
                                                       num_key_value_heads=8, tie_word_embeddings=False)),
    "Qwen/Qwen2.5-1.5B-Instruct": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                                 tie_word_embeddings=True)),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                               tie_word_embeddings=False)),
    # the built-in sources, for a machine that has not converted them yet
    "whisper-tiny.en": ("whisper", dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                                        decoder_layers=4, decoder_attention_heads=6, decoder_ffn_dim=1536,
                                        num_mel_bins=80, max_source_positions=1500, vocab_size=51864)),
    "smollm2-135m-instruct": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                            num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                            tie_word_embeddings=True)),
}
GPUS_PER_NODE = 8
"""Processes per node the host-memory figure assumes (one per GPU, up to a node of eight)."""
CUDA_HOST_BYTES = 1.5 * 1024 ** 3
"""Host memory of the CUDA libraries and context per process (typical for torch 2.x)."""
WORKER_BYTES = 0.5 * 1024 ** 3
"""Host memory per data-loader worker process (its own Python, torch, a few batches)."""
TEXT_TOKENS = 64
"""Chat prefix, prompt and assistant header around the speech (Llama 3.x's system block is ~30)."""
ANSWER_TOKENS_PER_SECOND = 4.0
"""Transcript tokens per second of speech (about 2.7 words/s at ~1.4 tokens per word)."""


class PlanError(ValueError):
    """The planner cannot size a model: the message says which source and what to do."""


@dataclass
class Line:
    name: str
    bytes: float
    note: str = ""


@dataclass
class Plan:
    params_total: int
    params_trainable: int
    sources: dict[str, str]
    per_gpu: list[Line]
    stages: dict[str, list[Line]]
    seconds: float
    seconds_from: str
    gpus: int
    gpu_memory_gb: float | None
    feature_cache: Line | None = None
    checkpoint: Line | None = None
    notes: list[str] = field(default_factory=list)
    host: list[Line] = field(default_factory=list)
    """Host memory of one process at its peak (loading the models)."""
    processes_per_node: int = 1

    @property
    def host_total(self) -> float:
        return sum(line.bytes for line in self.host)

    @property
    def activations(self) -> float:
        return max(sum(line.bytes for line in lines) for lines in self.stages.values())

    @property
    def total(self) -> float:
        return sum(line.bytes for line in self.per_gpu) + self.activations

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory_gb is None else self.total <= self.gpu_memory_gb * GB


def _gb(n: float) -> str:
    return f"{n / GB:7.2f} GB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


# -- sizes of the base models -------------------------------------------------------------------------

def base_config(source: str):
    """(transformers config, where it came from) for a model source, without network access."""
    from transformers import AutoConfig

    from harmonifuse.assets import BUILTIN_SOURCES, cache_dir

    folder = cache_dir() / source if source in BUILTIN_SOURCES else Path(source).expanduser()
    if (folder / "config.json").is_file():
        return AutoConfig.from_pretrained(folder), str(folder / "config.json")
    if source in KNOWN_MODELS:
        kind, values = KNOWN_MODELS[source]
        return AutoConfig.for_model(kind, **values), "published sizes (harmonifuse/plan.py)"
    try:  # a hub id downloaded before (the hub cache)
        return AutoConfig.from_pretrained(source, local_files_only=True), "hub cache"
    except (OSError, ValueError):
        raise PlanError(f"model source {source!r}: no local folder with a config.json, not in the hub cache and not "
                        f"among the known hub ids ({', '.join(sorted(KNOWN_MODELS))}); point model.encoder.source or "
                        "model.llm.source at a local model folder, or download it once") from None


def _meta_encoder(config):
    from transformers import AutoModel

    if config.model_type == "whisper":  # HarmoniFuse keeps only Whisper's encoder
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder(config)
    return AutoModel.from_config(config)


@dataclass
class EncoderShape:
    layers: int
    width: int
    ffn: int
    heads: int
    frame_rate: float
    front: list[tuple[int, float]]
    """The convolution front end: (channels, frames per second) per layer."""
    eager: bool
    """Attention materialises (heads, T, T) probabilities (WavLM's relative position bias)."""


def encoder_shape(config) -> EncoderShape:
    if config.model_type == "whisper":
        D = config.d_model
        return EncoderShape(config.encoder_layers, D, config.encoder_ffn_dim, config.encoder_attention_heads, 50.0,
                            [(config.num_mel_bins, 100.0), (D, 100.0), (D, 50.0)], False)
    rates, rate = [], 16000.0
    for channels, stride in zip(config.conv_dim, config.conv_stride):
        rate /= stride
        rates.append((channels, rate))
    return EncoderShape(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                        config.num_attention_heads, rate, rates, config.model_type == "wavlm")


# -- the plan -----------------------------------------------------------------------------------------

def _manifest_seconds(config) -> tuple[float | None, float | None]:
    """(longest utterance, total seconds) over the training manifests, when they exist here."""
    from harmonifuse.data.manifest import read_manifest

    longest, total, found = 0.0, 0.0, False
    for name in config.data.train.values():
        path = Path(config.data.root) / name
        if path.is_file():
            found = True
            for utt in read_manifest(path):
                longest, total = max(longest, float(utt.duration or 0.0)), total + float(utt.duration or 0.0)
    return (longest, total) if found else (None, None)


def _cpu_precision(config) -> torch.dtype | None:
    from harmonifuse.training.hardware import choose_precision

    return choose_precision(config.train.precision, torch.device("cpu"))


def _process_bytes() -> float:
    """This process's resident memory now: Python, torch, transformers and the meta models."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def make_plan(config, *, gpus: int = 1, gpu_memory_gb: float | None = None, seconds: float | None = None) -> Plan:
    """Size ``config`` (a RunConfig) for ``gpus`` GPUs (0: a CPU process)."""
    from transformers import AutoModelForCausalLM

    from harmonifuse.model import HarmoniFuse  # noqa: F401 - the modules' import side effects
    from harmonifuse.modules.ctc import EmbeddingCTC
    from harmonifuse.modules.fusion import build_fusion
    from harmonifuse.modules.gate import build_gate
    from harmonifuse.modules.llm import resolve_frozen_dtype
    from harmonifuse.modules.projector import FrameStackProjector

    if gpus < 0:
        raise PlanError(f"--gpus must be >= 0 (0: a CPU process), got {gpus}")
    m, t = config.model, config.train
    enc_config, enc_from = base_config(m.encoder.source)
    llm_config, llm_from = base_config(m.llm.source)
    with torch.device("meta"):
        encoder = _meta_encoder(enc_config)
        llm = AutoModelForCausalLM.from_config(llm_config)
        shape = encoder_shape(enc_config)
        H = llm_config.hidden_size
        parts = [build_fusion(m.fusion.mode, shape.layers + 1, shape.width, H, len(m.tasks.task_names),
                              temperature=m.fusion.temperature, layer_norm=m.fusion.layer_norm),
                 build_gate(m.gate.mode, shape.width, H),
                 FrameStackProjector(shape.width, H, stack=m.projector.stack, hidden_size=m.projector.hidden_size,
                                     output_rms=1.0 if m.projector.match_embedding_norm else None),
                 EmbeddingCTC(m.ctc.scale, learn_scale=m.ctc.learn_scale,
                              blank_size=H if m.ctc.learned_blank else None)]
    n_encoder = sum(p.numel() for p in encoder.parameters())
    n_llm = sum(p.numel() for p in llm.parameters())
    n_parts = sum(p.numel() for part in parts for p in part.parameters() if p.requires_grad)
    n_lora = 0
    if m.llm.lora_rank > 0:
        for name, module in llm.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in m.llm.lora_targets:
                n_lora += m.llm.lora_rank * (module.in_features + module.out_features)
    n_trainable = n_parts + n_lora + (n_encoder if m.encoder.trainable else 0)
    n_embedding = llm.get_input_embeddings().weight.numel()
    # FSDP's units (harmonifuse/training/sharding.py): each decoder layer, then the root (the rest)
    layer_classes = set(getattr(llm, "_no_split_modules", None) or [])
    layer_sizes = [sum(p.numel() for p in module.parameters()) for module in llm.modules()
                   if type(module).__name__ in layer_classes]
    del encoder, llm, parts

    # dtypes: GPUs load the frozen LLM in bf16 (auto) and train under bf16 autocast; a CPU keeps
    # float32 weights, its frozen Linear layers stored in bf16 where autocast is on
    notes = []
    if gpus > 0:
        frozen_dtype = torch.bfloat16 if m.llm.frozen_dtype == "auto" else resolve_frozen_dtype(m.llm.frozen_dtype)
        autocast = None if t.precision == "fp32" else torch.bfloat16
    else:
        frozen_dtype = resolve_frozen_dtype(m.llm.frozen_dtype if m.llm.frozen_dtype != "auto" else "float32")
        autocast = _cpu_precision(config)
    act = 2 if (autocast is not None or frozen_dtype == torch.bfloat16) else 4
    llm_bytes = float(frozen_dtype.itemsize) * n_llm
    llm_note = f"{_count(n_llm)} in {str(frozen_dtype).split('.')[-1]}"
    if autocast is not None and frozen_dtype == torch.float32:  # store_frozen_linears_in: all but the embedding
        llm_bytes = 4.0 * n_embedding + 2.0 * (n_llm - n_embedding)
        llm_note = f"{_count(n_llm)}: Linear layers in bf16 (autocast), the embedding table in float32"

    sharded = gpus > 1 and t.parallel == "fsdp" and bool(layer_sizes)
    per_param_state = 16 + (4 if gpus > 1 and not sharded else 0)
    if sharded:  # each GPU keeps 1/gpus of the LLM and of the trained state, and gathers one unit at a time
        per_gpu = [Line("LLM weights (frozen, FSDP shard)", llm_bytes / gpus, f"{llm_note}, over {gpus} GPUs")]
        root_llm = n_llm - sum(layer_sizes)  # embeddings, LM head, final norm
        root_trained = n_parts + (n_encoder if m.encoder.trainable else 0)
        gathered = llm_bytes / n_llm * (root_llm + 2 * max(layer_sizes)) + 4.0 * root_trained
        per_gpu.append(Line("gathered by FSDP during a step", gathered,
                            "the root unit (embeddings, LM head, HarmoniFuse parts) + 2 decoder layers"))
    else:
        per_gpu = [Line("LLM weights (frozen)", llm_bytes, llm_note)]
    if not m.encoder.trainable:  # a replica on every GPU under fsdp too
        per_gpu.append(Line("encoder weights (frozen)", 4.0 * n_encoder, f"{_count(n_encoder)} in float32"))
    how = f" / {gpus} GPUs (FSDP shards)" if sharded else " (incl. DDP buckets)" if gpus > 1 else ""
    per_gpu.append(Line("trained parameters, gradients, AdamW", per_param_state * float(n_trainable) /
                        (gpus if sharded else 1), f"{_count(n_trainable)} x {per_param_state} B{how}"))
    if gpus == 0:
        per_gpu.append(Line("process (Python, torch, transformers)", _process_bytes(), "measured in this process"))
    elif gpus > 0:
        per_gpu.append(Line("CUDA context and allocator reserve", 1.0 * GB, "typical"))

    # the utterance length that sizes a batch: the longest training utterance (batches are padded to it)
    longest, total_seconds = _manifest_seconds(config)
    if seconds is not None:
        seconds_from = "--seconds"
    elif longest:
        seconds, seconds_from = min(longest, config.data.max_seconds), "longest training utterance"
    else:
        seconds, seconds_from = config.data.max_seconds, "data.max_seconds (no training manifests here)"
    stages = {}
    from harmonifuse.training.loaders import uses_feature_cache

    # "auto" caches on a CPU only: on GPUs the frozen encoder runs in the forward pass
    cached = not m.encoder.trainable and uses_feature_cache(config.data.feature_cache, "cuda" if gpus > 0 else "cpu")
    if t.max_steps > 0:
        stages["main"] = _stage_lines(config, shape, llm_config, config.data.batch_size, seconds, act, cached,
                                      with_llm=True)
    if config.align.max_steps > 0:
        stages["align"] = _stage_lines(config, shape, llm_config, config.align.batch_size, seconds, act, cached,
                                       with_llm=False)

    feature_cache = None
    if cached:
        per_second = (shape.layers + 1) * shape.width * shape.frame_rate * 2  # float16 on disk
        if total_seconds:
            feature_cache = Line("feature cache (disk)", per_second * total_seconds,
                                 f"{per_second / 1e6:.2f} MB per audio second x {total_seconds / 3600:.1f} h")
        else:
            feature_cache = Line("feature cache (disk)", float("nan"),
                                 f"{per_second / 1e6:.2f} MB per audio second (no manifests here to sum)")
    checkpoint = Line("checkpoints (disk)", 12.0 * n_trainable * (t.keep_last + 1),
                      f"{t.keep_last} last + best, trained weights and AdamW state")
    sources = {"encoder": f"{m.encoder.source}: {enc_from}", "llm": f"{m.llm.source}: {llm_from}"}
    host = _host_lines(config, gpus, n_encoder)
    return Plan(n_encoder + n_llm + n_parts + n_lora, n_trainable, sources, per_gpu, stages, seconds, seconds_from,
                gpus, gpu_memory_gb, feature_cache, checkpoint, notes, host,
                max(1, min(gpus, GPUS_PER_NODE)))


def _host_lines(config, gpus: int, n_encoder: int) -> list[Line]:
    """Host memory of one training process on GPUs at its peak, loading the models (none for a CPU
    process: its memory figure is host memory already)."""
    if gpus == 0:
        return []
    lines = [Line("process (Python, torch, transformers)", _process_bytes(), "measured in this process")]
    lines.append(Line("CUDA libraries and context", CUDA_HOST_BYTES, "typical"))
    lines.append(Line("encoder weights, while loading", 4.0 * n_encoder,
                      f"{_count(n_encoder)} in float32, built on the host, then moved to the GPU"))
    lines.append(Line("LLM weights", 0.0, "loaded straight onto the GPU, tensor by tensor"))
    workers = config.train.num_workers
    if workers == "auto":  # training/hardware.py's rule, on a node of GPUS_PER_NODE ranks and as many cores as this one
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = max(0, min(4, cores // max(1, min(gpus, GPUS_PER_NODE)) - 1))
    lines.append(Line("data-loader workers", WORKER_BYTES * int(workers), f"{workers} x {WORKER_BYTES / GB:.1f} GB"))
    return lines


def _stage_lines(config, shape: EncoderShape, llm_config, batch: int, seconds: float, act: int, cached: bool, *,
                 with_llm: bool) -> list[Line]:
    """Activation memory of one training step of a stage, by part."""
    m, checkpointing = config.model, config.train.gradient_checkpointing
    if config.data.max_duration > 0:  # the duration budget counts padded seconds: utterances x the longest
        batch = min(batch, max(1, int(config.data.max_duration // seconds)))
    B, T = batch, max(1, int(seconds * shape.frame_rate))
    D, L = shape.width, shape.layers
    states = 4.0 * (L + 1) * B * T * D  # the hidden states the fusion reads, float32
    lines = [Line("batch", 0.0, f"{B} utterances of {seconds:.1f} s")]
    per_frame = 9 * D + 2 * shape.ffn + (2 * shape.heads * T if shape.eager else 0)
    if cached:  # float16 batches: half the float32 figure each
        lines.append(Line("encoder: cached hidden states", states, "float16: the batch and its masked copy"))
    elif not m.encoder.trainable:
        lines.append(Line("encoder: frozen forward", 2 * states + act * B * T * per_frame,
                          "hidden states (returned and stacked) + one layer at work"))
    else:
        front = sum(channels * rate * seconds * 4 for channels, rate in shape.front) * B * act
        kept = (L * D + per_frame) if checkpointing else L * per_frame
        lines.append(Line("encoder: trained layers", act * B * T * kept + 2 * states + front,
                          ("layer inputs + one layer recomputed" if checkpointing else f"{L} layers' saved tensors")
                          + " + convolution front end"))
    gate = 4 * B * T * D * (4 if m.gate.mode == "content" else 1)
    # float16 (cached) states are widened one layer at a time, keeping no float32 copy of all L+1
    fusion = 3 * 4.0 * B * T * D if cached else states * (2 if m.fusion.layer_norm else 1)
    lines.append(Line("fusion, gate, projector", fusion + gate +
                      4 * B * (T // m.projector.stack + 1) * m.projector.hidden_size * 3, ""))
    N_speech = T // m.projector.stack + 1
    V, H = llm_config.vocab_size, llm_config.hidden_size
    ctc_on = (not with_llm) or m.ctc.loss_weight > 0
    if ctc_on:
        from harmonifuse.modules.ctc import resolve_vocab_chunk

        chunk = resolve_vocab_chunk(m.ctc.vocab_chunk, V)
        width, copies = (chunk, 3) if chunk else (V, 4)
        lines.append(Line("CTC over the vocabulary", 4.0 * B * N_speech * min(width, V) * copies,
                          f"blocks of {chunk} tokens" if chunk else f"(B, N, {V}) logits, log-softmax, gradient"))
    if with_llm:
        K = math.ceil(ANSWER_TOKENS_PER_SECOND * seconds) + 1
        N = TEXT_TOKENS + N_speech + K
        heads = llm_config.num_attention_heads
        per_token = 10 * H + 4 * llm_config.intermediate_size + (2 * heads * N if m.llm.attention == "eager" else 0)
        layers = llm_config.num_hidden_layers
        kept = (layers * H + per_token) if checkpointing else layers * per_token
        lines.append(Line("LLM layers", act * B * N * kept + 2 * act * B * N * H,
                          f"{N} positions" + (", layer inputs + one layer recomputed" if checkpointing else "")))
        lines.append(Line("answer logits", 4.0 * B * K * V * 3, f"{K} answer positions x {V} (logits_to_keep)"))
    return lines


def format_plan(plan: Plan) -> str:
    where = f"per GPU ({plan.gpus} GPU{'s' if plan.gpus != 1 else ''})" if plan.gpus else "per process (CPU)"
    out = ["base models:"] + [f"  {k}: {v}" for k, v in plan.sources.items()]
    out += [f"parameters: {_count(plan.params_total)} total, {_count(plan.params_trainable)} trained",
            f"utterance length: {plan.seconds:.1f} s ({plan.seconds_from})", f"memory {where}:"]
    out += [f"  {line.name:<40}{_gb(line.bytes)}  {line.note}" for line in plan.per_gpu]
    for name, lines in plan.stages.items():
        out.append(f"  activations, {name} stage:")
        out += [f"    {line.name}: {line.note}" if line.name == "batch" else
                f"    {line.name:<38}{_gb(line.bytes)}  {line.note}" for line in lines]
    largest = max(plan.stages, key=lambda s: sum(line.bytes for line in plan.stages[s])) if plan.stages else "-"
    out.append(f"  {'total (the ' + largest + ' stage at its peak)':<40}{_gb(plan.total)}")
    if plan.host:
        out.append("host memory per process (at its peak, loading the models):")
        out += [f"  {line.name:<40}{_gb(line.bytes)}  {line.note}" for line in plan.host]
        out.append(f"  {'total':<40}{_gb(plan.host_total)}")
        if plan.processes_per_node > 1:
            out.append(f"host memory per node ({plan.processes_per_node} processes){'':<9}"
                       f"{_gb(plan.host_total * plan.processes_per_node)}")
    for line in (plan.feature_cache, plan.checkpoint):
        if line is not None:
            size = "    unknown" if math.isnan(line.bytes) else _gb(line.bytes)
            out.append(f"{line.name:<42}{size}  {line.note}")
    out += [f"note: {n}" for n in plan.notes]
    if plan.fits is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        out.append(f"{verdict} in {plan.gpu_memory_gb:g} GB per {'GPU' if plan.gpus else 'process'}"
                   f" ({plan.total / GB:.1f} GB estimated)")
        if not plan.fits:
            out.append("  to save memory: train.gradient_checkpointing: true, model.ctc.vocab_chunk: 8192, "
                       "a smaller data.batch_size or data.max_duration, or more GPUs with a smaller batch each")
    return "\n".join(out)
