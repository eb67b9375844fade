"""A training stage: what it trains, how fast, on which batches, with which objective, for how long.

The trainer runs one loop over a list of stages (the alignment stage, then the main stage); what
differs between them is data, not code.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from harmonifuse.data.dataset import MultiTaskLoader


@dataclass
class Stage:
    name: Literal["align", "main"]
    """The log records' kind ("align" / "train"), the prompt choice's stage and the checkpoint's key."""
    objective: Literal["align", "answer"]
    """What ``HarmoniFuse.forward`` computes: the embedding-CTC alone, or the LLM's answer loss (+ CTC)."""
    loader: MultiTaskLoader
    optimizer: torch.optim.Optimizer
    """Holds exactly the parameters this stage trains."""
    scheduler: torch.optim.lr_scheduler.LRScheduler
    max_steps: int
    max_minutes: float
    """0: no limit."""
    budget: Literal["stage", "run"]
    """What ``max_minutes`` counts: this stage's own minutes, or the whole run's (every stage)."""
    eval_every: int
    evaluate: Callable[[], bool]
    """Scores dev (on every rank: each its share under ddp, all in step under fsdp) and logs it; returns
    True to stop early (every rank sees the same answer)."""
    grad_accum: int = 1
    step: int = 0
    seconds: float = 0.0
    done: bool = False

    @property
    def log_kind(self) -> str:
        return "train" if self.name == "main" else self.name

    def loop_state(self, parallel, model) -> dict[str, Any]:
        """Optimiser (full tensors, through ``parallel``: a collective under fsdp), scheduler and loader states."""
        return {"optimizer": parallel.optimizer_state(model, self.optimizer), "scheduler": self.scheduler.state_dict(),
                "loader": self.loader.state_dict()}

    def load_loop_state(self, state: dict[str, Any], parallel, model) -> None:
        parallel.load_optimizer_state(model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
