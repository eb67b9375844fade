"""Checkpoints that survive a kill at any instant.

A checkpoint is a folder ``checkpoints/step_000250/`` holding the trained weights
(``trained.safetensors``), the optimiser, scheduler, data-loader and RNG states (``state.pt``, read
back with ``torch.load(weights_only=True)``) and a ``done`` marker. It is written under a temporary
name and renamed into place, so a folder without the marker never exists under a real name.
The best model so far is exported beside them as a ready-to-use model folder (``best/``).
"""
from __future__ import annotations

import json
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

DONE = "done.json"


def rng_state() -> dict[str, Any]:
    py_state = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


class CheckpointManager:
    def __init__(self, output_dir: str | Path, keep_last: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / DONE).is_file())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, trained: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in trained.items()}, str(tmp / "trained.safetensors"))
            torch.save(state, tmp / "state.pt")
            (tmp / DONE).write_text(json.dumps({"step": step}))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        return final

    def load(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        trained = load_file(str(path / "trained.safetensors"))
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        return trained, state

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):  # left by a kill during a save
            shutil.rmtree(stale, ignore_errors=True)
