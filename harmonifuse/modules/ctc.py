"""CTC on the projector output, scored against the LLM's own token embeddings.

The LLM can only read speech embeddings that resemble its text embeddings; early in training the
projector's output does not, and the answer loss gives it a weak, indirect signal (the plateau
before alignment "clicks"). CTC with logits ``s * speech @ E^T`` (E the frozen input embedding
table) pulls each speech position towards the embedding of a token it carries, in order: a direct
alignment signal. It serves twice: as an auxiliary loss beside the answer loss, and alone in the
alignment stage, where no LLM pass is needed and a step costs a fraction of a full one.

The blank. By default it is a token of the LLM's vocabulary that never occurs in a transcript (a
special token); with ``ctc.learned_blank`` it is a vector of its own, outside the vocabulary. The
latter matters once CTC has shaped the projector: most positions are blank, and if they sit on
a special token such as ``<|endoftext|>`` (a document boundary for the LLM) the LLM reads a
sequence of document breaks; a learned blank is a direction the LLM has no prior meaning for.

The logit scale ``s`` matters when the projector's output norm is pinned to that of the text
embeddings (``projector.match_embedding_norm``): with ``s = 1`` a softmax over 49k tokens cannot
become sharp. A small fixed ``s`` (``ctc.scale``) makes a confident CTC need outputs close
to the token embeddings; a learned ``s`` (one scalar, log-parametrised, ``ctc.learn_scale``)
lets CTC be as accurate with outputs that point only loosely at them (measurements:
docs/research/training-log.md).

At inference the same head scores hypotheses of the LLM (joint CTC/LLM decoding, decoding.py).

Large vocabularies (``ctc.vocab_chunk``). The CTC forward-backward reads only the blank's
and the target tokens' log-probabilities; the rest of the vocabulary enters through each position's
normaliser, log sum_v exp(logit_v). With a chunk size the loss computes that normaliser chunk by
chunk over the table (forward and backward, :class:`ChunkedLogSumExp`) and the CTC itself over the
batch's own classes only, so the (B, N, V) logits never exist: for a 152k vocabulary and an
alignment batch of 16 x 30 s that is 2.9 GB of float32 logits (plus as much again for their
log-softmax and gradients) less. Loss and gradients equal the whole-table computation.
"""
from __future__ import annotations

import math

import torch
from torch import nn


AUTO_CHUNK = 8192
"""``ctc.vocab_chunk: auto``: this many tokens per block for a vocabulary above :data:`AUTO_CHUNK_ABOVE`."""
AUTO_CHUNK_ABOVE = 65536


def resolve_vocab_chunk(setting: int | str, vocab_size: int) -> int:
    """``ctc.vocab_chunk`` for a vocabulary of ``vocab_size`` tokens: a number as given; auto:
    :data:`AUTO_CHUNK` above 64k tokens (whole float32 (B, N, V) tables of a 128-152k vocabulary take
    gigabytes per batch), else 0 (the whole table: fastest)."""
    if setting == "auto":
        return AUTO_CHUNK if vocab_size > AUTO_CHUNK_ABOVE else 0
    return int(setting)


def ctc_loss_from_logits(logits: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]],
                         blank: int, reduction: str = "mean") -> torch.Tensor:
    """logits (B, N, C), lengths (B,), class ids per item -> mean CTC loss per target token.

    ``reduction="none"``: the negative log-likelihood of each item's whole target (B,), infinite
    where the target cannot fit in the item's length (a training loss zeroes those instead)."""
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (N, B, C)
    flat = torch.tensor([t for ids in targets for t in ids], dtype=torch.long, device=logits.device)
    target_lengths = torch.tensor([len(ids) for ids in targets], dtype=torch.long, device=logits.device)
    return nn.functional.ctc_loss(log_probs, flat, lengths, target_lengths, blank=blank, reduction=reduction,
                                  zero_infinity=reduction == "mean")


def _ctc_nll_on_subset(log_probs: torch.Tensor, lengths: torch.Tensor, targets: list[torch.Tensor],
                       blank: int) -> torch.Tensor:
    """log_probs (N, B, C) over a subset of the classes (normalised over all of them, so they need not
    sum to 1 here), lengths (B,), class ids per item -> (B,) negative log-likelihoods, 0 where a target
    cannot fit (as ``zero_infinity``).

    torch's CTC backward returns ``exp(log_probs) - posterior`` per frame: the gradient with respect
    to the logits of a log-softmax over these very classes, not the one with respect to
    ``log_probs`` (-posterior). Over a subset that extra ``exp(log_probs)`` term is wrong; a detached
    copy of it is subtracted here (it is nonzero on each item's valid frames only, as torch's)."""
    device = log_probs.device
    flat = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long, device=device)
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long, device=device)
    repeats = torch.tensor([int((t[1:] == t[:-1]).sum()) for t in targets], dtype=torch.long, device=device)
    fits = lengths.to(device) >= target_lengths + repeats  # (B,): a repeated label needs a blank between
    nll = nn.functional.ctc_loss(log_probs, flat, lengths, target_lengths, blank=blank, reduction="none",
                                 zero_infinity=True)
    N = log_probs.shape[0]
    valid = (torch.arange(N, device=device)[:, None] < lengths.to(device)[None, :]) & fits[None, :]  # (N, B)
    extra = (log_probs.detach().exp() * log_probs * valid[..., None]).sum((0, 2))  # (B,): gradient exp(log_probs)
    return nll - (extra - extra.detach())


def _float32(device: torch.device):
    """No autocast: the chunked CTC's normaliser and its recomputation in the backward pass (which runs
    outside autocast) must see the same float32 logits; and the whole-table logits are float32 too, so
    that both give one loss under bf16 autocast."""
    return torch.autocast(device.type, enabled=False)


class ChunkedLogSumExp(torch.autograd.Function):
    """log sum_v exp(x @ E_v), over the rows of E in chunks: x (B, N, H), E (V, H) -> (B, N) float32.

    Forward and backward each hold one (B, N, chunk) block of logits at a time (the backward
    recomputes them) instead of the whole (B, N, V); E may be stored in a lower precision (each
    chunk is widened to float32 on its own)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, chunk: int) -> torch.Tensor:
        x = x.float()
        out = x.new_full(x.shape[:-1], float("-inf"))
        with _float32(x.device):
            for start in range(0, table.shape[0], chunk):
                block = x @ table[start:start + chunk].float().T  # (B, N, c)
                out = torch.logaddexp(out, block.logsumexp(-1))
        ctx.save_for_backward(x, table, out)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, table, out = ctx.saved_tensors
        want_x, want_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.zeros_like(x) if want_x else None
        grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device) if want_table else None
        with _float32(x.device):
            for start in range(0, table.shape[0], ctx.chunk):
                rows = table[start:start + ctx.chunk].float()  # (c, H)
                weight = (x @ rows.T - out[..., None]).exp() * grad[..., None]  # (B, N, c): softmax x upstream
                if want_x:
                    grad_x += weight @ rows
                if want_table:
                    grad_table[start:start + ctx.chunk] = weight.reshape(-1, rows.shape[0]).T @ x.reshape(-1, x.shape[-1])
        return grad_x, (grad_table.to(table.dtype) if want_table else None), None


class CTCPosteriors:
    """CTC log-posteriors (R, T, C) never held whole: the columns a caller asks for, computed from
    the scaled speech (R, T, H), the normaliser log_z (R, T) and the table (V, H) (a learned blank:
    class V). What the joint beam search reads (the blank and a few candidates per step) of a
    152k vocabulary, instead of (R, T, 152k) float32."""

    def __init__(self, scaled: torch.Tensor, log_z: torch.Tensor, table: torch.Tensor,
                 blank_vector: torch.Tensor | None) -> None:
        self.scaled, self.log_z, self.table, self.blank_vector = scaled, log_z, table, blank_vector

    @property
    def shape(self) -> tuple[int, int, int]:
        R, T, _ = self.scaled.shape
        return R, T, self.table.shape[0] + int(self.blank_vector is not None)

    @property
    def device(self) -> torch.device:
        return self.scaled.device

    def repeat_interleave(self, repeats: int, dim: int = 0) -> "CTCPosteriors":
        if dim != 0:
            raise ValueError("CTCPosteriors repeats rows only (dim=0)")
        return CTCPosteriors(self.scaled.repeat_interleave(repeats, 0), self.log_z.repeat_interleave(repeats, 0),
                             self.table, self.blank_vector)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """index (R, K) classes per row -> their log-posteriors (R, T, K) float32."""
        V = self.table.shape[0]
        rows = self.table[index.clamp(max=V - 1)].float()  # (R, K, H)
        with _float32(self.scaled.device):
            out = torch.einsum("rth,rkh->rtk", self.scaled, rows) - self.log_z[..., None]
            if self.blank_vector is not None:
                blank = (self.scaled @ self.blank_vector.float() - self.log_z)[..., None]  # (R, T, 1)
                out = torch.where((index == V)[:, None, :], blank, out)
        return out


def greedy_ctc_from_logits(logits: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """logits (B, N, C), lengths (B,) -> class ids per item, repeats merged, blanks dropped."""
    return collapse_ctc_path(logits.argmax(-1), lengths, blank)


def collapse_ctc_path(best: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """best (B, N) class per position, lengths (B,) -> class ids per item, repeats merged, blanks dropped."""
    decoded = []
    for row, n in zip(best.tolist(), lengths.tolist()):
        ids, previous = [], None
        for token in row[:n]:
            if token != previous and token != blank:
                ids.append(token)
            previous = token
        decoded.append(ids)
    return decoded


class EmbeddingCTC(nn.Module):
    """The embedding-CTC head: a logit scale, learned (a parameter) or fixed (a buffer), and the blank.

    Args:
        init_scale: the logit scale (its start value when learned).
        learn_scale: learn the scale.
        blank_size: with a size H, the blank is a learned vector (H,), an extra class after the
            vocabulary; without (None), the caller's ``blank`` token id is the blank.
        vocab_chunk: rows of the embedding table per block in the loss, the label scores, the
            log-posteriors and greedy decoding (0: the whole table at once; see the module's docstring).
    """

    def __init__(self, init_scale: float = 1.0, learn_scale: bool = False, blank_size: int | None = None,
                 vocab_chunk: int = 0) -> None:
        super().__init__()
        if vocab_chunk < 0:
            raise ValueError(f"vocab_chunk must be >= 0 (0: the whole table), got {vocab_chunk}")
        self.vocab_chunk = vocab_chunk
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        log_scale = torch.tensor(math.log(init_scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        # zeros: the blank's logit starts at 0, the middle of the token logits' range
        self.blank_vector = nn.Parameter(torch.zeros(blank_size)) if blank_size else None

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def logits(self, speech: torch.Tensor, embedding: torch.Tensor, blank: int) -> tuple[torch.Tensor, int]:
        """speech (B, N, H), embedding (V, H) -> unscaled class logits (B, N, V or V+1) and the blank's class.

        A learned blank's logit is computed apart and appended: concatenating it to the table
        instead would copy the 49k-row table and take its gradient at every step. float32 under
        autocast too, as the chunked computation (``vocab_chunk``): one loss either way."""
        with _float32(speech.device):
            logits = speech.float() @ embedding.float().T
            if self.blank_vector is None:
                return logits, blank
            blank_logit = speech.float() @ self.blank_vector.float()  # (B, N)
        return torch.cat([logits, blank_logit[..., None]], dim=-1), embedding.shape[0]

    def forward(self, speech: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]], embedding: torch.Tensor,
                blank: int) -> torch.Tensor:
        """speech (B, N, H), lengths (B,), token ids per item, embedding (V, H) -> mean CTC loss per token.

        ``blank``: the blank token id (ignored when the blank is learned)."""
        if self.vocab_chunk:
            nll = self._subset_nll(speech, lengths, targets, embedding, blank)
            per_token = torch.tensor([max(len(t), 1) for t in targets], dtype=nll.dtype, device=nll.device)
            return (nll / per_token).mean()  # torch's reduction="mean"
        logits, blank = self.logits(speech, embedding, blank)
        return ctc_loss_from_logits(logits * self.scale.float(), lengths, targets, blank)

    def _normaliser(self, speech: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """speech (B, N, H) -> the scaled speech (B, N, H) float32 and log sum over all classes of
        exp(logit) (B, N), the table in chunks (a learned blank included)."""
        with _float32(speech.device):
            scaled = speech.float() * self.scale.float()
            log_z = ChunkedLogSumExp.apply(scaled, embedding, self.vocab_chunk)
            if self.blank_vector is not None:
                log_z = torch.logaddexp(log_z, scaled @ self.blank_vector.float())
        return scaled, log_z

    def _subset_nll(self, speech: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]],
                    embedding: torch.Tensor, blank: int) -> torch.Tensor:
        """(B,) CTC negative log-likelihoods from the blank's and the targets' classes alone (see
        :func:`_ctc_nll_on_subset`), normalised over the whole vocabulary in chunks."""
        scaled, log_z = self._normaliser(speech, embedding)
        classes = sorted({t for ids in targets for t in ids} | ({blank} if self.blank_vector is None else set()))
        index = torch.tensor(classes, dtype=torch.long, device=speech.device)
        with _float32(speech.device):
            logits = scaled @ embedding[index].float().T  # (B, N, S)
            if self.blank_vector is not None:
                logits = torch.cat([logits, (scaled @ self.blank_vector.float())[..., None]], dim=-1)
        if self.blank_vector is not None:
            sub_blank = len(classes)
        else:
            sub_blank = classes.index(blank)
        position = {token: i for i, token in enumerate(classes)}
        sub_targets = [torch.tensor([position[t] for t in ids], dtype=torch.long, device=speech.device)
                       for ids in targets]
        log_probs = (logits - log_z[..., None]).transpose(0, 1)  # (N, B, S)
        return _ctc_nll_on_subset(log_probs, lengths, sub_targets, sub_blank)

    def log_probs(self, speech: torch.Tensor, embedding: torch.Tensor, blank: int) -> tuple[torch.Tensor, int]:
        """speech (B, N, H) -> CTC log-posteriors (B, N, C) float32 over the vocabulary (and a learned
        blank), and the blank's class; with ``vocab_chunk``, written block by block into one tensor
        (no second (B, N, C) copy for the logits)."""
        if not self.vocab_chunk:
            logits, blank = self.logits(speech, embedding, blank)
            return (logits * self.scale.float()).log_softmax(-1), blank
        scaled, log_z = self._normaliser(speech, embedding)
        V = embedding.shape[0]
        out = scaled.new_empty(*scaled.shape[:-1], V + int(self.blank_vector is not None))
        with _float32(speech.device):
            for start in range(0, V, self.vocab_chunk):
                block = embedding[start:start + self.vocab_chunk].float()
                out[..., start:start + block.shape[0]] = scaled @ block.T - log_z[..., None]
            if self.blank_vector is not None:
                out[..., V] = scaled @ self.blank_vector.float() - log_z
                blank = V
        return out, blank

    def posteriors(self, speech: torch.Tensor, embedding: torch.Tensor, blank: int) -> tuple[CTCPosteriors, int]:
        """speech (B, N, H) -> log-posteriors computed column by column on demand (:class:`CTCPosteriors`)
        and the blank's class: for decoding over a vocabulary too large to hold (B, N, V)."""
        scaled, log_z = self._normaliser(speech, embedding)
        if self.blank_vector is not None:
            blank = embedding.shape[0]
        return CTCPosteriors(scaled, log_z, embedding, self.blank_vector), blank

    def candidate_nll(self, speech: torch.Tensor, lengths: torch.Tensor, candidates: list[list[int]],
                      embedding: torch.Tensor, blank: int) -> torch.Tensor:
        """speech (B, N, H), lengths (B,), K candidate token sequences -> (B, K) negative
        log-likelihoods of each whole candidate: closed-set scoring (e.g. the emotion label words).
        Infinite where a candidate cannot fit (also with ``vocab_chunk``)."""
        B = speech.shape[0]
        if self.vocab_chunk:
            nll = torch.stack([self._subset_nll(speech, lengths, [ids] * B, embedding, blank)
                               for ids in candidates], dim=1)  # (B, K), 0 where a candidate cannot fit
            need = torch.tensor([[len(ids) + sum(a == b for a, b in zip(ids, ids[1:])) for ids in candidates]],
                                device=nll.device)
            return nll.masked_fill(lengths.to(nll.device)[:, None] < need, float("inf"))
        logits, blank = self.logits(speech, embedding, blank)
        logits = logits * self.scale.float()
        return torch.stack([ctc_loss_from_logits(logits, lengths, [ids] * B, blank, reduction="none")
                            for ids in candidates], dim=1)

    def decode(self, speech: torch.Tensor, lengths: torch.Tensor, embedding: torch.Tensor,
               blank: int) -> list[list[int]]:
        """speech (B, N, H), lengths (B,) -> token ids per item (greedy)."""
        if not self.vocab_chunk:
            logits, blank = self.logits(speech, embedding, blank)
            return greedy_ctc_from_logits(logits, lengths, blank)
        # the running best class over the table's blocks (the scale cannot change an argmax: s > 0)
        x = speech.float()
        best_value = x.new_full(x.shape[:-1], float("-inf"))
        best = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
        with _float32(x.device):  # the whole-table decoding's float32 logits, block by block
            for start in range(0, embedding.shape[0], self.vocab_chunk):
                value, index = (x @ embedding[start:start + self.vocab_chunk].float().T).max(-1)
                better = value > best_value  # strict: ties keep the lower id, as argmax over the whole table
                best_value, best = torch.where(better, value, best_value), torch.where(better, index + start, best)
            if self.blank_vector is not None:
                blank = embedding.shape[0]
                best = torch.where(x @ self.blank_vector.float() > best_value, blank, best)
        return collapse_ctc_path(best, lengths, blank)
