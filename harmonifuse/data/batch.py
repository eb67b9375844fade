"""The batch every model and trainer consumes, and the collate function that builds it.

A :class:`SpeechBatch` carries *either* waveforms (a trainable encoder runs in the model) *or*
cached hidden states (frozen encoder, served by the feature cache), with lengths travelling
beside them (s3prl style) so nothing downstream guesses where padding starts.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

__all__ = ["SpeechBatch", "collate", "pad_waveforms", "pad_hidden_states", "MIXED_TASK"]

MIXED_TASK = "mixed"


@dataclass
class SpeechBatch:
    """One training/eval batch of B utterances.

    Attributes:
        task: "asr" | "ser" (every item that task) | "mixed" (see ``tasks``).
        tasks: per-item task, length B.
        ids: utterance ids, length B.
        targets: the answer per item: transcript (asr) or emotion label word (ser).
        waveforms: (B, S) float32, zero padded; with ``wave_lengths`` (B,) int64.
        hidden_states: (L+1, B, T, D) zero padded, float16 as the feature cache stores them (half
            the host memory and host-to-device copy of float32; the model's fusion widens them on
            its device, one layer at a time); with ``frame_lengths`` (B,) int64.
        skipped: ``(task, id)`` of bad samples dropped from this batch (bad-sample policy "skip").
        prompts: the training prompt per item, length B (see :mod:`harmonifuse.data.prompt_choice`);
            None: each task's ``model.tasks.prompts``.
    """

    task: str
    tasks: list[str]
    ids: list[str]
    targets: list[str]
    waveforms: torch.Tensor | None = None
    wave_lengths: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    frame_lengths: torch.Tensor | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    prompts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def _map_tensors(self, fn) -> "SpeechBatch":
        changes = {f.name: fn(getattr(self, f.name)) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **changes)

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "SpeechBatch":
        """A copy with every tensor on ``device``."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "SpeechBatch":
        """Called by DataLoader(pin_memory=True)."""
        return self._map_tensors(lambda t: t.pin_memory())


def _array(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# Padding runs in numpy: its strided float16 -> float32 copy is several times faster than torch's.
def pad_waveforms(waveforms: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S_i,)`` arrays or tensors -> (B, S) float32 zero padded, (B,) int64 lengths."""
    arrays = [_array(w) for w in waveforms]
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    out = np.zeros((len(arrays), int(lengths.max())), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return torch.from_numpy(out), torch.from_numpy(lengths)


def pad_hidden_states(states: Sequence[Any], dtype: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L+1, T_i, D)`` arrays or tensors -> (L+1, B, T, D) zero padded, (B,) int64 lengths.

    ``dtype``: a numpy dtype for the batch; default the items' (float16 for cache entries, which
    are copied once, straight from their memory maps into the padded buffer).
    """
    arrays = [_array(s) for s in states]
    lengths = np.array([a.shape[1] for a in arrays], dtype=np.int64)
    first = arrays[0]
    dtype = np.result_type(*{a.dtype for a in arrays}) if dtype is None else np.dtype(dtype)
    out = np.zeros((first.shape[0], len(arrays), int(lengths.max()), first.shape[2]), dtype=dtype)
    for i, a in enumerate(arrays):
        out[:, i, : a.shape[1]] = a
    return torch.from_numpy(out), torch.from_numpy(lengths)


def collate(items: Sequence[dict[str, Any] | None], task: str | None = None) -> SpeechBatch:
    """Items from :class:`~harmonifuse.data.dataset.SpeechTaskDataset` -> one padded :class:`SpeechBatch`.

    Each item is ``{"id", "task", "target"}`` plus ``"waveform"`` ((S,) float32) or
    ``"hidden_states"`` ((L+1, T, D)). Items carrying ``"error"`` (a bad sample under the skip
    policy) are dropped and listed in ``SpeechBatch.skipped``; ``None`` items are dropped silently.

    Args:
        task: the batch's task tag (the sampler's plan: "mixed" for a mixed stream even if all
            items share a task); default the common task of the items, else "mixed".
    """
    good = [item for item in items if item is not None and "error" not in item]
    skipped = [(item["task"], item["id"]) for item in items if item is not None and "error" in item]
    tasks = [item["task"] for item in good]
    if task is None:
        task = tasks[0] if tasks and len(set(tasks)) == 1 else MIXED_TASK
    batch = SpeechBatch(task=task, tasks=tasks, ids=[item["id"] for item in good],
                        targets=[item["target"] for item in good], skipped=skipped)
    if not good:
        return batch
    has_features = ["hidden_states" in item for item in good]
    if all(has_features):
        batch.hidden_states, batch.frame_lengths = pad_hidden_states([item["hidden_states"] for item in good])
    elif not any(has_features):
        batch.waveforms, batch.wave_lengths = pad_waveforms([item["waveform"] for item in good])
    else:
        raise ValueError("a batch mixes cached features and waveforms; use one feature cache for all tasks "
                         "or none")
    return batch
