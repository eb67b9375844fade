"""Auxiliary CTC on the projector output, scored against the LLM's own token embeddings.

The LLM can only read speech embeddings that resemble its text embeddings; early in training the
projector's output does not, and the answer loss gives it a weak, indirect signal (the plateau
before alignment "clicks"). CTC with logits ``speech @ E^T`` (E the frozen input embedding table,
no new parameters) pulls each speech position towards the embedding of a token it carries, in
order: a direct alignment signal. Used on ASR items during training only.
"""
from __future__ import annotations

import torch
from torch import nn


def embedding_ctc_loss(speech: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]],
                       embedding: torch.Tensor, blank: int) -> torch.Tensor:
    """speech (B, N, H), lengths (B,), token ids per item, embedding (V, H) -> mean CTC loss per target token."""
    logits = speech.float() @ embedding.float().T  # (B, N, V)
    log_probs = logits.log_softmax(-1).transpose(0, 1)  # (N, B, V)
    flat = torch.tensor([t for ids in targets for t in ids], dtype=torch.long, device=speech.device)
    target_lengths = torch.tensor([len(ids) for ids in targets], dtype=torch.long, device=speech.device)
    return nn.functional.ctc_loss(log_probs, flat, lengths, target_lengths, blank=blank, reduction="mean",
                                  zero_infinity=True)
