"""CTC on the projector output, scored against the LLM's own token embeddings.

The LLM can only read speech embeddings that resemble its text embeddings; early in training the
projector's output does not, and the answer loss gives it a weak, indirect signal (the plateau
before alignment "clicks"). CTC with logits ``s * speech @ E^T`` (E the frozen input embedding
table) pulls each speech position towards the embedding of a token it carries, in order: a direct
alignment signal. It serves twice: as an auxiliary loss beside the answer loss, and alone in the
alignment stage, where no LLM pass is needed and a step costs a fraction of a full one.

The blank. By default it is a token of the LLM's vocabulary that never occurs in a transcript (a
special token); with ``projector.ctc_learned_blank`` it is a vector of its own, outside the vocabulary. The
latter matters once CTC has shaped the projector: most positions are blank, and if they sit on
a special token such as ``<|endoftext|>`` (a document boundary for the LLM) the LLM reads a
sequence of document breaks; a learned blank is a direction the LLM has no prior meaning for.

The logit scale ``s`` matters when the projector's output norm is pinned to that of the text
embeddings (``projector.match_embedding_norm``): with ``s = 1`` a softmax over 49k tokens cannot
become sharp. A small fixed ``s`` (``projector.ctc_scale``) makes a confident CTC need outputs close
to the token embeddings; a learned ``s`` (one scalar, log-parametrised, ``projector.ctc_learn_scale``)
lets CTC be as accurate with outputs that point only loosely at them (measurements:
docs/training-log.md).

At inference the same head scores hypotheses of the LLM (joint CTC/LLM decoding, decoding.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def embedding_ctc_loss(speech: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]],
                       embedding: torch.Tensor, blank: int, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """speech (B, N, H), lengths (B,), token ids per item, embedding (V, H) -> mean CTC loss per target token."""
    return ctc_loss_from_logits((speech.float() @ embedding.float().T) * scale, lengths, targets, blank)


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


def greedy_ctc_from_logits(logits: torch.Tensor, lengths: torch.Tensor, blank: int) -> list[list[int]]:
    """logits (B, N, C), lengths (B,) -> class ids per item, repeats merged, blanks dropped."""
    best = logits.argmax(-1)  # (B, N)
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
    """

    def __init__(self, init_scale: float = 1.0, learn_scale: bool = False, blank_size: int | None = None) -> None:
        super().__init__()
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
        instead would copy the 49k-row table and take its gradient at every step."""
        logits = speech.float() @ embedding.float().T
        if self.blank_vector is None:
            return logits, blank
        blank_logit = speech.float() @ self.blank_vector.float()  # (B, N)
        return torch.cat([logits, blank_logit[..., None]], dim=-1), embedding.shape[0]

    def token_mixture(self, speech: torch.Tensor, embedding: torch.Tensor, blank: int) -> torch.Tensor:
        """speech (B, N, H) -> (B, N, H): each position's expected class embedding under the CTC
        posterior, sum_v p_v E_v (the learned blank's vector included). An LLM input that stays on
        its own token embeddings, however the projector moves (it learned slower than reading the
        projector output directly: docs/training-log.md)."""
        logits, _ = self.logits(speech, embedding, blank)
        probs = (logits * self.scale.float()).softmax(-1)  # (B, N, C)
        vocabulary = embedding.shape[0]
        mixture = probs[..., :vocabulary] @ embedding.to(probs.dtype)
        if self.blank_vector is not None:
            mixture = mixture + probs[..., vocabulary:] * self.blank_vector.to(probs.dtype)
        return mixture

    def forward(self, speech: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]], embedding: torch.Tensor,
                blank: int) -> torch.Tensor:
        """speech (B, N, H), lengths (B,), token ids per item, embedding (V, H) -> mean CTC loss per token.

        ``blank``: the blank token id (ignored when the blank is learned)."""
        logits, blank = self.logits(speech, embedding, blank)
        return ctc_loss_from_logits(logits * self.scale.float(), lengths, targets, blank)

    def candidate_nll(self, speech: torch.Tensor, lengths: torch.Tensor, candidates: list[list[int]],
                      embedding: torch.Tensor, blank: int) -> torch.Tensor:
        """speech (B, N, H), lengths (B,), K candidate token sequences -> (B, K) negative
        log-likelihoods of each whole candidate: closed-set scoring (e.g. the emotion label words)."""
        logits, blank = self.logits(speech, embedding, blank)
        logits = logits * self.scale.float()
        B = speech.shape[0]
        return torch.stack([ctc_loss_from_logits(logits, lengths, [ids] * B, blank, reduction="none")
                            for ids in candidates], dim=1)

    def decode(self, speech: torch.Tensor, lengths: torch.Tensor, embedding: torch.Tensor,
               blank: int) -> list[list[int]]:
        """speech (B, N, H), lengths (B,) -> token ids per item (greedy)."""
        logits, blank = self.logits(speech, embedding, blank)
        return greedy_ctc_from_logits(logits, lengths, blank)
