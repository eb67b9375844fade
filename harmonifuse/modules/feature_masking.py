"""SpecAugment-style masking of encoder hidden states, for training on cached features.

With a frozen encoder every epoch sees the same hidden states, and the projector memorises the
training voices within a few epochs (the alignment stage's train CTC loss fell to 0.7 per token
while the dev WER stalled). Zeroing random time spans and channel bands, the same across all
layers of an utterance, is SpecAugment (Park et al., 2019) moved from the spectrogram to the
features, where caching still works.
"""
from __future__ import annotations

import torch
from torch import nn


class FeatureMasking(nn.Module):
    """Zero ``time_masks`` spans of up to ``time_width`` frames and ``channel_masks`` bands of up to
    ``channel_width`` channels per utterance; identity in eval mode or with no masks.

    (L+1, B, T, D) hidden states and (B,) lengths -> masked (L+1, B, T, D). Time spans lie inside
    each utterance's valid frames; a span never covers more than ``max_time_fraction`` of them.
    """

    def __init__(self, time_masks: int = 0, time_width: int = 10, channel_masks: int = 0, channel_width: int = 16,
                 max_time_fraction: float = 0.2) -> None:
        super().__init__()
        if min(time_masks, channel_masks) < 0 or min(time_width, channel_width) < 1:
            raise ValueError("mask counts must be >= 0 and widths >= 1")
        self.time_masks, self.time_width = time_masks, time_width
        self.channel_masks, self.channel_width = channel_masks, channel_width
        self.max_time_fraction = max_time_fraction

    @property
    def active(self) -> bool:
        return self.training and (self.time_masks > 0 or self.channel_masks > 0)

    def forward(self, hidden_states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return hidden_states
        _, B, T, D = hidden_states.shape
        device = hidden_states.device
        keep = torch.ones(B, T, D, dtype=torch.bool, device=device)
        frames = torch.arange(T, device=device)[None, :]  # (1, T)
        channels = torch.arange(D, device=device)[None, :]  # (1, D)
        span_limit = (lengths.float() * self.max_time_fraction).clamp(min=1).long()  # (B,)
        for _ in range(self.time_masks):
            width = (torch.rand(B, device=device) * (span_limit.clamp(max=self.time_width) + 1)).long()
            start = (torch.rand(B, device=device) * (lengths - width).clamp(min=1)).long()
            covered = (frames >= start[:, None]) & (frames < (start + width)[:, None])  # (B, T)
            keep &= ~covered[:, :, None]
        for _ in range(self.channel_masks):
            width = (torch.rand(B, device=device) * (self.channel_width + 1)).long()
            start = (torch.rand(B, device=device) * (D - width).clamp(min=1)).long()
            covered = (channels >= start[:, None]) & (channels < (start + width)[:, None])  # (B, D)
            keep &= ~covered[:, None, :]
        return hidden_states * keep.to(hidden_states.dtype)[None]
