"""Valid-position masks from per-item lengths: how padded batches say which frames are real."""
from __future__ import annotations

import torch


def lengths_to_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) lengths -> (B, size) bool, True at positions ``t < lengths[b]``.

    ``size`` may be shorter than the longest length (positions past it are dropped) or longer
    (the extra positions are padding everywhere).
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be a (B,) tensor, got shape {tuple(lengths.shape)}")
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]
