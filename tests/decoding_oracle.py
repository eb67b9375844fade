"""Test oracles: the joint CTC/LLM beam search as it was before it was vectorised (git 39254b1,
harmonifuse/decoding.py), kept verbatim apart from names (and float64 kept float64): the CTC prefix scorer's loop over
frames, and the search's Python loop over candidates. The package's versions must give the same
scores and hypotheses (tests/test_decoding.py). And :func:`hf_generate`, transformers' own greedy
``generate`` on the same inputs, which greedy ``SpeechLLM.decode`` must equal."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harmonifuse.decoding import NEG, Hypothesis, StepFn, _duplicate_mask


@dataclass
class LoopCTCPrefixState:
    """The CTC forward variables of each row's prefix g.

    r (T, R, 2): log P(g, its last label emitted by frame t, ending in a non-blank | a blank);
    psi (R,): log P(g is a prefix); last (R,): g's last token (-1: g is empty).
    """

    r: torch.Tensor
    psi: torch.Tensor
    last: torch.Tensor

    def select(self, rows: torch.Tensor, r_new: torch.Tensor, psi_new: torch.Tensor, candidate: torch.Tensor,
               tokens: torch.Tensor) -> LoopCTCPrefixState:
        """The states of the extensions chosen: row ``rows[i]`` extended by its candidate ``candidate[i]``
        (token ``tokens[i]``); ``r_new`` (T, R, K, 2) and ``psi_new`` (R, K) from :meth:`LoopCTCPrefixScorer.score`."""
        return LoopCTCPrefixState(r_new[:, rows, candidate], psi_new[rows, candidate], tokens)


class LoopCTCPrefixScorer:
    """CTC prefix scores, vectorised over rows (utterance x hypothesis) and candidate tokens.

    Args:
        log_probs: (R, T, C) CTC log-posteriors per row: a tensor, or an object that computes the
            columns asked for (``take(index (R, K)) -> (R, T, K)``, ``shape``, ``device``; e.g.
            harmonifuse.modules.ctc.CTCPosteriors, for vocabularies too large to hold (R, T, C)).
        lengths: (R,) valid frames per row.
        blank: the blank's class.
    """

    def __init__(self, log_probs, lengths: torch.Tensor, blank: int) -> None:
        R, T, _ = log_probs.shape
        # the one change: float64 log-posteriors stay float64 (an oracle for both precisions)
        dtype = torch.float64 if getattr(log_probs, "dtype", None) == torch.float64 else torch.float32
        self.x = log_probs.to(dtype).transpose(0, 1) if isinstance(log_probs, torch.Tensor) else None  # (T, R, C)
        self.lazy = None if self.x is not None else log_probs
        device = log_probs.device
        self.lengths = lengths.to(device).long().clamp(min=1)
        self.blank = blank
        self.x_blank = self._columns(torch.full((R, 1), blank, dtype=torch.long, device=device))[..., 0]  # (T, R)
        self.valid = torch.arange(T, device=device)[:, None] < self.lengths[None, :]  # (T, R)

    def _columns(self, index: torch.Tensor) -> torch.Tensor:
        """index (R, K) classes per row -> their log-posteriors (T, R, K)."""
        if self.x is None:
            return self.lazy.take(index).float().transpose(0, 1)
        T = self.x.shape[0]
        return self.x.gather(2, index[None].expand(T, *index.shape))

    def initial_state(self) -> LoopCTCPrefixState:
        """The empty prefix: only blanks so far (r_b = cumulative blank log-probability)."""
        blank = self.x_blank  # (T, R)
        r = torch.stack([torch.full_like(blank, NEG), blank.cumsum(0)], dim=-1)
        R = blank.shape[1]
        return LoopCTCPrefixState(r, blank.new_zeros(R), torch.full((R,), -1, dtype=torch.long, device=blank.device))

    def full_score(self, state: LoopCTCPrefixState) -> torch.Tensor:
        """(R,) log P(exactly the prefix): the score of ending it here (eos)."""
        r_sum = torch.logaddexp(state.r[..., 0], state.r[..., 1])  # (T, R)
        return r_sum.gather(0, (self.lengths - 1)[None])[0]

    def score(self, state: LoopCTCPrefixState, candidates: torch.Tensor,
              eos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix scores of every row's prefix extended by each candidate.

        candidates (R, K) token ids -> psi (R, K) log P(g + c is a prefix) (for ``eos``: log P(exactly
        g)), and the extended forward variables r (T, R, K, 2).
        """
        T, R = self.valid.shape
        K = candidates.shape[1]
        index = candidates if eos is None else candidates.masked_fill(candidates == eos, 0)  # eos: no CTC class
        x_c = self._columns(index)  # (T, R, K)
        x_blank = self.x_blank[..., None]  # (T, R, 1)
        rn_g, rb_g = state.r[..., 0], state.r[..., 1]  # (T, R)
        # phi: probability of g ending before frame t with c allowed next; a repeated label needs a blank between
        phi = torch.logaddexp(rn_g, rb_g)[..., None].expand(T, R, K)
        phi = torch.where((candidates == state.last[:, None])[None], rb_g[..., None], phi)
        rn = x_c.new_full((T, R, K), NEG)
        rb = x_c.new_full((T, R, K), NEG)
        rn[0] = torch.where((state.last < 0)[:, None], x_c[0], torch.full_like(x_c[0], NEG))
        psi = rn[0].clone()
        for t in range(1, T):
            rn[t] = torch.logaddexp(rn[t - 1], phi[t - 1]) + x_c[t]
            rb[t] = torch.logaddexp(rb[t - 1], rn[t - 1]) + x_blank[t]
            psi = torch.where(self.valid[t][:, None], torch.logaddexp(psi, phi[t - 1] + x_c[t]), psi)
        if eos is not None:
            psi = torch.where(candidates == eos, self.full_score(state)[:, None], psi)
        return psi, torch.stack([rn, rb], dim=-1)



@torch.no_grad()
def loop_beam_search(first_logits: torch.Tensor, step: StepFn, *, eos: int, max_new_tokens: int, beam_size: int = 1,
                ctc_weight: float = 0.0, llm_candidates: int = 8, ctc_log_probs: torch.Tensor | None = None,
                ctc_lengths: torch.Tensor | None = None, blank: int | None = None,
                ctc_tokens: list[list[int]] | None = None,
                max_lengths: list[int] | None = None) -> list[Hypothesis]:
    """The best hypothesis per utterance under the joint score.

    Args:
        first_logits: (B, V) the LLM's logits for the first answer token.
        step: the LLM's incremental step (see :data:`StepFn`); rows are utterance-major,
            ``b * beam_size + j``.
        ctc_log_probs: (B, T, C) CTC log-posteriors (a tensor, or columns on demand: see
            :class:`LoopCTCPrefixScorer`) and ``ctc_lengths`` (B,), ``blank`` its class; needed when
            ``ctc_weight > 0``.
        ctc_tokens: per utterance, tokens always scored as candidates (its greedy CTC transcript),
            so that the CTC can propose a word the LLM ranks low.
        max_lengths: per utterance, the most answer tokens before eos is forced (a bound from the
            speech's length: a beam of the LLM alone can otherwise prefer an endless repetition,
            every token of which is nearly certain, to ending).
    """
    B, V = first_logits.shape
    W = beam_size
    R = B * W
    device = first_logits.device
    use_ctc = ctc_weight > 0
    if use_ctc and (ctc_log_probs is None or ctc_lengths is None or blank is None):
        raise ValueError("ctc_weight > 0 needs ctc_log_probs, ctc_lengths and blank")
    logp = first_logits.float().log_softmax(-1).repeat_interleave(W, 0)  # (R, V)
    scores = torch.full((B, W), NEG, device=device)
    scores[:, 0] = 0.0  # one live hypothesis per utterance at the start
    scores = scores.view(R)
    llm_sum = torch.zeros(R, device=device)
    tokens: list[list[int]] = [[] for _ in range(R)]
    scorer = state = None
    if use_ctc:
        scorer = LoopCTCPrefixScorer(ctc_log_probs.repeat_interleave(W, 0), ctc_lengths.repeat_interleave(W, 0), blank)
        state = scorer.initial_state()
    width = max([len(t) for t in ctc_tokens or []] + [0])
    extra = torch.full((B, width + 1), eos, dtype=torch.long, device=device)  # eos is always a candidate
    for b, row in enumerate(ctc_tokens or []):
        extra[b, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    extra = extra.repeat_interleave(W, 0)  # (R, G + 1)
    limits = torch.tensor([min(max_new_tokens, n) for n in (max_lengths or [max_new_tokens] * B)], device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B
    for length in range(max_new_tokens):
        candidates = torch.cat([logp.topk(min(llm_candidates, V), dim=-1).indices, extra], dim=1)  # (R, K)
        K = candidates.shape[1]
        llm_c = logp.gather(1, candidates)  # (R, K)
        total = scores[:, None] + (1.0 - ctc_weight) * llm_c
        if use_ctc:
            psi, r_new = scorer.score(state, candidates, eos)
            total = total + ctc_weight * (psi - state.psi[:, None])
        total = total.masked_fill(_duplicate_mask(candidates), NEG)
        at_limit = (limits <= length).repeat_interleave(W)[:, None]  # (R, 1): only eos may follow
        total = total.masked_fill(at_limit & (candidates != eos), NEG)
        best, index = total.view(B, W * K).topk(min(2 * W, W * K), dim=-1)  # (B, 2W)
        parents, picks = [], []
        for b in range(B):
            live: list[tuple[float, int, int]] = []
            if not done[b]:
                for rank, (s, j) in enumerate(zip(best[b].tolist(), index[b].tolist())):
                    if s <= NEG / 2 or len(live) == W:
                        break
                    row, k = b * W + j // K, j % K
                    if int(candidates[row, k]) == eos:
                        if rank < W:
                            finished[b].append(Hypothesis(list(tokens[row]), s,
                                                          float(llm_sum[row] + llm_c[row, k])))
                    else:
                        live.append((s, row, k))
            if done[b] or not live or (finished[b] and max(h.score for h in finished[b]) >= live[0][0]):
                done[b] = True
            # dead rows keep the shape: they continue row b*W with an impossible score
            live += [(NEG, b * W, K - 1)] * (W - len(live))
            parents += [row for _, row, _ in live]
            picks += [(s, k) for s, _, k in live]
        if all(done):
            break
        rows = torch.tensor(parents, device=device)
        chosen = torch.tensor([k for _, k in picks], device=device)
        new_tokens = candidates[rows, chosen]
        scores = torch.tensor([s for s, _ in picks], device=device)
        llm_sum = llm_sum[rows] + llm_c[rows, chosen]
        tokens = [tokens[r] + [int(t)] for r, t in zip(parents, new_tokens.tolist())]
        if use_ctc:
            state = state.select(rows, r_new, psi, chosen, new_tokens)
        logp = step(new_tokens, rows).float().log_softmax(-1)
    else:  # the length limit: the live hypotheses end unfinished
        for b in range(B):
            if not done[b]:
                for j in range(W):
                    row = b * W + j
                    if float(scores[row]) > NEG / 2:
                        finished[b].append(Hypothesis(list(tokens[row]), float(scores[row]), float(llm_sum[row]),
                                                      finished=False))
    return [max(hyps, key=lambda h: h.score) if hyps else Hypothesis([], NEG, 0.0, finished=False)
            for hyps in finished]


@torch.no_grad()
def hf_generate(llm, speech: torch.Tensor, speech_lengths: torch.Tensor, prompts: list[str],
                max_new_tokens: int | None = None) -> list[str]:
    """transformers' greedy decoding with the KV cache, batched (left padded), of a SpeechLLM."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    inputs = llm.build_inputs(speech, speech_lengths, prompts, left_pad=True)
    # the penalty as our own processor: transformers' built-in one skips as many generated tokens
    # as a row has left padding when the prompt comes as embeddings (transformers 5.x)
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(float(llm.repetition_penalty))]
                                     if llm.repetition_penalty != 1.0 else [])
    generated = llm.model.generate(
        inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
        max_new_tokens=max_new_tokens or llm.max_new_tokens, do_sample=False, num_beams=1,
        logits_processor=processors, eos_token_id=llm.eos_token_id, pad_token_id=llm.pad_token_id)
    return [text.strip() for text in llm.tokenizer.batch_decode(generated, skip_special_tokens=True)]
