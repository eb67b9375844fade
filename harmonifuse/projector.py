"""Projector from speech features into the LLM's embedding space."""
from __future__ import annotations

import torch
from torch import nn


class FrameStackProjector(nn.Module):
    """Stack ``stack`` consecutive frames, then a two-layer MLP to the LLM width.

    (B, T, D) with lengths (B,) -> (B, ceil(T / k), H) with lengths ceil(len / k).
    """

    def __init__(self, input_size: int, output_size: int, *, stack: int = 5, hidden_size: int = 1024) -> None:
        super().__init__()
        self.stack = stack
        self.input_size = input_size
        self.output_size = output_size
        self.mlp = nn.Sequential(
            nn.Linear(input_size * stack, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, output_size),
        )

    @property
    def downsample_rate(self) -> int:
        return self.stack

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths + self.stack - 1, self.stack, rounding_mode="floor")

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, D), lengths (B,) -> embeddings (B, N, H), lengths (B,)."""
        B, T, D = features.shape
        pad = (-T) % self.stack
        if pad:
            features = nn.functional.pad(features, (0, 0, 0, pad))
        stacked = features.reshape(B, (T + pad) // self.stack, D * self.stack)
        return self.mlp(stacked), self.output_lengths(lengths)
