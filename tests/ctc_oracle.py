"""The embedding-CTC written the plain way, as a reference for harmonifuse/modules/ctc.py (its
learned blank, its chunked normaliser): the whole (B, N, V) logits, then torch's CTC loss."""
from __future__ import annotations

import torch

from harmonifuse.modules.ctc import ctc_loss_from_logits


def embedding_ctc_loss(speech: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]],
                       embedding: torch.Tensor, blank: int, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """speech (B, N, H), lengths (B,), token ids per item, embedding (V, H) -> mean CTC loss per target token."""
    with torch.autocast(speech.device.type, enabled=False):
        logits = (speech.float() @ embedding.float().T) * scale
    return ctc_loss_from_logits(logits, lengths, targets, blank)
