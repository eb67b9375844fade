"""Prompt vectors: one (P,) vector per task prompt that drives the fusion and the gate.

Both variants read only frozen parts of the LLM, so a prompt's vector is computed once and cached.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class MeanEmbeddingPrompt(nn.Module):
    """p = mean of the prompt's token embeddings (the LLM's frozen input table)."""

    def __init__(self, llm) -> None:
        super().__init__()
        self._llm = [llm]  # not a submodule: its weights belong to the LLM
        self._cache: dict[str, torch.Tensor] = {}
        self.fixed: str | None = None
        """Why no new prompt may be computed (every vector was computed ahead), or None: compute on first use."""

    @property
    def llm(self):
        return self._llm[0]

    @property
    def dim(self) -> int:
        return self.llm.hidden_size

    def compute(self, prompt: str) -> torch.Tensor:
        ids = self.llm.tokenize(prompt)
        return self.llm.embed(ids).float().mean(0)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        """B prompt strings -> (B, P) float32 vectors."""
        new = sorted(set(prompts) - set(self._cache))
        if new and self.fixed:
            raise ValueError(f"no prompt vector for {new}: {self.fixed}; add the phrasing there")
        for prompt in new:
            with torch.no_grad():
                self._cache[prompt] = self.compute(prompt).detach()
        return torch.stack([self._cache[p] for p in prompts])


class HiddenStatePrompt(MeanEmbeddingPrompt):
    """p = mean of the base LLM's last hidden states over the prompt (LoRA disabled, so cacheable)."""

    def compute(self, prompt: str) -> torch.Tensor:
        ids = torch.tensor([self.llm.tokenize(prompt)], device=self.llm.device)
        with self.llm.base_model_only():
            out = self.llm.model(input_ids=ids, output_hidden_states=True)
        return out.hidden_states[-1][0].float().mean(0)


PROMPT_ENCODERS: dict[str, Callable] = {
    "mean_embedding": MeanEmbeddingPrompt,
    "hidden_state": HiddenStatePrompt,
}
