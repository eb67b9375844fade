"""Checkpoints that survive a kill at any instant.

A checkpoint is a folder ``checkpoints/step_000250/`` holding the trained weights
(``trained.safetensors``), the optimiser, scheduler, data-loader and RNG states (``state.pt``, read
back with ``torch.load(weights_only=True)``) and a ``done`` marker. It is written under a temporary
name and renamed into place (:func:`harmonifuse.atomic.atomic_directory`), so a folder without the
marker never exists under a real name.
The best model so far is exported beside them as a ready-to-use model folder (``best/``).
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harmonifuse.atomic import DiskFullError, atomic_directory, leftovers, temp_path
from harmonifuse.weights import WeightsError, load_weights, save_weights

log = logging.getLogger(__name__)

DONE = "done.json"


def rng_state() -> dict[str, Any]:
    py_state = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():  # dropout on a GPU draws from the current device's generator
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
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
        def write(tmp: Path) -> None:
            save_weights(trained, tmp / "trained.safetensors")  # with a checksum of the tensors
            torch.save(state, tmp / "state.pt")
            (tmp / DONE).write_text(json.dumps({"step": step}))

        previous = self.latest()
        try:
            final = atomic_directory(self.root / f"step_{step:07d}", write)
        except DiskFullError as error:
            raise DiskFullError(error.target, error, f"checkpoint {step} was not saved; " + (
                f"the previous one, {previous.name}, is intact and `harmonifuse train CONFIG --resume` continues "
                "from it" if previous else "there is no earlier one")) from error.__cause__
        self._prune()
        return final

    def load(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Weights and state of one checkpoint; CheckpointError if a file is missing or damaged."""
        try:
            trained = load_weights(path / "trained.safetensors")
        except WeightsError as error:
            raise CheckpointError(path, error.problem) from error
        try:
            state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        except Exception as error:  # noqa: BLE001 - a missing, truncated or corrupt pickle archive
            raise CheckpointError(path, f"state.pt is unreadable ({error})") from error
        return trained, state

    def load_latest(self) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
        """The newest checkpoint that loads, skipping (with a warning) damaged ones; None if none exist."""
        damaged = []
        for path in reversed(self.complete()):
            try:
                return (path, *self.load(path))
            except CheckpointError as error:
                log.warning("%s; trying the one before it", error)
                damaged.append(str(error))
        if damaged:
            raise CheckpointError(self.root, "no checkpoint can be read: " + "; ".join(damaged))
        return None

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            aside = temp_path(old)  # out of the way at once: a kill mid-removal leaves no half checkpoint
            old.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        for stale in [*leftovers(self.root), *self.root.glob(".tmp-*")]:  # left by a kill during a save
            shutil.rmtree(stale, ignore_errors=True)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from; names it and what is wrong."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"checkpoint {path} is damaged: {problem}")
