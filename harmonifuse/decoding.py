"""Joint CTC/LLM beam search: ESPnet's hybrid CTC/attention decoding with the LLM as the decoder.

Each hypothesis h is scored as

    score(h) = (1 - w) * log p_LLM(h | speech, prompt) + w * log p_CTC(h as a prefix | speech)

where p_CTC is the projector's embedding-CTC head, which predicts the LLM's own vocabulary. The
CTC prefix probability sums over every alignment of h to the speech frames, so a word the speech
does not carry lowers it sharply whatever the LLM's prior says: the guard against invented words.
At the end of a hypothesis (eos) the prefix probability becomes the probability of exactly h.

Both terms only fall as a hypothesis grows, so a beam can stop as soon as its best finished
hypothesis scores at least as high as its best live one (exact end detection, no length rule).

With beam 1 the same search can run on drafts (:func:`draft_greedy_search`): the CTC head's
greedy transcript proposes the next tokens, the LLM checks several in one forward pass, and the
answer stays the step-by-step one.

References: Watanabe et al., "Hybrid CTC/Attention Architecture for End-to-End Speech
Recognition" (IEEE JSTSP 2017), Algorithm 2 (the CTC prefix score); Leviathan et al., "Fast
Inference from Transformers via Speculative Decoding" (ICML 2023), here with greedy acceptance
and the CTC transcript as the draft.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from harmonifuse.cancellation import checkpoint

NEG = -1e10
"""Log-probability of the impossible: finite, so differences of two impossible scores stay finite."""


@dataclass
class CTCPrefixState:
    """The CTC forward variables of each row's prefix g.

    r (T, R, 2): log P(g, its last label emitted by frame t, ending in a non-blank | a blank);
    psi (R,): log P(g is a prefix); last (R,): g's last token (-1: g is empty).
    """

    r: torch.Tensor
    psi: torch.Tensor
    last: torch.Tensor


_FAR = 80.0
"""Terms more than this many nats below the largest count as e^-80 (~1e-35, nothing to a float32
sum that holds a 1): their exact exponentials would be subnormal floats, which x86 CPUs compute
tens of times slower."""


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.logaddexp of finite a, b without subnormal intermediates (see :data:`_FAR`)."""
    return torch.maximum(a, b) + (a - b).abs().clamp(max=_FAR).neg().exp().log1p()


def _logsumexp0(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 0 (T, ...) without subnormal intermediates; a -inf entry counts as e^-80
    below the largest, i.e. nothing (all -inf: about NEG, impossible)."""
    top = z.amax(0).clamp(min=NEG)
    return top + (z - top).clamp(min=-_FAR).exp().sum(0).log()


def _log_cumsum(z: torch.Tensor) -> torch.Tensor:
    """log(cumsum(exp(z))) over the frames (dim 0), an entry <= NEG / 2 counting as impossible
    (probability 0): -inf where every term so far is."""
    return z.masked_fill(z <= NEG / 2, float("-inf")).logcumsumexp(0)


class CTCPrefixScorer:
    """CTC prefix scores, vectorised over rows (utterance x hypothesis), candidate tokens and frames.

    :meth:`score` gives the prefix score of every candidate extension, a reduction over the frames;
    :meth:`extend` the forward variables of the few extensions a search keeps, a scan over the
    frames. (Carrying the forward variables of all K candidates, of which a beam keeps W, cost K / W
    times the work.)

    Args:
        log_probs: (B, T, C) CTC log-posteriors per utterance: a tensor, or an object that computes
            the columns asked for (``take(index (B, K)) -> (B, T, K)``, ``shape``, ``device``; e.g.
            harmonifuse.modules.ctc.CTCPosteriors, for vocabularies too large to hold (B, T, C)).
            Scores and states are float64 for float64 log-posteriors, else float32.
        lengths: (B,) valid frames per utterance.
        blank: the blank's class.
        repeats: rows per utterance (the beam): row r reads utterance r // repeats, sharing its
            log-posteriors (no copy).
    """

    def __init__(self, log_probs, lengths: torch.Tensor, blank: int, repeats: int = 1) -> None:
        B, T, _ = log_probs.shape
        device = log_probs.device
        self.log_probs = log_probs
        self.dtype = torch.float64 if getattr(log_probs, "dtype", None) == torch.float64 else torch.float32
        self.repeats = repeats
        # the scans subtract running sums of log-probabilities (thousands of nats over a long
        # utterance) and add them back: float64 keeps that exact to ~1e-12, float32 would lose ~1e-3
        self.scan_dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
        self.lengths = lengths.to(device).long().clamp(min=1).repeat_interleave(repeats)  # (R,)
        self.blank = blank
        R = B * repeats
        self.x_blank = self._columns(torch.full((R, 1), blank, dtype=torch.long, device=device))[..., 0]  # (T, R)
        # a log-probability of -inf would make the running sums -inf - -inf: NEG is as impossible and finite
        self.blank_cum = self.x_blank.to(self.scan_dtype).clamp(min=NEG).cumsum(0)  # (T, R)
        self.valid = torch.arange(T, device=device)[:, None] < self.lengths[None, :]  # (T, R)

    def _columns(self, index: torch.Tensor) -> torch.Tensor:
        """index (R, K) classes per row -> their log-posteriors (T, R, K), read per utterance."""
        R, K = index.shape
        B, W = R // self.repeats, self.repeats
        grouped = index.reshape(B, W * K)
        if isinstance(self.log_probs, torch.Tensor):
            T = self.log_probs.shape[1]
            columns = self.log_probs.gather(2, grouped[:, None, :].expand(B, T, W * K))
        else:
            columns = self.log_probs.take(grouped)
        T = columns.shape[1]
        return columns.view(B, T, W, K).permute(1, 0, 2, 3).reshape(T, R, K).to(self.dtype)

    def initial_state(self) -> CTCPrefixState:
        """The empty prefix: only blanks so far (r_b = cumulative blank log-probability)."""
        blank = self.x_blank  # (T, R)
        r = torch.stack([torch.full_like(blank, NEG), blank.cumsum(0)], dim=-1)
        R = blank.shape[1]
        return CTCPrefixState(r, blank.new_zeros(R), torch.full((R,), -1, dtype=torch.long, device=blank.device))

    def full_score(self, state: CTCPrefixState) -> torch.Tensor:
        """(R,) log P(exactly the prefix): the score of ending it here (eos)."""
        r_sum = _logaddexp(state.r[..., 0], state.r[..., 1])  # (T, R)
        return r_sum.gather(0, (self.lengths - 1)[None])[0]

    @staticmethod
    def _phi(state: CTCPrefixState, candidates: torch.Tensor) -> torch.Tensor:
        """(T, R, K) log P(g ended by frame t with c allowed next): a repeated label needs a blank between."""
        rn_g, rb_g = state.r[..., 0], state.r[..., 1]  # (T, R)
        phi = _logaddexp(rn_g, rb_g)[..., None]
        return torch.where((candidates == state.last[:, None])[None], rb_g[..., None], phi)

    def score(self, state: CTCPrefixState, candidates: torch.Tensor, eos: int | None = None) -> torch.Tensor:
        """Prefix scores of every row's prefix extended by each candidate: candidates (R, K) token ids ->
        psi (R, K) log P(g + c is a prefix) (for ``eos``: log P(exactly g)).

        psi sums over the frame t at which c is first emitted: at frame 0 after the empty prefix, or
        at a valid frame t >= 1 after g has ended by t - 1 (phi_{t-1} + x_t(c)); one logsumexp.
        """
        index = candidates if eos is None else candidates.masked_fill(candidates == eos, 0)  # eos: no CTC class
        x_c = self._columns(index)  # (T, R, K)
        phi = self._phi(state, candidates)  # (T, R, K)
        first = torch.where((state.last < 0)[:, None], x_c[0], torch.full_like(x_c[0], NEG))  # (R, K)
        later = (phi[:-1] + x_c[1:]).masked_fill(~self.valid[1:, :, None], float("-inf"))  # (T-1, R, K)
        psi = _logaddexp(first, _logsumexp0(later)) if len(later) else first
        if eos is not None:
            psi = torch.where(candidates == eos, self.full_score(state)[:, None], psi)
        return psi

    def extend(self, state: CTCPrefixState, rows: torch.Tensor, tokens: torch.Tensor, psi: torch.Tensor,
               eos: int | None = None) -> CTCPrefixState:
        """The states of chosen extensions: row i of the result is row ``rows[i]``'s prefix (of the same
        utterance: ``rows[i] // repeats == i // repeats``) extended by ``tokens[i]``, its prefix score
        ``psi[i]`` (from :meth:`score`). rows, tokens, psi: (R,); an ``eos`` token (a row that has
        ended) reads class 0, as in :meth:`score`.

        The forward recursions of Watanabe et al.'s Algorithm 2, for t >= 1,

            r^n_t = x_t(c) + logaddexp(r^n_{t-1}, phi_{t-1}),  r^b_t = b_t + logaddexp(r^b_{t-1}, r^n_{t-1}),

        are linear scans in log space: with X_t = sum_{s<=t} x_s(c), r^n_t - X_t is the running
        logsumexp of (r^n_0 - X_0, phi_0 - X_0, ..., phi_{t-1} - X_{t-1}), one ``logcumsumexp``;
        r^b likewise from r^n with the blank's running sum. An impossible value is NEG, as in the
        frame-by-frame loop these replace.
        """
        parent = CTCPrefixState(state.r[:, rows], state.psi[rows], state.last[rows])
        x_c = self._columns(tokens[:, None] if eos is None else tokens.masked_fill(tokens == eos, 0)[:, None])[..., 0]
        phi = self._phi(parent, tokens[:, None])[..., 0]  # (T, R)
        s = self.scan_dtype
        rn0 = torch.where(parent.last < 0, x_c[0], torch.full_like(x_c[0], NEG))  # (R,)
        x_cum = x_c.to(s).clamp(min=NEG).cumsum(0)  # (T, R)
        rn = x_cum + _log_cumsum(torch.cat([(rn0.to(s) - x_cum[0])[None], phi[:-1].to(s) - x_cum[:-1]]))
        b_cum = self.blank_cum
        rb = b_cum + _log_cumsum(torch.cat([torch.full_like(rn[:1], NEG), rn[:-1] - b_cum[:-1]]))
        r = torch.stack([rn, rb], dim=-1).clamp(min=NEG).to(self.dtype)  # -inf (impossible) -> NEG
        return CTCPrefixState(r, psi.to(self.dtype), tokens)


@dataclass
class Hypothesis:
    """tokens (without eos); score: the joint score; llm_logprob: sum of the LLM's log-probabilities of
    its tokens and the eos; finished: ended by eos (not by the length limit)."""

    tokens: list[int]
    score: float
    llm_logprob: float
    finished: bool = True

    @property
    def llm_confidence(self) -> float:
        """The LLM's geometric-mean probability per token (eos included)."""
        import math

        return math.exp(self.llm_logprob / (len(self.tokens) + int(self.finished)))


@dataclass
class CTCScores:
    """What the CTC head says about a batch, carried to the search as one object.

    ``log_probs``: (B, T, C) log-posteriors (a tensor, or columns on demand: see
    :class:`CTCPrefixScorer`); ``lengths`` (B,) frames; ``blank`` its class; ``tokens``: per
    utterance its greedy CTC transcript in the LLM's vocabulary, scored as a candidate at every
    step so that the CTC can propose a word the LLM ranks low (and the draft of draft decoding).
    """

    log_probs: Any
    lengths: torch.Tensor
    blank: int
    tokens: list[list[int]] | None = None


StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``step(tokens (R,), parents (R,)) -> next-token logits (R, V)``: the LLM reads one more token per
row, after reordering its cache so that row i continues the old row ``parents[i]``."""


def _duplicate_mask(candidates: torch.Tensor) -> torch.Tensor:
    """(R, K) -> (R, K) True where a token already occurs earlier in its row (sorted order)."""
    ordered, order = candidates.sort(dim=-1)
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return torch.zeros_like(repeat).scatter(1, order, repeat)


def _extra_candidates(ctc_tokens: list[list[int]] | None, B: int, eos: int, device) -> torch.Tensor:
    """(B, G + 1): each utterance's greedy CTC tokens, padded with eos (always a candidate)."""
    width = max([len(t) for t in ctc_tokens or []] + [0])
    extra = torch.full((B, width + 1), eos, dtype=torch.long, device=device)
    for b, row in enumerate(ctc_tokens or []):
        extra[b, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    return extra


def _step_totals(logp: torch.Tensor, scores: torch.Tensor, extra: torch.Tensor, at_limit: torch.Tensor, *,
                 eos: int, ctc_weight: float, llm_candidates: int, scorer: CTCPrefixScorer | None,
                 state: CTCPrefixState | None):
    """One step's candidates and their joint scores, per row.

    logp (R, V) the LLM's next-token log-probabilities, scores (R,) the hypotheses' scores, extra
    (R, G) candidates always scored, at_limit (R, 1) rows where only eos may follow -> candidates
    (R, K), their LLM log-probabilities llm_c (R, K), CTC prefix scores psi (R, K) (None without
    CTC) and total (R, K): the extended hypotheses' scores (NEG: not allowed).
    """
    candidates = torch.cat([logp.topk(min(llm_candidates, logp.shape[-1]), dim=-1).indices, extra], dim=1)
    llm_c = logp.gather(1, candidates)
    total = scores[:, None] + (1.0 - ctc_weight) * llm_c
    psi = None
    if scorer is not None:
        psi = scorer.score(state, candidates, eos)
        total = total + ctc_weight * (psi - state.psi[:, None])
    total = total.masked_fill(_duplicate_mask(candidates), NEG)
    total = total.masked_fill(at_limit & (candidates != eos), NEG)
    return candidates, llm_c, psi, total


@torch.no_grad()
def beam_search(first_logits: torch.Tensor, step: StepFn, *, eos: int, max_new_tokens: int, beam_size: int = 1,
                ctc_weight: float = 0.0, llm_candidates: int = 8, ctc: CTCScores | None = None,
                max_lengths: list[int] | None = None) -> list[Hypothesis]:
    """The best hypothesis per utterance under the joint score.

    Args:
        first_logits: (B, V) the LLM's logits for the first answer token.
        step: the LLM's incremental step (see :data:`StepFn`); rows are utterance-major,
            ``b * beam_size + j``.
        ctc_weight: the CTC prefix score's weight in the joint score (0: the LLM alone).
        ctc: the CTC head's scores (:class:`CTCScores`); needed when ``ctc_weight > 0``. Its
            ``tokens`` are scored as candidates whenever it is given.
        max_lengths: per utterance, the most answer tokens before eos is forced (a bound from the
            speech's length: a beam of the LLM alone can otherwise prefer an endless repetition,
            every token of which is nearly certain, to ending).
    """
    B = first_logits.shape[0]
    W = beam_size
    R = B * W
    device = first_logits.device
    use_ctc = ctc_weight > 0
    if use_ctc and ctc is None:
        raise ValueError("ctc_weight > 0 needs the CTC head's scores (ctc=CTCScores(...))")
    logp = first_logits.float().log_softmax(-1).repeat_interleave(W, 0)  # (R, V)
    scores = torch.full((B, W), NEG, device=device)
    scores[:, 0] = 0.0  # one live hypothesis per utterance at the start
    scores = scores.view(R)
    llm_sum = torch.zeros(R, device=device)
    history = torch.zeros(R, 0, dtype=torch.long, device=device)  # (R, length) each row's tokens
    scorer = state = None
    if use_ctc:
        scorer = CTCPrefixScorer(ctc.log_probs, ctc.lengths, ctc.blank, repeats=W)
        state = scorer.initial_state()
    extra = _extra_candidates(ctc and ctc.tokens, B, eos, device).repeat_interleave(W, 0)  # (R, G + 1)
    limits = torch.tensor([min(max_new_tokens, n) for n in (max_lengths or [max_new_tokens] * B)], device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    best_finished = torch.full((B,), float("-inf"), device=device)
    first_row = torch.arange(B, device=device)[:, None] * W  # (B, 1)
    for length in range(max_new_tokens):
        checkpoint()  # every token: an answer nobody waits for stops here
        at_limit = (limits <= length).repeat_interleave(W)[:, None]  # (R, 1): only eos may follow
        candidates, llm_c, psi, total = _step_totals(logp, scores, extra, at_limit, eos=eos, ctc_weight=ctc_weight,
                                                     llm_candidates=llm_candidates, scorer=scorer, state=state)
        K = candidates.shape[1]
        best, index = total.view(B, W * K).topk(min(2 * W, W * K), dim=-1)  # (B, M) in rank order
        M = best.shape[1]
        row, k = first_row + index // K, index % K  # (B, M)
        is_eos = candidates[row, k] == eos
        possible = (best > NEG / 2) & ~done[:, None]
        # eos among the top W ends a hypothesis; the first W others in rank order live on
        ends = possible & is_eos & (torch.arange(M, device=device) < W)
        live = possible & ~is_eos
        live &= live.cumsum(1) <= W
        best_finished = torch.maximum(best_finished, best.masked_fill(~ends, float("-inf")).amax(1))
        first_live = best.masked_fill(~live, float("-inf")).amax(1)  # rank order: the first is the best
        done |= ~live.any(1) | (best_finished >= first_live)
        all_done, any_end = torch.stack([done.all(), ends.any()]).tolist()  # the step's one host sync
        if any_end:
            b_end, m_end = ends.nonzero(as_tuple=True)
            r_end = row[b_end, m_end]
            ended_llm = llm_sum[r_end] + llm_c[r_end, k[b_end, m_end]]
            for b, s, llm, ids in zip(b_end.tolist(), best[b_end, m_end].tolist(), ended_llm.tolist(),
                                      history[r_end].tolist()):
                finished[b].append(Hypothesis(ids, s, llm))
        if all_done:
            break
        # the live ones into slots 0..W-1 of their utterance; dead rows keep the shape: they continue
        # row b*W with its last candidate (eos) and an impossible score
        slot = torch.where(live, live.cumsum(1) - 1, W)  # (B, M); W: not kept
        rows = first_row.expand(B, W + 1).clone().scatter_(1, slot, row)[:, :W].reshape(R)
        chosen = torch.full((B, W + 1), K - 1, device=device).scatter_(1, slot, k)[:, :W].reshape(R)
        scores = torch.full((B, W + 1), NEG, device=device).scatter_(1, slot, best)[:, :W].reshape(R)
        new_tokens = candidates[rows, chosen]
        llm_sum = llm_sum[rows] + llm_c[rows, chosen]
        history = torch.cat([history[rows], new_tokens[:, None]], dim=1)
        if use_ctc:
            state = scorer.extend(state, rows, new_tokens, psi[rows, chosen], eos=eos)
        logp = step(new_tokens, rows).float().log_softmax(-1)
    else:  # the length limit: the live hypotheses end unfinished
        for row, (s, llm, ids, over) in enumerate(zip(scores.tolist(), llm_sum.tolist(), history.tolist(),
                                                      done.repeat_interleave(W).tolist())):
            if not over and s > NEG / 2:
                finished[row // W].append(Hypothesis(ids, s, llm, finished=False))
    return [max(hyps, key=lambda h: h.score) if hyps else Hypothesis([], NEG, 0.0, finished=False)
            for hyps in finished]


# -- CTC-drafted decoding --------------------------------------------------------------------------

VerifyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``verify(tokens (B, n), widths (B,), kept (B,)) -> next-token logits (B, n, V)``: the LLM first
keeps only the first ``kept[b]`` tokens of the block it read last for row b (the rest as if never
read), then reads the first ``widths[b]`` tokens of row b of ``tokens`` (the rest is padding) in one
forward pass, and returns its logits after each of them."""


@dataclass
class DraftStats:
    """What CTC-drafted decoding saved, summed over calls (:func:`draft_greedy_search`).

    forwards: the LLM's forward passes after the context; row_passes: (utterance, forward pass)
    pairs of utterances still decoding; drafted: draft tokens the LLM checked; accepted: those it
    agreed with, each a token decided without a forward pass of its own.
    """

    forwards: int = 0
    row_passes: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens (0 without drafts)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens an utterance gains per LLM forward pass: 1 step by step, 1 + the accepted drafts here."""
        return (self.row_passes + self.accepted) / self.row_passes if self.row_passes else 1.0

    def as_dict(self) -> dict:
        return {"forwards": self.forwards, "row_passes": self.row_passes, "drafted": self.drafted,
                "accepted": self.accepted, "acceptance_rate": round(self.acceptance_rate, 4),
                "tokens_per_forward": round(self.tokens_per_forward, 4)}


def realign_draft(draft: list[int], position: int, token: int, window: int = 4) -> int:
    """Where ``draft`` continues once the answer has taken ``token`` while the draft was at ``position``:
    past the token's nearest occurrence among the next ``window`` draft tokens (the draft's own
    token, or one further on: the draft had tokens the answer has not); else where it was (the
    answer has a token the draft lacks: greedy CTC mostly drops tokens; the shipped model's lacks
    about half of its LLM's, word pieces above all)."""
    for q in range(position, min(position + window, len(draft))):
        if draft[q] == token:
            return q + 1
    return position


def _where_state(keep: torch.Tensor, new: CTCPrefixState, old: CTCPrefixState) -> CTCPrefixState:
    """Row-wise ``new`` where keep (R,), else ``old``."""
    return CTCPrefixState(torch.where(keep[None, :, None], new.r, old.r), torch.where(keep, new.psi, old.psi),
                          torch.where(keep, new.last, old.last))


@torch.no_grad()
def draft_greedy_search(first_logits: torch.Tensor, verify: VerifyFn, *, eos: int, max_new_tokens: int,
                        drafts: list[list[int]], draft_tokens: int = 4, ctc_weight: float = 0.0,
                        llm_candidates: int = 8, ctc: CTCScores | None = None, max_lengths: list[int] | None = None,
                        stats: DraftStats | None = None) -> list[Hypothesis]:
    """:func:`beam_search` with ``beam_size=1``, token for token, in fewer LLM forward passes.

    Each utterance has a draft of its answer: its greedy CTC transcript (``drafts``), in the LLM's
    own vocabulary. Every round, each utterance's next token is decided from logits the LLM has
    already computed (as the step-by-step search decides it), then the LLM reads that token and up
    to ``draft_tokens`` draft tokens after it in one forward pass (``verify``); the search then
    walks the block, keeping each draft token for as long as it is exactly what it would have
    chosen there, with the logits it now has. The first disagreement is decided in the next round
    from the logits after the last kept token, and the draft re-aligned after it
    (:func:`realign_draft`). The draft only decides how many tokens a forward pass may settle,
    never which ones: the answer is the step-by-step one (up to the rounding of a forward pass
    over several tokens instead of one, which could only matter for two next tokens tied to ~1e-6).

    Arguments as :func:`beam_search`; first_logits (B, V); drafts: per utterance (eos dropped);
    stats: counts added to (:class:`DraftStats`).
    """
    B = first_logits.shape[0]
    device = first_logits.device
    use_ctc = ctc_weight > 0
    if use_ctc and ctc is None:
        raise ValueError("ctc_weight > 0 needs the CTC head's scores (ctc=CTCScores(...))")
    drafts = [[t for t in d if t != eos] for d in drafts]
    scorer = CTCPrefixScorer(ctc.log_probs, ctc.lengths, ctc.blank) if use_ctc else None
    state = scorer.initial_state() if use_ctc else None
    extra = _extra_candidates(ctc and ctc.tokens, B, eos, device)  # (B, G + 1)
    limits = [min(max_new_tokens, n) for n in (max_lengths or [max_new_tokens] * B)]
    limit_t = torch.tensor(limits, device=device)
    logp = first_logits.float().log_softmax(-1)  # (B, V): each utterance's next token, already paid for
    scores = torch.zeros(B, device=device)
    llm_sum = torch.zeros(B, device=device)
    tokens: list[list[int]] = [[] for _ in range(B)]
    length = torch.zeros(B, dtype=torch.long, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    results: list[Hypothesis | None] = [None] * B
    cursor = [0] * B  # where each draft continues
    kept = torch.zeros(B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)
    stats = stats if stats is not None else DraftStats()

    def decide(logp, scores, state, length):
        """The step-by-step search's choice per row: its best candidate (rank 0 of its top 2), as
        token (B,), score (B,), LLM log-probability (B,) and CTC state (None without CTC)."""
        at_limit = (limit_t <= length)[:, None]
        candidates, llm_c, psi, total = _step_totals(logp, scores, extra, at_limit, eos=eos, ctc_weight=ctc_weight,
                                                     llm_candidates=llm_candidates, scorer=scorer, state=state)
        best, index = total.topk(min(2, total.shape[1]), dim=-1)
        k = index[:, 0]
        token = candidates[rows, k]
        extended = scorer.extend(state, rows, token, psi[rows, k], eos=eos) if use_ctc else None
        return token, best[:, 0], llm_c[rows, k], extended

    while True:
        checkpoint()
        # 1. every live utterance's next token, from the logits in hand
        out_of_room = active & (length >= max_new_tokens)  # the search's length limit: ends unfinished
        token, best, llm_t, extended = decide(logp, scores, state, length)
        possible = best > NEG / 2
        ends = active & ~out_of_room & possible & (token == eos)
        go = active & ~out_of_room & possible & (token != eos)
        stop, ends_l, go_l, token_l = out_of_room.tolist(), ends.tolist(), go.tolist(), token.tolist()
        best_l, llm_l = best.tolist(), (llm_sum + llm_t).tolist()
        for b in range(B):
            if stop[b]:
                results[b] = Hypothesis(tokens[b], float(scores[b]), float(llm_sum[b]), finished=False)
            elif ends_l[b]:
                results[b] = Hypothesis(tokens[b], best_l[b], llm_l[b])
            elif go_l[b]:
                tokens[b].append(token_l[b])
                cursor[b] = realign_draft(drafts[b], cursor[b], token_l[b])
        scores = torch.where(go, best, scores)
        llm_sum = torch.where(go, llm_sum + llm_t, llm_sum)
        if use_ctc:
            state = _where_state(go, extended, state)
        length = length + go.long()
        active = go
        if not any(go_l):
            break
        # 2. the LLM reads each new token and the draft after it (no further than the length bound)
        block_rows = []
        for b in range(B):
            if go_l[b]:
                room = min(limits[b], max_new_tokens) - len(tokens[b])
                block_rows.append([token_l[b]] + drafts[b][cursor[b]:cursor[b] + max(0, min(draft_tokens, room))])
            else:
                block_rows.append([])
        widths = torch.tensor([len(r) for r in block_rows], device=device)
        n = int(widths.max())
        block = torch.full((B, n), eos, dtype=torch.long, device=device)
        for b, r in enumerate(block_rows):
            block[b, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
        logits = verify(block, widths, kept).float()  # (B, n, V)
        stats.forwards += 1
        stats.row_passes += len([r for r in block_rows if r])
        stats.drafted += int(widths.clamp(min=1).sub(1).sum())
        # 3. walk the block: keep draft token j + 1 while it is the search's own choice after token j
        accepting = go.clone()
        accepted = torch.zeros(B, dtype=torch.long, device=device)
        for j in range(n - 1):
            step_logp = logits[:, j].log_softmax(-1)
            token, best, llm_t, extended = decide(step_logp, scores, state, length)
            take = accepting & (j + 1 < widths) & (best > NEG / 2) & (token == block[:, j + 1])
            if not bool(take.any()):
                break
            scores = torch.where(take, best, scores)
            llm_sum = torch.where(take, llm_sum + llm_t, llm_sum)
            if use_ctc:
                state = _where_state(take, extended, state)
            length = length + take.long()
            accepted = accepted + take.long()
            accepting = take
        for b, m in enumerate(accepted.tolist()):
            if m:
                tokens[b] += block_rows[b][1:1 + m]
                for t in block_rows[b][1:1 + m]:
                    cursor[b] = realign_draft(drafts[b], cursor[b], t)
        stats.accepted += int(accepted.sum())
        kept = 1 + accepted
        logp = logits[rows, accepted].log_softmax(-1)  # after each utterance's last kept token
    return [h if h is not None else Hypothesis([], NEG, 0.0, finished=False) for h in results]
