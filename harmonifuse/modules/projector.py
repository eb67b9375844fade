"""Projector from speech features into the LLM's embedding space."""
from __future__ import annotations

import torch
from torch import nn

from harmonifuse.lengths import lengths_to_mask


class FrameStackProjector(nn.Module):
    """Stack ``stack`` consecutive frames, then a two-layer MLP to the LLM width.

    (B, T, D) with lengths (B,) -> (B, ceil(T / k), H) with lengths ceil(len / k).

    ``output_rms``: if set, every output position is RMS-normalised and scaled to this fixed value
    (the RMS of the LLM's token embeddings), so speech positions enter the LLM's residual stream at
    the scale of text; unconstrained, the embedding-CTC loss rewards ever larger outputs.

    ``context_layers``: pre-norm Transformer encoder layers (``context_heads`` heads, feed-forward
    ``hidden_size``) over the projected positions, so each position sees its neighbours beyond its
    own ``stack`` frames. No positional encoding is added: the encoder's features carry position.

    ``context_kernel``: odd width, in projected positions, of the MLP's first layer, which becomes a
    1-D convolution (1: a per-position linear layer). A cheaper context than ``context_layers``: a
    BPE token often spans more than one position's 100 ms. Frames past each item's length are
    zeroed first, so no output depends on the batch's padding.
    """

    def __init__(self, input_size: int, output_size: int, *, stack: int = 5, hidden_size: int = 1024,
                 output_rms: float | None = None, context_layers: int = 0, context_heads: int = 8,
                 context_kernel: int = 1) -> None:
        super().__init__()
        if output_rms is not None and not output_rms > 0:
            raise ValueError(f"output_rms must be > 0, got {output_rms}")
        if context_layers and output_size % context_heads:
            raise ValueError(f"model.projector.context_heads ({context_heads}) must divide the LLM width "
                             f"({output_size}); pick a divisor of {output_size}")
        if context_kernel < 1 or context_kernel % 2 == 0:
            raise ValueError(f"model.projector.context_kernel must be an odd number >= 1, got {context_kernel}")
        self.stack = stack
        self.input_size = input_size
        self.output_size = output_size
        self.output_rms = output_rms
        self.context_kernel = context_kernel
        self.mlp = nn.Sequential(
            nn.Linear(input_size * stack, hidden_size) if context_kernel == 1
            else PositionConv(input_size * stack, hidden_size, context_kernel),
            nn.GELU(),
            nn.Linear(hidden_size, output_size),
        )
        self.context = None
        if context_layers:
            layer = nn.TransformerEncoderLayer(output_size, context_heads, dim_feedforward=hidden_size, dropout=0.0,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.context = nn.TransformerEncoder(layer, context_layers, enable_nested_tensor=False)

    @property
    def downsample_rate(self) -> int:
        return self.stack

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths + self.stack - 1, self.stack, rounding_mode="floor")

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, D), lengths (B,) -> embeddings (B, N, H), lengths (B,)."""
        B, T, D = features.shape
        if self.context_kernel > 1:
            features = features * lengths_to_mask(lengths, T)[..., None].to(features.dtype)
        pad = (-T) % self.stack
        if pad:
            features = nn.functional.pad(features, (0, 0, 0, pad))
        stacked = features.reshape(B, (T + pad) // self.stack, D * self.stack)
        embeddings = self.mlp(stacked)
        out_lengths = self.output_lengths(lengths)
        if self.context is not None:
            padding = ~lengths_to_mask(out_lengths, embeddings.shape[1])
            embeddings = self.context(embeddings, src_key_padding_mask=padding)
        if self.output_rms is not None:
            embeddings = nn.functional.rms_norm(embeddings, (self.output_size,), eps=1e-6) * self.output_rms
        return embeddings, out_lengths


class PositionConv(nn.Module):
    """1-D convolution over positions, centred (same length): (B, N, C_in) -> (B, N, C_out)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2)).transpose(1, 2)
