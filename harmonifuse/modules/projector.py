"""Projector from speech features into the LLM's embedding space."""
from __future__ import annotations

import torch
from torch import nn



class FrameStackProjector(nn.Module):
    """Stack ``stack`` consecutive frames, then a two-layer MLP to the LLM width.

    (B, T, D) with lengths (B,) -> (B, ceil(T / k), H) with lengths ceil(len / k).

    ``output_rms``: if set, every output position is RMS-normalised and scaled to this fixed value
    (the RMS of the LLM's token embeddings), so speech positions enter the LLM's residual stream at
    the scale of text; unconstrained, the embedding-CTC loss rewards ever larger outputs.
    """

    def __init__(self, input_size: int, output_size: int, *, stack: int = 5, hidden_size: int = 1024,
                 output_rms: float | None = None) -> None:
        super().__init__()
        if output_rms is not None and not output_rms > 0:
            raise ValueError(f"output_rms must be > 0, got {output_rms}")
        self.stack = stack
        self.input_size = input_size
        self.output_size = output_size
        self.output_rms = output_rms
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
        embeddings = self.mlp(stacked)
        out_lengths = self.output_lengths(lengths)
        if self.output_rms is not None:
            embeddings = nn.functional.rms_norm(embeddings, (self.output_size,), eps=1e-6) * self.output_rms
        return embeddings, out_lengths

