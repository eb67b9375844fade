"""HarmoniFuse: speech encoder -> prompt-adaptive fusion -> gate -> projector -> LLM.

The components are built elsewhere and injected; :meth:`HarmoniFuse.build` only wires a config
to their constructors. Only the trained parts (fusion, gate, projector, LoRA, and the encoder
when it is unfrozen) are saved.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from harmonifuse.config import ModelConfig, from_dict, load_yaml, to_yaml
from harmonifuse.decoding import DraftStats
from harmonifuse.inference import analyze as _inference
from harmonifuse.inference.inputs import AudioInput  # noqa: F401 (re-exported)
from harmonifuse.inference.inputs import load_arrays, load_waveforms
from harmonifuse.inference.int8 import int8_parts
from harmonifuse.lengths import lengths_to_mask
from harmonifuse.modules.ctc import EmbeddingCTC, resolve_vocab_chunk
from harmonifuse.modules.encoders import EncoderOutput, SpeechEncoder, build_encoder
from harmonifuse.modules.feature_masking import FeatureMasking
from harmonifuse.modules.fusion import LayerFusion, build_fusion
from harmonifuse.modules.gate import build_gate
from harmonifuse.modules.llm import IGNORE_INDEX, SpeechLLM
from harmonifuse.modules.projector import FrameStackProjector
from harmonifuse.modules.prompt_vectors import PROMPT_ENCODERS
from harmonifuse.modules.vad import SileroVAD
from harmonifuse.pretrained import CONFIG_NAME, WEIGHTS_NAME
from harmonifuse.tasks import tasks_answered_by


@dataclass
class ModelOutput:
    """loss: mean over answer tokens; num_tokens: how many; layer_weights (B, L+1); gate_mean (B,) or None."""

    loss: torch.Tensor
    num_tokens: int
    layer_weights: torch.Tensor
    gate_mean: torch.Tensor | None
    ctc_loss: torch.Tensor | None = None
    """The auxiliary CTC term alone (already included in ``loss``, weighted), for logging."""
    answer_loss: torch.Tensor | None = None
    """``loss`` without the auxiliary terms (None: ``loss`` has none)."""


@dataclass
class SpeechEmbeddings:
    """embeddings (B, N, H) and lengths (B,) for the LLM, plus what the fusion and gate chose."""

    embeddings: torch.Tensor
    lengths: torch.Tensor
    layer_weights: torch.Tensor
    gate_mean: torch.Tensor | None

    @property
    def ctc_input(self) -> torch.Tensor:
        """What the CTC head scores: the projector output, the same the LLM reads."""
        return self.embeddings


class HarmoniFuse(nn.Module):
    def __init__(self, config: ModelConfig, encoder: SpeechEncoder, prompt_encoder: nn.Module, fusion: LayerFusion,
                 gate: nn.Module, projector: FrameStackProjector, llm: SpeechLLM, ctc: EmbeddingCTC | None = None,
                 feature_masking: FeatureMasking | None = None, vad: SileroVAD | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.prompt_encoder = prompt_encoder
        self.fusion = fusion
        self.gate = gate
        self.projector = projector
        self.llm = llm
        self.ctc = ctc if ctc is not None else EmbeddingCTC()
        self.feature_masking = feature_masking if feature_masking is not None else FeatureMasking()
        self.vad = vad
        """Answers ``no_speech`` for audio without speech instead of transcribing it (None: off)."""
        self._segmenter = SileroVAD()  # cuts long recordings when no-speech answers are off (weights load on use)
        self.task_names = config.tasks.task_names
        self.decode_stats = DraftStats()
        """LLM forward passes of transcription and, with ``model.decoding.draft: ctc``, the drafts'
        acceptance, summed since construction (a benchmark resets it: ``model.decode_stats = DraftStats()``)."""

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def build(cls, config: ModelConfig, device: torch.device | str | None = None) -> "HarmoniFuse":
        """Load the pretrained encoder and LLM named by ``config`` and add fresh HarmoniFuse parts (the
        LLM straight onto ``device`` when it is a GPU: :meth:`SpeechLLM.from_pretrained`)."""
        from harmonifuse.assets import resolve_source

        encoder = build_encoder(config.encoder.source, pad_to_30s=config.encoder.pad_to_30s,
                                trainable=config.encoder.trainable)
        c = config.llm
        llm = SpeechLLM.from_pretrained(resolve_source(c.source), lora_rank=c.lora_rank, lora_alpha=c.lora_alpha,
                                        lora_dropout=c.lora_dropout, lora_targets=c.lora_targets,
                                        chat_template=c.chat_template, max_new_tokens=c.max_new_tokens,
                                        attention=c.attention, repetition_penalty=c.repetition_penalty,
                                        frozen_dtype=c.frozen_dtype, device=device)
        return cls.from_parts(config, encoder, llm)

    @classmethod
    def from_parts(cls, config: ModelConfig, encoder: SpeechEncoder, llm: SpeechLLM) -> "HarmoniFuse":
        """Wire fusion, gate, projector and prompt vectors around an encoder and an LLM."""
        llm.repetition_penalty = config.llm.repetition_penalty  # the config rules an LLM built elsewhere too
        prompt_encoder = PROMPT_ENCODERS[config.prompt.vector](llm)
        num_tasks = len(config.tasks.task_names)
        fusion = build_fusion(config.fusion.mode, encoder.num_hidden_states, encoder.hidden_size,
                              prompt_encoder.dim, num_tasks, temperature=config.fusion.temperature,
                              layer_norm=config.fusion.layer_norm)
        gate = build_gate(config.gate.mode, encoder.hidden_size, prompt_encoder.dim)
        p = config.projector
        projector = FrameStackProjector(encoder.hidden_size, llm.hidden_size, stack=p.stack, hidden_size=p.hidden_size,
                                        output_rms=llm.embedding_rms() if p.match_embedding_norm else None)
        vocabulary = llm.model.get_input_embeddings().weight.shape[0]
        c = config.ctc
        ctc = EmbeddingCTC(c.scale, learn_scale=c.learn_scale, blank_size=llm.hidden_size if c.learned_blank else None,
                           vocab_chunk=resolve_vocab_chunk(c.vocab_chunk, vocabulary))
        m = config.feature_masking
        masking = FeatureMasking(m.time_masks, m.time_width, m.channel_masks, m.channel_width)
        v = config.vad
        vad = SileroVAD(v.threshold, v.min_speech_seconds) if v.enabled else None
        return cls(config, encoder, prompt_encoder, fusion, gate, projector, llm, ctc, masking, vad)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | ModelConfig | None = None,
                        overrides: list[str] | None = None, device: torch.device | str | None = None) -> "HarmoniFuse":
        """A saved model folder (or the shipped model's name, "harmonifuse-demo"), a YAML config
        file, or a ModelConfig (fresh, untrained parts); None: $HARMONIFUSE_MODEL, else the model
        shipped in the package. ``device``: where it will run (the frozen LLM's dtype follows it); a
        GPU receives the frozen LLM as it loads, the rest is moved there by the caller."""
        if isinstance(source, ModelConfig):
            return cls.build(source, device)
        from harmonifuse.pretrained import find_model_folder, resolve_model

        source = resolve_model(source)
        path = find_model_folder(source) or Path(source)  # the shipped model also by its name
        if path.is_dir():
            config_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
            for needed in (config_file, weights):  # never answer with untrained parts by accident
                if not needed.is_file():
                    raise FileNotFoundError(f"{path} is not a complete HarmoniFuse model folder: {needed.name} is "
                                            f"missing; copy the whole folder again ({CONFIG_NAME} and {WEIGHTS_NAME})")
            model = cls.build(read_folder_config(config_file, overrides), device)
            model.load_trained(weights)
            return model
        if path.is_file():
            return cls.build(_model_config(load_yaml(path), overrides), device)
        raise FileNotFoundError(f"no model folder or config file at {path}; check the path (a model folder "
                                f"holds {CONFIG_NAME} and {WEIGHTS_NAME})")

    def enable_gradient_checkpointing(self) -> list[str]:
        """``train.gradient_checkpointing``: recompute activations in the backward pass, per layer, in
        the LLM and in a trainable encoder. Returns the parts it reached ("llm", "encoder").

        Non-reentrant, stated rather than left to transformers' default (reentrant on 4.x): reentrant
        checkpointing hides the layers' parameters from DDP's unused-parameter search, which then
        fails with "mark a variable ready only once", and FSDP does not support it."""
        llm = self.llm.model
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(llm, "enable_input_require_grads"):  # the frozen embeddings' output must carry a gradient
            llm.enable_input_require_grads()
        return ["llm"] + (["encoder"] if self.encoder.gradient_checkpointing_enable() else [])

    # -- trained state ------------------------------------------------------------------------------

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that training changes (everything else comes from the base models)."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trained(self, path: str | os.PathLike) -> None:
        """Load trained weights (checksum-verified when they carry one); raises WeightsError."""
        from harmonifuse.weights import WeightsError, load_weights

        state = load_weights(path)
        expected = set(self.trained_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        other = "use the config.yaml saved with these weights, or weights trained with this config"
        if missing or unexpected:
            raise WeightsError(path, f"does not match this model's configuration: missing {sorted(missing)[:5]}, "
                                     f"unexpected {sorted(unexpected)[:5]}", other)
        own = dict(self.named_parameters())
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise WeightsError(path, f"'{name}' has shape {tuple(tensor.shape)}, this model expects "
                                         f"{tuple(own[name].shape)}: the weights were trained with another base "
                                         "model or other sizes", other)
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor)

    def save_pretrained(self, directory: str | os.PathLike, trained: dict[str, torch.Tensor] | None = None) -> Path:
        """Write config.yaml and the trained weights (safetensors) atomically into ``directory``;
        ``trained``: those weights gathered elsewhere (a sharded model's), else :meth:`trained_state_dict`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        from harmonifuse.atomic import atomic_write, atomic_write_text
        from harmonifuse.weights import save_weights

        trained = self.trained_state_dict() if trained is None else trained
        state = {k: v.contiguous().cpu() for k, v in trained.items()}
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_weights(state, tmp))
        atomic_write_text(directory / CONFIG_NAME, config_text(self.config))
        return directory

    def save_config(self, directory: str | os.PathLike) -> Path:
        """Rewrite only config.yaml of a saved model folder (e.g. after calibration); the weights stay."""
        from harmonifuse.atomic import atomic_write_text

        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, config_text(self.config))
        return path

    # -- the forward path -----------------------------------------------------------------------------

    def task_ids(self, tasks: Sequence[str]) -> torch.Tensor:
        unknown = set(tasks) - set(self.task_names)
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}; this model knows {self.task_names}")
        return torch.tensor([self.task_names.index(t) for t in tasks], device=self.llm.device)

    def prompts_for(self, tasks: Sequence[str]) -> list[str]:
        return [self.config.tasks.prompts[t] for t in tasks]

    def encode(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        """waveforms (B, S), lengths (B,) -> hidden states (L+1, B, T, D), frame lengths (B,)."""
        return self.encoder(waveforms, lengths)

    def speech_embeddings(self, hidden_states: torch.Tensor, frame_lengths: torch.Tensor, tasks: Sequence[str],
                          prompts: Sequence[str] | None = None) -> SpeechEmbeddings:
        """hidden states (L+1, B, T, D) -> LLM-width speech embeddings (B, N, H) for each item's task."""
        prompts = list(prompts) if prompts is not None else self.prompts_for(tasks)
        prompt_vectors = self.prompt_encoder(prompts).to(hidden_states.device)
        task_ids = self.task_ids(tasks)
        fused = self.fusion(hidden_states, prompt_vectors, task_ids)
        gated, gate = self.gate(fused, prompt_vectors)
        embeddings, lengths = self.projector(gated, frame_lengths)
        gate_mean = None
        if gate is not None:
            valid = lengths_to_mask(frame_lengths, gate.shape[1]).to(gate.dtype)
            valid = valid if gate.shape[1] > 1 else torch.ones_like(valid[:, :1])
            gate_mean = (gate.mean(-1) * valid).sum(1) / valid.sum(1)
        return SpeechEmbeddings(embeddings, lengths, self.fusion.weights(prompt_vectors, task_ids), gate_mean)

    def _hidden(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of a training batch, cached or from the encoder, masked in training mode:
        (L+1, B, T, D), (B,)."""
        if getattr(batch, "hidden_states", None) is not None:
            hidden, lengths = batch.hidden_states, batch.frame_lengths
        else:
            encoded = self.encode(batch.waveforms, batch.wave_lengths)
            hidden, lengths = encoded.hidden_states, encoded.lengths
        return self.feature_masking(hidden, lengths), lengths

    def _ctc_loss(self, speech: SpeechEmbeddings, tasks: Sequence[str],
                  targets: Sequence[str]) -> tuple[torch.Tensor | None, int]:
        """Embedding-CTC over the items of ``ctc.tasks`` in a batch (None when it has none),
        and the number of target tokens it scored."""
        chosen = [i for i, task in enumerate(tasks) if task in self.config.ctc.tasks]
        if not chosen:
            return None, 0
        index = torch.tensor(chosen, device=speech.embeddings.device)
        token_ids = [self.llm.tokenize(targets[i]) for i in chosen]
        loss = self.ctc(speech.ctc_input[index], speech.lengths[index], token_ids,
                        self.llm.model.get_input_embeddings().weight, blank=self.llm.ctc_blank_id)
        return loss, sum(len(ids) for ids in token_ids)

    def _ctc_speech(self, hidden_states: torch.Tensor, frame_lengths: torch.Tensor, task: str,
                    prompt: str | None) -> SpeechEmbeddings:
        """The projector's CTC input for a whole batch of one task (its training prompt by default)."""
        B = hidden_states.shape[1]
        prompts = [prompt or self.config.tasks.prompts[task]] * B
        return self.speech_embeddings(hidden_states, frame_lengths, [task] * B, prompts)

    def forward(self, batch: Any, prompts: Sequence[str] | None = None, *,
                objective: Literal["answer", "align"] = "answer") -> ModelOutput:
        """Loss on the answer tokens of a batch (cached hidden states or waveforms), each item
        answering ``prompts``, else the batch's own ``prompts``, else its task's prompt; with
        ``objective="align"``, the alignment stage's loss instead (``alignment_loss``). Both go
        through ``forward`` so that DDP's gradient hooks see both stages' steps."""
        if objective == "align":
            return self.alignment_loss(batch)
        hidden, frame_lengths = self._hidden(batch)
        prompts = prompts if prompts is not None else getattr(batch, "prompts", None)
        prompts = list(prompts) if prompts is not None else self.prompts_for(batch.tasks)
        speech = self.speech_embeddings(hidden, frame_lengths, batch.tasks, prompts)
        inputs = self.llm.build_inputs(speech.embeddings, speech.lengths, prompts, list(batch.targets))
        num_tokens = int((inputs.labels[:, 1:] != IGNORE_INDEX).sum())
        loss = self.llm(inputs)
        answer_loss, ctc = loss, None
        weight = self.config.ctc.loss_weight
        if weight > 0 and self.training:
            ctc, _ = self._ctc_loss(speech, batch.tasks, batch.targets)
            if ctc is not None:
                loss = loss + weight * ctc
            else:  # a learned CTC head still joins the graph, as DDP needs every trained parameter to
                loss = loss + sum(p.sum() for p in self.ctc.parameters()) * 0.0
        return ModelOutput(loss, num_tokens, speech.layer_weights, speech.gate_mean, ctc, answer_loss)

    def alignment_loss(self, batch: Any) -> ModelOutput:
        """The embedding-CTC alone on a batch of ``ctc.tasks``: the alignment stage, no LLM pass.

        Trains fusion, gate and projector (a learned CTC scale, a trainable encoder) to put each answer token's
        embedding where the speech carries it, before the LLM has to learn to read them.
        """
        others = sorted(set(batch.tasks) - set(self.config.ctc.tasks))
        if others:
            raise ValueError(f"the alignment stage takes batches of model.ctc.tasks "
                             f"{self.config.ctc.tasks} only, got tasks {others}")
        hidden, frame_lengths = self._hidden(batch)
        speech = self.speech_embeddings(hidden, frame_lengths, batch.tasks, getattr(batch, "prompts", None))
        loss, num_tokens = self._ctc_loss(speech, batch.tasks, batch.targets)
        return ModelOutput(loss, num_tokens, speech.layer_weights, speech.gate_mean, loss)

    @torch.no_grad()
    def ctc_transcribe_hidden(self, hidden_states: torch.Tensor, frame_lengths: torch.Tensor,
                              prompt: str | None = None) -> list[str]:
        """Greedy CTC transcripts straight from the projector, without the LLM: hidden (L+1, B, T, D) -> B texts.

        What the alignment stage has taught the projector; far cheaper than decoding with the LLM.
        """
        speech = self._ctc_speech(hidden_states, frame_lengths, tasks_answered_by("transcript")[0], prompt)
        ids = self.ctc.decode(speech.ctc_input, speech.lengths, self.llm.model.get_input_embeddings().weight,
                              blank=self.llm.ctc_blank_id)
        return [self.llm.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]

    @torch.no_grad()
    def ctc_classify_hidden(self, hidden_states: torch.Tensor, frame_lengths: torch.Tensor,
                            prompt: str | None = None) -> list[dict[str, float]]:
        """Closed-set SER from the projector alone: hidden (L+1, B, T, D) -> B dicts label -> probability.

        Each label word is scored by its CTC likelihood (a softmax over the labels' negative CTC
        losses), as the LLM's label scoring does with its answer likelihood.
        """
        speech = self._ctc_speech(hidden_states, frame_lengths, tasks_answered_by("label")[0], prompt)
        labels = list(self.config.tasks.emotion_labels)
        nll = self.ctc.candidate_nll(speech.ctc_input, speech.lengths, [self.llm.tokenize(x) for x in labels],
                                     self.llm.model.get_input_embeddings().weight, blank=self.llm.ctc_blank_id)
        probs = torch.softmax(-nll, dim=1)  # (B, labels)
        return [dict(zip(labels, row.tolist())) for row in probs]

    @torch.no_grad()
    def task_profiles(self, hidden_states: torch.Tensor, frame_lengths: torch.Tensor,
                      prompts: dict[str, str] | None = None) -> dict[str, dict[str, list[float]]]:
        """What each task reads: its layer weights (L+1,) and mean gate per channel (D,) over the batch."""
        profiles = {}
        B = hidden_states.shape[1]
        for task in self.task_names:
            prompt = (prompts or {}).get(task, self.config.tasks.prompts[task])
            vectors = self.prompt_encoder([prompt] * B).to(hidden_states.device)
            task_ids = self.task_ids([task] * B)
            fused = self.fusion(hidden_states, vectors, task_ids)
            _, gate = self.gate(fused, vectors)
            profile = {"layer_weights": self.fusion.weights(vectors, task_ids)[0].float().tolist()}
            if gate is not None:
                valid = lengths_to_mask(frame_lengths, fused.shape[1])
                valid = valid[..., None].to(gate.dtype) if gate.shape[1] > 1 else torch.ones_like(gate[..., :1])
                profile["gate"] = ((gate * valid).sum((0, 1)) / valid.sum((0, 1))).float().tolist()
            profiles[task] = profile
        return profiles

    # -- inference ----------------------------------------------------------------------------------

    def llm_in(self, dtype: torch.dtype) -> "HarmoniFuse":
        """Store the whole LLM (base, LoRA, embeddings) in ``dtype`` for inference; returns self.

        bf16 on a CPU with bf16 matrix units decodes 8 streams 1.27x faster than float32
        (benchmarks/bench_inference.py); results differ from float32 by bf16 rounding.
        """
        self.llm.model.to(dtype)
        return self

    def ctc_log_probs(self, speech: SpeechEmbeddings) -> tuple[torch.Tensor, int]:
        """The CTC head's log-posteriors over the LLM vocabulary (and a learned blank): (B, N, C), blank class."""
        return self.ctc.log_probs(speech.ctc_input, self.llm.model.get_input_embeddings().weight, self.llm.ctc_blank_id)

    # -- inference: harmonifuse/inference/, bound here (the model is the network; whisper's habit) -----

    analyze = _inference.analyze
    analyze_hidden = _inference.analyze_hidden
    transcribe = _inference.transcribe
    recognize_emotion = _inference.recognize_emotion
    has_speech = _inference.has_speech
    no_speech_answer = _inference.no_speech_answer
    load_arrays = load_arrays
    load_waveforms = load_waveforms
    int8_parts = int8_parts



def config_text(config: ModelConfig) -> str:
    """A model folder's config.yaml text: the config, headed by the version that wrote it."""
    from harmonifuse import __version__

    return f"# written by harmonifuse {__version__}\n" + to_yaml(config)


def read_folder_config(config_file: Path, overrides: list[str] | None) -> ModelConfig:
    """A model folder's config.yaml; a field this version does not know is named with the version
    that wrote the file (a model saved by a newer HarmoniFuse)."""
    import re

    from harmonifuse import __version__
    from harmonifuse.config import ConfigError

    data = load_yaml(config_file)
    try:
        _model_config(data, None)
    except ConfigError as error:
        written = re.match(r"# written by harmonifuse (\S+)", config_file.read_text(errors="replace"))
        hint = ""
        if "is unknown" in str(error):
            by = f"HarmoniFuse {written.group(1)}" if written else "another HarmoniFuse version"
            hint = (f"; the model was saved by {by} and this is {__version__}: upgrade (pip install -U harmonifuse) "
                    "to use it")
        raise ConfigError(f"{config_file}: {error}{hint}") from None
    return _model_config(data, overrides)


def _model_config(data: dict, overrides: list[str] | None) -> ModelConfig:
    """A model folder's config.yaml, or the ``model:`` section of a full training config."""
    from harmonifuse.config import apply_overrides

    if isinstance(data.get("model"), dict):
        data = data["model"]
    return from_dict(ModelConfig, apply_overrides(data, overrides or []), prefix="model")

