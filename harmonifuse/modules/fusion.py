"""Prompt-adaptive dynamic layer fusion.

alpha(p) = softmax((w0 + W_a p) / tau) over the L+1 hidden states, F = sum_l alpha_l * LN(H_l).
Three ways to produce the logits ``w0 + ...`` share one interface, so the ablation is a choice of
object, not a branch: a static vector (the SUPERB / s3prl featurizer), one vector per task id,
or a function of the prompt vector (HarmoniFuse). All start at zero: the uniform weighted sum.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class StaticLayerWeights(nn.Module):
    """One learned logit per layer, shared by every task."""

    def __init__(self, num_states: int, prompt_dim: int, num_tasks: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_states))

    def forward(self, prompt: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """prompt (B, P), task_ids (B,) -> logits (B, L+1)."""
        return self.logits.expand(task_ids.shape[0], -1)


class TaskLayerWeights(nn.Module):
    """One learned logit vector per task id."""

    def __init__(self, num_states: int, prompt_dim: int, num_tasks: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_tasks, num_states))

    def forward(self, prompt: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.logits[task_ids]


class PromptLayerWeights(nn.Module):
    """logits = w0 + W_a LN(p) / sqrt(P): the weights follow the prompt, so paraphrases land nearby.

    The 1/sqrt(P) keeps the prompt vector at unit norm. Adam moves every weight by about the
    learning rate per step, so with a norm-sqrt(P) input the logits moved by ~lr * P per step
    and the weights collapsed onto a single layer within the first few steps.
    """

    def __init__(self, num_states: int, prompt_dim: int, num_tasks: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_states))
        self.prompt_norm = nn.LayerNorm(prompt_dim, elementwise_affine=False)
        self.proj = nn.Linear(prompt_dim, num_states, bias=False)
        self.scale = prompt_dim ** -0.5
        nn.init.zeros_(self.proj.weight)

    def forward(self, prompt: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.bias + self.proj(self.prompt_norm(prompt) * self.scale)


LAYER_WEIGHTS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "static": StaticLayerWeights,
    "task": TaskLayerWeights,
    "prompt": PromptLayerWeights,
}


class LayerFusion(nn.Module):
    """Weighted sum of an encoder's hidden states with weights chosen by ``weighting``.

    Args:
        weighting: module mapping (prompt (B, P), task_ids (B,)) -> logits (B, L+1).
        num_states: L+1.
        hidden_size: D.
        temperature: softmax temperature tau.
        layer_norm: normalise each hidden state (no affine) before weighting.
    """

    def __init__(self, weighting: nn.Module, num_states: int, hidden_size: int, *, temperature: float = 1.0,
                 layer_norm: bool = True) -> None:
        super().__init__()
        self.weighting = weighting
        self.num_states = num_states
        self.hidden_size = hidden_size
        self.temperature = temperature
        self.layer_norm = layer_norm

    def weights(self, prompt: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """prompt (B, P), task_ids (B,) -> alpha (B, L+1), rows sum to 1."""
        return torch.softmax(self.weighting(prompt, task_ids) / self.temperature, dim=-1)

    def forward(self, hidden_states: torch.Tensor, prompt: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """hidden_states (L+1, B, T, D) -> fused (B, T, D).

        float16 / bfloat16 states (the feature cache's float16 batches) are widened to float32 here,
        on their device, one layer at a time: the fused output is float32, and no float32 copy of
        all L+1 layers is ever made (the backward pass widens each layer again)."""
        if hidden_states.shape[0] != self.num_states:
            raise ValueError(f"expected {self.num_states} hidden states, got {hidden_states.shape[0]}")
        if hidden_states.dtype in (torch.float16, torch.bfloat16):
            alpha = self.weights(prompt, task_ids).float()  # (B, L+1)
            if not hidden_states.requires_grad:  # cached features: nothing flows back into them
                return _FuseWidened.apply(hidden_states, alpha, self.layer_norm)
            fused = None  # a low-precision encoder being trained: the same sum, differentiated by autograd
            for layer in range(self.num_states):
                term = _widen(hidden_states[layer], self.layer_norm) * alpha[:, layer, None, None]
                fused = term if fused is None else fused + term
            return fused
        if self.layer_norm:
            hidden_states = nn.functional.layer_norm(hidden_states, (self.hidden_size,))
        alpha = self.weights(prompt, task_ids).to(hidden_states.dtype)  # (B, L+1)
        return torch.einsum("lbtd,bl->btd", hidden_states, alpha)


def _widen(state: torch.Tensor, layer_norm: bool) -> torch.Tensor:
    """One layer's (B, T, D) low-precision state -> float32, layer-normalised (no affine) if asked."""
    state = state.float()
    return nn.functional.layer_norm(state, state.shape[-1:]) if layer_norm else state


class _FuseWidened(torch.autograd.Function):
    """sum_l alpha[:, l] * widen(H_l) over low-precision states that need no gradient.

    Autograd would keep every widened layer for alpha's gradient (all L+1 layers in float32);
    this keeps only the low-precision input, already in memory, and widens each layer again in
    the backward pass: d loss / d alpha[b, l] = sum_{t,d} widen(H_l)[b, t, d] * grad[b, t, d]."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, alpha: torch.Tensor, layer_norm: bool) -> torch.Tensor:
        ctx.save_for_backward(hidden)
        ctx.layer_norm = layer_norm
        fused = None
        for layer in range(hidden.shape[0]):
            term = _widen(hidden[layer], layer_norm).mul_(alpha[:, layer, None, None])
            fused = term if fused is None else fused.add_(term)
        return fused

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (hidden,) = ctx.saved_tensors
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad = grad.float()
            grad_alpha = torch.stack([(_widen(hidden[layer], ctx.layer_norm) * grad).sum((1, 2))
                                      for layer in range(hidden.shape[0])], dim=1)
        return None, grad_alpha, None


def build_fusion(mode: str, num_states: int, hidden_size: int, prompt_dim: int, num_tasks: int, *,
                 temperature: float = 1.0, layer_norm: bool = True) -> LayerFusion:
    weighting = LAYER_WEIGHTS[mode](num_states, prompt_dim, num_tasks)
    return LayerFusion(weighting, num_states, hidden_size, temperature=temperature, layer_norm=layer_norm)
