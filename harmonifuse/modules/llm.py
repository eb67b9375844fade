"""The causal LLM that reads speech embeddings and answers the task prompt.

Layout of one sequence (chat template when the tokenizer has one):

    [chat prefix] [speech embeddings] [prompt tokens] [assistant prefix] -> [answer tokens] [eos]

The LLM is frozen; LoRA adapters (peft) are its only trained weights.

Decoding is ours alone: the base model's own generation settings (an instruct model's
``generation_config.json`` sets sampling, temperature, top-p and often a repetition penalty) are
dropped when it is wrapped, so greedy decoding is the argmax at every step unless
``model.llm.repetition_penalty`` asks for a penalty.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from harmonifuse.decoding import CTCScores, DraftStats, Hypothesis, beam_search, draft_greedy_search

SPEECH_MARK = "<<speech>>"
IGNORE_INDEX = -100
CHAT_DATE = "26 Jul 2024"
"""The ``date_string`` every chat template is rendered with: Llama 3.x templates otherwise write
today's date ("Today Date: ...", from ``strftime_now``) into the prefix, so the model would read
a different prefix every day. This is the Llama 3.1 template's own default; others ignore it."""


@dataclass
class LLMInputs:
    """inputs_embeds (B, N, H), attention_mask (B, N), position_ids (B, N), labels (B, N) or None."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None = None


def resolve_frozen_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """``model.llm.frozen_dtype`` -> a torch dtype: auto is bfloat16 when the model will run on a GPU
    (``device``; None: whenever CUDA is available) that computes in bf16 natively (Ampere or later),
    else float32."""
    if name == "auto":
        from harmonifuse.device import native_bf16

        if device is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        on_gpu = device is not None and torch.device(device).type == "cuda"
        return torch.bfloat16 if on_gpu and native_bf16(torch.device(device)) else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"model.llm.frozen_dtype must be auto, float32 or bfloat16, got {name!r}")
    return dtypes[name]


INT8_KEEP_FLOAT = ("down_proj",)
"""Linear layers :meth:`SpeechLLM.int8_copy` leaves in float: the MLP's output projection reads the
"massive activations" of Llama-family models (Sun et al., 2024; on the shipped model up to 61,000
times the median magnitude, in layers 11 and 28), which int8 activations quantised per tensor
flatten. Every Linear in int8 cost the shipped model 0.48 WER against float32's 0.38 on 16 test
clips (beam 4); with these float, 0.39-0.40, at about the same speed (docs/research/results.md)."""


def quantize_linears(module: nn.Module, keep_float: tuple[str, ...] = ()) -> nn.Module:
    """``module`` with its nn.Linear layers replaced, in place, by dynamically quantised ones (int8
    weights per output channel, activations quantised per call: torch.ao.quantization.quantize_dynamic;
    CPU only), except those whose name ends with one of ``keep_float``. A tied output layer becomes
    an int8 copy; the embedding table stays float."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    chosen = {name: per_channel_dynamic_qconfig for name, m in module.named_modules()
              if isinstance(m, nn.Linear) and not name.endswith(keep_float)}
    with warnings.catch_warnings():  # torch.ao's own deprecation notices (quantised tensors still work)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*")
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        return quantize_dynamic(module, chosen, inplace=True)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) -> (K,) the positions whose next token is an answer token in some row."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


class SpeechLLM(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, *, chat_template: bool = True, max_new_tokens: int = 96,
                 repetition_penalty: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.use_chat_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.max_new_tokens = max_new_tokens
        self.repetition_penalty = repetition_penalty
        """transformers' repetition penalty (1.0: none), in :meth:`generate` and :meth:`decode` alike."""
        self.generate_options: dict = {}
        """Extra keyword arguments for transformers' generate, e.g. a static KV cache (see benchmarks)."""
        self.lockstep = False
        """The processes of the default process group decode together, each forward a collective (an LLM
        sharded by fsdp): :meth:`decode` and :meth:`generate` then run as many forward passes on every
        rank, a rank whose search has ended running idle ones until every rank's has."""
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._layouts: dict[str, tuple[list[int], list[int]]] = {}
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base_generation_config = getattr(base, "generation_config", None)
        """The base model's own generation settings, kept for reference only; generate never reads them."""
        if self.base_generation_config is not None:
            from transformers import GenerationConfig

            # generate() fills every setting left unset from the model's config (sampling, temperature,
            # top-p, repetition penalty of instruct models): keep only the special tokens
            ids = {k: getattr(self.base_generation_config, k, None)
                   for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            base.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
        # transformers 5 renamed the KV-cache argument (the old name still works but warns)
        self._cache_arg = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
        # CTC blank: a special token that never occurs in a transcript (the first one the tokenizer has)
        specials = sorted(set(tokenizer.all_special_ids) - {self.eos_token_id}) or [self.pad_token_id]
        self.ctc_blank_id = specials[0]

    @classmethod
    def from_pretrained(cls, path: str, *, lora_rank: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                        lora_targets: list[str] | None = None, chat_template: bool = True,
                        max_new_tokens: int = 96, attention: str = "sdpa", repetition_penalty: float = 1.0,
                        frozen_dtype: str = "float32", device: torch.device | str | None = None) -> "SpeechLLM":
        """``frozen_dtype``: float32, bfloat16, or auto (bfloat16 when ``device`` is a GPU); the frozen
        weights load in it directly (a 7B model: 14 GB instead of 28), the LoRA adapters stay float32.
        On a GPU ``device`` they load straight onto it, tensor by tensor, never whole in host memory
        (eight ranks of a node would otherwise hold eight copies of the LLM in host memory at once)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        on_gpu = device is not None and torch.device(device).type == "cuda"
        placement = {"device_map": {"": torch.device(device)}} if on_gpu else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_frozen_dtype(frozen_dtype, device),
                                                     attn_implementation=attention, **placement)
        return cls.wrap(model, tokenizer, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        lora_targets=lora_targets, chat_template=chat_template, max_new_tokens=max_new_tokens,
                        repetition_penalty=repetition_penalty)

    @classmethod
    def wrap(cls, model: nn.Module, tokenizer, *, lora_rank: int = 8, lora_alpha: float = 16.0,
             lora_dropout: float = 0.0, lora_targets: list[str] | None = None, chat_template: bool = True,
             max_new_tokens: int = 96, repetition_penalty: float = 1.0) -> "SpeechLLM":
        """Freeze ``model`` and add LoRA adapters (rank 0: no adapters), float32 whatever the frozen
        weights' dtype (peft's ``autocast_adapter_dtype``, stated here because it is what we rely on)."""
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                              target_modules=list(lora_targets or ["q_proj", "v_proj"]), task_type="CAUSAL_LM")
            with warnings.catch_warnings():  # peft asks transformers a deprecated question on every load
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = get_peft_model(model, lora, autocast_adapter_dtype=True)
        return cls(model, tokenizer, chat_template=chat_template, max_new_tokens=max_new_tokens,
                   repetition_penalty=repetition_penalty)

    # -- basic accessors ------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def embedding_rms(self) -> float:
        """Root mean square of the input embedding table's entries: the scale text enters the LLM at."""
        table = self.model.get_input_embeddings().weight.detach().float()
        return float(table.pow(2).mean().sqrt())

    def store_frozen_linears_in(self, dtype: torch.dtype) -> int:
        """Keep the frozen Linear weights in ``dtype`` (the tied embedding excepted); returns how many.

        Under autocast to ``dtype`` every matmul casts its fp32 weight anew, on every call; a weight
        stored in ``dtype`` gives bit-identical results without those copies (3-15 % of a CPU
        training step here, depending on the attention kernel). Afterwards the model must run
        under that autocast.
        """
        embedding = self.model.get_input_embeddings().weight
        count = 0
        for module in self.model.modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad and module.weight is not embedding:
                module.weight.data = module.weight.data.to(dtype)
                count += 1
        return count

    def int8_copy(self) -> "SpeechLLM":
        """A copy for CPU inference: LoRA merged into the frozen weights (one Linear per projection),
        then its Linear layers in dynamic int8 (:func:`quantize_linears`) but for
        :data:`INT8_KEEP_FLOAT`. This model is left as it is."""
        import copy

        model = copy.deepcopy(self.model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        clone = SpeechLLM(quantize_linears(model.float(), INT8_KEEP_FLOAT), self.tokenizer,
                          chat_template=self.use_chat_template, max_new_tokens=self.max_new_tokens,
                          repetition_penalty=self.repetition_penalty)
        clone.generate_options = dict(self.generate_options)
        return clone

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def embed(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """token ids (N,) -> embeddings (N, H)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.model.get_input_embeddings()(ids)

    @contextlib.contextmanager
    def base_model_only(self):
        """Run the frozen base LLM without its adapters."""
        disable = getattr(self.model, "disable_adapter", None)
        with (disable() if disable is not None else contextlib.nullcontext()):
            yield

    # -- layout -----------------------------------------------------------------------------------

    def layout(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the speech for ``prompt``: (prefix, suffix).

        With a chat template, the prefix is what the template renders (with the fixed
        :data:`CHAT_DATE`: the same every day), holding the BOS exactly once when the tokenizer puts
        one before every text (Llama 3.x renders it itself; Qwen2.5 and SmolLM2 have none to add).
        """
        if prompt not in self._layouts:
            bos = self.tokenizer.bos_token_id
            if self.use_chat_template:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": SPEECH_MARK + prompt}], tokenize=False, add_generation_prompt=True,
                    date_string=CHAT_DATE)
                before, _, after = text.partition(SPEECH_MARK)
                prefix = self.tokenize(before)
                if bos is not None and self._tokenizer_adds_bos():
                    while prefix[:2] == [bos, bos]:
                        prefix = prefix[1:]
                    prefix = prefix if prefix[:1] == [bos] else [bos] + prefix
            else:
                before, after = "", " " + prompt + "\n"
                prefix = ([bos] if bos is not None else []) + self.tokenize(before)
            self._layouts[prompt] = (prefix, self.tokenize(after))
        return self._layouts[prompt]

    def _tokenizer_adds_bos(self) -> bool:
        """Whether the tokenizer starts every text with its BOS (what the model was trained on)."""
        ids = self.tokenizer("a")["input_ids"]
        return bool(ids) and ids[0] == self.tokenizer.bos_token_id

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenize(answer) + [self.eos_token_id]

    def build_inputs(self, speech: torch.Tensor, speech_lengths: torch.Tensor, prompts: list[str],
                     answers: list[str] | list[list[int]] | None = None, *, left_pad: bool = False) -> LLMInputs:
        """Assemble one sequence per item.

        speech (B, N, H), speech_lengths (B,); answers as text or token ids (None for generation).
        Right padding for training and scoring, left padding for generation.
        """
        rows, label_rows = [], []
        dtype = self.model.get_input_embeddings().weight.dtype
        for i, prompt in enumerate(prompts):
            prefix, suffix = self.layout(prompt)
            parts = [self.embed(prefix), speech[i, : int(speech_lengths[i])].to(dtype), self.embed(suffix)]
            labels = [IGNORE_INDEX] * (len(prefix) + int(speech_lengths[i]) + len(suffix))
            if answers is not None:
                answer = answers[i]
                ids = self.answer_ids(answer) if isinstance(answer, str) else list(answer)
                parts.append(self.embed(ids))
                labels += ids
            rows.append(torch.cat(parts))
            label_rows.append(labels)
        lengths = [row.shape[0] for row in rows]
        width, B, H = max(lengths), len(rows), rows[0].shape[1]
        embeds = rows[0].new_zeros(B, width, H)
        mask = torch.zeros(B, width, dtype=torch.long, device=embeds.device)
        labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long, device=embeds.device)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            span = slice(width - n, width) if left_pad else slice(0, n)
            embeds[i, span] = row
            mask[i, span] = 1
            labels[i, span] = torch.tensor(label_rows[i], device=embeds.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return LLMInputs(embeds, mask, positions, labels if answers is not None else None)

    # -- training, generation, scoring ------------------------------------------------------------

    def forward(self, inputs: LLMInputs) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer tokens.

        Only the positions that predict an answer token in some row reach the vocabulary projection
        (``logits_to_keep``): answers are a fraction of each sequence, and (B, T, V) logits with
        V = 49k would cost a large share of the step.
        """
        targets = inputs.labels[:, 1:]  # (B, T-1): the token each position predicts
        keep = answer_positions(inputs.labels)  # (K,)
        out = self.model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                         position_ids=inputs.position_ids, logits_to_keep=keep)
        logits = out.logits.float()  # (B, K, V)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, keep].reshape(-1),
                                           ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def decode(self, speech: torch.Tensor, speech_lengths: torch.Tensor, prompts: list[str], *,
               beam_size: int = 1, ctc_weight: float = 0.0, llm_candidates: int = 8, ctc: CTCScores | None = None,
               max_new_tokens: int | None = None, max_tokens_per_position: float | None = 1.0,
               drafts: list[list[int]] | None = None, draft_tokens: int = 4,
               stats: DraftStats | None = None) -> list[Hypothesis]:
        """Joint CTC/LLM beam search (harmonifuse/decoding.py) with the KV cache: one hypothesis per item.

        speech (B, N, H), speech_lengths (B,); ``ctc``: the CTC head's scores, needed when
        ``ctc_weight > 0``. Beam 1 without CTC is greedy decoding, token for token what
        :meth:`generate` returns (up to the length bound). ``max_tokens_per_position``: at most this many
        answer tokens per speech position (1.0 at the projector's 10 positions per second is 10 tokens
        per second, twice fast speech; None: only ``max_new_tokens``).

        ``drafts`` (beam 1 only): a draft answer per item (its greedy CTC tokens): the same answer in
        fewer forward passes, each checking up to ``draft_tokens`` draft tokens at once
        (:func:`~harmonifuse.decoding.draft_greedy_search`). ``stats``: forward passes and drafts
        counted into it.
        """
        context = self.build_inputs(speech, speech_lengths, prompts, left_pad=True)
        out = self.model(inputs_embeds=context.inputs_embeds, attention_mask=context.attention_mask,
                         position_ids=context.position_ids, use_cache=True, logits_to_keep=1)
        cache = self._cache_of(out)
        if beam_size > 1:
            cache.batch_repeat_interleave(beam_size)
        mask = context.attention_mask.repeat_interleave(beam_size, 0)  # (R, N)
        position = mask.sum(-1)  # (R,) the next token's position
        rows = torch.arange(len(mask), device=mask.device)
        penalty = self.repetition_penalty
        # (R, V) the tokens each row has generated: transformers' penalty reads the generated ids only
        # when the prompt comes as embeddings
        seen = None if penalty == 1.0 else torch.zeros(len(mask), out.logits.shape[-1], dtype=torch.bool,
                                                        device=mask.device)

        def step(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
            nonlocal mask, position, seen
            if self.lockstep:
                self._any_rank_decoding(True)
            if not torch.equal(parents, rows):  # greedy rows never move: spare copying the cache
                cache.reorder_cache(parents)
                mask, position = mask[parents], position[parents]
                seen = seen[parents] if seen is not None else None
            mask = torch.cat([mask, mask.new_ones(len(parents), 1)], dim=1)
            logits = self.model(inputs_embeds=self.embed(tokens[:, None]), attention_mask=mask,
                                position_ids=position[:, None], use_cache=True, **{self._cache_arg: cache}).logits
            position = position + 1
            logits = logits[:, -1]
            if seen is not None:
                seen[rows, tokens] = True
                penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
                logits = torch.where(seen, penalised, logits)
            return logits

        previous = {"n": 0, "seen": None}  # the last block verify read: its width, the tokens seen through each

        def verify(tokens: torch.Tensor, widths: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
            """tokens (B, n), widths (B,), kept (B,) -> logits (B, n, V) (see decoding.VerifyFn). A token
            not kept stays in the cache, masked out: the attention never reads it again."""
            nonlocal mask, position, seen
            if self.lockstep:
                self._any_rank_decoding(True)
            n_prev = previous["n"]
            if n_prev:
                keep = (torch.arange(n_prev, device=mask.device)[None] < kept[:, None]).long()  # (B, n_prev)
                mask = torch.cat([mask[:, :-n_prev], mask[:, -n_prev:] * keep], dim=1)
                position = position + kept
                if seen is not None:
                    seen = seen | previous["seen"][rows, kept - 1]
                used = int(mask.any(0).nonzero().max()) + 1  # columns no row reads any more: off the cache
                if used < mask.shape[1] and hasattr(cache, "crop"):
                    cache.crop(used - mask.shape[1])
                    mask = mask[:, :used]
            n = tokens.shape[1]
            offsets = torch.arange(n, device=mask.device)[None]
            mask = torch.cat([mask, (offsets < widths[:, None]).long()], dim=1)
            logits = self.model(inputs_embeds=self.embed(tokens), attention_mask=mask,
                                position_ids=position[:, None] + offsets, use_cache=True,
                                **{self._cache_arg: cache}).logits  # (B, n, V)
            previous["n"] = n
            if seen is not None:  # the penalty at block position j: the tokens generated and block[0..j]
                read = torch.zeros_like(logits, dtype=torch.bool).scatter_(2, tokens[..., None], True)
                read = read.cummax(1).values  # (B, n, V)
                previous["seen"] = read
                penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
                logits = torch.where(seen[:, None] | read, penalised, logits)
            return logits

        search = dict(eos=self.eos_token_id, max_new_tokens=max_new_tokens or self.max_new_tokens,
                      ctc_weight=ctc_weight, llm_candidates=llm_candidates, ctc=ctc,
                      max_lengths=None if max_tokens_per_position is None else
                      [max(1, int(n * max_tokens_per_position)) for n in speech_lengths.tolist()])
        if drafts is not None and beam_size == 1:
            hypotheses = draft_greedy_search(out.logits[:, -1], verify, drafts=drafts, draft_tokens=draft_tokens,
                                             stats=stats, **search)
        else:
            steps = [0]

            def counted_step(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
                steps[0] += 1
                return step(tokens, parents)

            hypotheses = beam_search(out.logits[:, -1], counted_step, beam_size=beam_size, **search)
            if stats is not None:  # step by step: one token per utterance and forward pass
                stats.forwards += steps[0]
                stats.row_passes += steps[0] * len(prompts)
        if self.lockstep:
            while self._any_rank_decoding(False):  # the others still decode: join their forward passes
                self._idle_forward()
        return hypotheses

    def _any_rank_decoding(self, decoding: bool) -> bool:
        """One round of lock-step decoding: whether any rank still decodes (this rank's flag, all-reduced);
        every rank then runs one forward pass, a real step or :meth:`_idle_forward`."""
        import torch.distributed as dist

        flag = torch.tensor([float(decoding)], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)

    @torch.no_grad()
    def _idle_forward(self) -> None:
        """A one-token forward pass whose result nobody reads: the collectives of a decoding step (under
        fsdp, each decoder layer's gathering) for a rank that has nothing left to decode."""
        table = self.model.get_input_embeddings().weight
        self.model(inputs_embeds=table.new_zeros(1, 1, table.shape[1]), use_cache=False, logits_to_keep=1)

    def _cache_of(self, output):
        return getattr(output, self._cache_arg)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @torch.no_grad()
    def score_labels(self, speech: torch.Tensor, speech_lengths: torch.Tensor, prompts: list[str],
                     labels: list[str]) -> torch.Tensor:
        """Log-probability of every label (its tokens and eos) as the answer: (B, K).

        The context (prompt + speech) runs once per item; its KV cache is then shared by the K label
        continuations, which are a few tokens each: about K times cheaper than K full rows. Only the
        logits that predict a label token reach the vocabulary projection (the context's last
        position, the continuations' all but last): with a 128-152k vocabulary, logits over the
        whole context would dwarf the rest of the pass.
        """
        B, K = len(prompts), len(labels)
        label_ids = [self.answer_ids(label) for label in labels]
        context = self.build_inputs(speech, speech_lengths, prompts, left_pad=True)
        out = self.model(inputs_embeds=context.inputs_embeds, attention_mask=context.attention_mask,
                         position_ids=context.position_ids, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): every label's first token
        width = max(len(ids) for ids in label_ids)
        ids = torch.full((K, width), self.pad_token_id, dtype=torch.long, device=self.device)
        valid = torch.zeros(K, width, dtype=torch.bool, device=self.device)
        for k, row in enumerate(label_ids):
            ids[k, : len(row)] = torch.tensor(row, device=self.device)
            valid[k, : len(row)] = True
        scores = first.gather(1, ids[:, 0].expand(B, K))  # (B, K)
        if width > 1:
            cache = self._cache_of(out)
            cache.batch_repeat_interleave(K)  # row b*K + k continues item b with label k
            rows_ids, rows_valid = ids.repeat(B, 1), valid.repeat(B, 1)  # (B*K, W)
            mask = torch.cat([context.attention_mask.repeat_interleave(K, 0), rows_valid.long()], dim=1)
            start = context.attention_mask.sum(-1).repeat_interleave(K)[:, None]
            positions = start + torch.arange(width, device=self.device)[None, :]
            follow = self.model(inputs_embeds=self.embed(rows_ids), attention_mask=mask, position_ids=positions,
                                use_cache=True, logits_to_keep=torch.arange(width - 1, device=self.device),
                                **{self._cache_arg: cache})
            logits = follow.logits.float()  # (B*K, W-1, V): predicts label tokens 1..W-1
            picked = logits.gather(-1, rows_ids[:, 1:, None])[..., 0] - logits.logsumexp(-1)
            picked = picked * rows_valid[:, 1:]
            scores = scores + picked.sum(-1).view(B, K)
        return scores
