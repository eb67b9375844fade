"""Component-selective gate over the fused speech features.

g_t = 2 * sigmoid(U F_t + V p + b);  Z_t = g_t * F_t  (per channel of D).

U, V and b start at zero, so g = 1 exactly and the model starts as the ungated baseline; the
factor 2 keeps the identity start at the sigmoid's steepest point (a plain sigmoid started near 1
would barely move). ``channel`` drops U (selection by prompt only), ``none`` is the identity.
Inputs of U and V are divided by the square root of their width (F_t and LN(p) then have unit
norm): Adam steps every weight by about the learning rate, and with unscaled inputs the gate
saturated (most channels shut) within the first steps.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class NoGate(nn.Module):
    def forward(self, features: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """features (B, T, D), prompt (B, P) -> (features, None)."""
        return features, None


class ChannelGate(nn.Module):
    """g = 2 sigmoid(V p + b): one gate vector per prompt, the same at every frame."""

    def __init__(self, hidden_size: int, prompt_dim: int) -> None:
        super().__init__()
        self.prompt_norm = nn.LayerNorm(prompt_dim, elementwise_affine=False)
        self.from_prompt = nn.Linear(prompt_dim, hidden_size)
        self.prompt_scale = prompt_dim ** -0.5
        nn.init.zeros_(self.from_prompt.weight)
        nn.init.zeros_(self.from_prompt.bias)

    def prompt_logits(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.from_prompt(self.prompt_norm(prompt) * self.prompt_scale)[:, None, :]  # (B, 1, D)

    def forward(self, features: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, D), prompt (B, P) -> gated (B, T, D), gate (B, 1|T, D)."""
        gate = 2.0 * torch.sigmoid(self.prompt_logits(prompt).to(features.dtype))
        return features * gate, gate


class ContentGate(ChannelGate):
    """g_t = 2 sigmoid(U F_t + V p + b): selection depends on the frame and the task prompt."""

    def __init__(self, hidden_size: int, prompt_dim: int) -> None:
        super().__init__(hidden_size, prompt_dim)
        self.from_content = nn.Linear(hidden_size, hidden_size, bias=False)
        self.content_scale = hidden_size ** -0.5
        nn.init.zeros_(self.from_content.weight)

    def forward(self, features: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.from_content(features * self.content_scale) + self.prompt_logits(prompt).to(features.dtype)
        gate = 2.0 * torch.sigmoid(logits)
        return features * gate, gate


GATES: dict[str, Callable[[int, int], nn.Module]] = {
    "none": lambda hidden_size, prompt_dim: NoGate(),
    "channel": ChannelGate,
    "content": ContentGate,
}


def build_gate(mode: str, hidden_size: int, prompt_dim: int) -> nn.Module:
    return GATES[mode](hidden_size, prompt_dim)
