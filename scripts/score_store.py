"""Label scores kept on disk between runs of a measurement, for the research scripts
(scripts/calibration_shift.py, scripts/ser_label_fusion.py; run from the checkout, which puts
scripts/ on the import path)."""
from __future__ import annotations

import os
from pathlib import Path

import torch


class ScoreStore:
    """Label scores kept on disk between runs of a measurement (``scores``: name -> (N, K) tensor),
    reused only for the weights that produced them: a store written by another model (or by the
    shipped model before an update) reads as empty, so no figure is computed from stale scores."""

    def __init__(self, path: str | os.PathLike, model):
        from harmonifuse.weights import tensors_digest

        self.path = Path(path)
        self.model_digest = tensors_digest(model.trained_state_dict())
        stored = torch.load(self.path, weights_only=True) if self.path.exists() else {}
        same = isinstance(stored, dict) and stored.get("model_sha256") == self.model_digest
        self.scores: dict[str, torch.Tensor] = dict(stored["scores"]) if same else {}

    def save(self) -> None:
        """Write every score so far (atomically: a killed run keeps what it scored)."""
        from harmonifuse.atomic import atomic_write

        state = {"model_sha256": self.model_digest, "scores": self.scores}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))
