"""The causal LLM that reads speech embeddings and answers the task prompt.

Layout of one sequence (chat template when the tokenizer has one):

    [chat prefix] [speech embeddings] [prompt tokens] [assistant prefix] -> [answer tokens] [eos]

The LLM is frozen; LoRA adapters (peft) are its only trained weights.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from harmonifuse.decoding import Hypothesis, beam_search

SPEECH_MARK = "<<speech>>"
IGNORE_INDEX = -100


@dataclass
class LLMInputs:
    """inputs_embeds (B, N, H), attention_mask (B, N), position_ids (B, N), labels (B, N) or None."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None = None


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) -> (K,) the positions whose next token is an answer token in some row."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


class SpeechLLM(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, *, chat_template: bool = True, max_new_tokens: int = 96) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.use_chat_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.max_new_tokens = max_new_tokens
        self.generate_options: dict = {}
        """Extra keyword arguments for transformers' generate, e.g. a static KV cache (see benchmarks)."""
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._layouts: dict[str, tuple[list[int], list[int]]] = {}
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # transformers 5 renamed the KV-cache argument (the old name still works but warns)
        self._cache_arg = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
        # CTC blank: a special token that never occurs in a transcript (the first one the tokenizer has)
        specials = sorted(set(tokenizer.all_special_ids) - {self.eos_token_id}) or [self.pad_token_id]
        self.ctc_blank_id = specials[0]

    @classmethod
    def from_pretrained(cls, path: str, *, lora_rank: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                        lora_targets: list[str] | None = None, chat_template: bool = True,
                        max_new_tokens: int = 96, attention: str = "sdpa") -> "SpeechLLM":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
        return cls.wrap(model, tokenizer, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        lora_targets=lora_targets, chat_template=chat_template, max_new_tokens=max_new_tokens)

    @classmethod
    def wrap(cls, model: nn.Module, tokenizer, *, lora_rank: int = 8, lora_alpha: float = 16.0,
             lora_dropout: float = 0.0, lora_targets: list[str] | None = None, chat_template: bool = True,
             max_new_tokens: int = 96) -> "SpeechLLM":
        """Freeze ``model`` and add LoRA adapters (rank 0: no adapters)."""
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                              target_modules=list(lora_targets or ["q_proj", "v_proj"]), task_type="CAUSAL_LM")
            model = get_peft_model(model, lora)
        return cls(model, tokenizer, chat_template=chat_template, max_new_tokens=max_new_tokens)

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
        """Token ids before and after the speech for ``prompt``: (prefix, suffix)."""
        if prompt not in self._layouts:
            if self.use_chat_template:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": SPEECH_MARK + prompt}], tokenize=False, add_generation_prompt=True)
                before, _, after = text.partition(SPEECH_MARK)
            else:
                before, after = "", " " + prompt + "\n"
            prefix = self.tokenize(before)
            if not self.use_chat_template and self.tokenizer.bos_token_id is not None:
                prefix = [self.tokenizer.bos_token_id] + prefix
            self._layouts[prompt] = (prefix, self.tokenize(after))
        return self._layouts[prompt]

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
    def generate(self, speech: torch.Tensor, speech_lengths: torch.Tensor, prompts: list[str],
                 max_new_tokens: int | None = None) -> list[str]:
        """Greedy decoding with the KV cache, batched (left padded)."""
        inputs = self.build_inputs(speech, speech_lengths, prompts, left_pad=True)
        generated = self.model.generate(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
            max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, **self.generate_options)
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    @torch.no_grad()
    def decode(self, speech: torch.Tensor, speech_lengths: torch.Tensor, prompts: list[str], *,
               beam_size: int = 1, ctc_weight: float = 0.0, llm_candidates: int = 8,
               ctc_log_probs: torch.Tensor | None = None, ctc_lengths: torch.Tensor | None = None,
               blank: int | None = None, ctc_tokens: list[list[int]] | None = None,
               max_new_tokens: int | None = None, max_tokens_per_position: float | None = 1.0) -> list[Hypothesis]:
        """Joint CTC/LLM beam search (harmonifuse/decoding.py) with the KV cache: one hypothesis per item.

        speech (B, N, H), speech_lengths (B,); ``ctc_log_probs`` (B, T, C) and ``ctc_lengths`` (B,)
        when ``ctc_weight > 0``. Beam 1 without CTC is greedy decoding, token for token what
        :meth:`generate` returns (up to the length bound). ``max_tokens_per_position``: at most this many
        answer tokens per speech position (1.0 at the projector's 10 positions per second is 10 tokens
        per second, twice fast speech; None: only ``max_new_tokens``).
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

        def step(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
            nonlocal mask, position
            if not torch.equal(parents, rows):  # greedy rows never move: spare copying the cache
                cache.reorder_cache(parents)
                mask, position = mask[parents], position[parents]
            mask = torch.cat([mask, mask.new_ones(len(parents), 1)], dim=1)
            logits = self.model(inputs_embeds=self.embed(tokens[:, None]), attention_mask=mask,
                                position_ids=position[:, None], use_cache=True, **{self._cache_arg: cache}).logits
            position = position + 1
            return logits[:, -1]

        return beam_search(out.logits[:, -1], step, eos=self.eos_token_id,
                           max_new_tokens=max_new_tokens or self.max_new_tokens, beam_size=beam_size,
                           ctc_weight=ctc_weight, llm_candidates=llm_candidates, ctc_log_probs=ctc_log_probs,
                           ctc_lengths=ctc_lengths, blank=blank, ctc_tokens=ctc_tokens,
                           max_lengths=None if max_tokens_per_position is None else
                           [max(1, int(n * max_tokens_per_position)) for n in speech_lengths.tolist()])

    def _cache_of(self, output):
        return getattr(output, self._cache_arg)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @torch.no_grad()
    def score_labels(self, speech: torch.Tensor, speech_lengths: torch.Tensor, prompts: list[str],
                     labels: list[str]) -> torch.Tensor:
        """Log-probability of every label (its tokens and eos) as the answer: (B, K).

        The context (prompt + speech) runs once per item; its KV cache is then shared by the K label
        continuations, which are a few tokens each: about K times cheaper than K full rows.
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
                                use_cache=True, **{self._cache_arg: cache})
            logprobs = follow.logits[:, :-1].float().log_softmax(-1)  # predicts label tokens 1..W-1
            picked = logprobs.gather(-1, rows_ids[:, 1:, None])[..., 0] * rows_valid[:, 1:]
            scores = scores + picked.sum(-1).view(B, K)
        return scores
