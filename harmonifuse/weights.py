"""Trained weights on disk: safetensors files carrying a checksum, read back with clear errors.

safetensors checks a file's header, not its tensor bytes: a flipped byte in the data loads as
silently wrong weights. :func:`save_weights` stores a SHA-256 of the tensors (names, dtypes,
shapes and bytes) in the file's metadata (``harmonifuse_sha256``); :func:`load_weights` checks it
when present (files written before it existed load unchecked) and turns every way a file can be
unusable (missing, a folder, truncated, not safetensors, damaged) into a :class:`WeightsError`
that names the file and says what to do.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

__all__ = ["CHECKSUM_KEY", "WeightsError", "load_weights", "save_weights", "tensors_digest"]

CHECKSUM_KEY = "harmonifuse_sha256"
REFETCH = "copy or download the model folder again (or retrain it)"


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file, the problem and the fix."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str = REFETCH) -> None:
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{path}: {problem}; {fix}")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_weights(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as safetensors with their checksum (not atomic: wrap in ``atomic_write``)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {}),
                                            CHECKSUM_KEY: tensors_digest(tensors)})


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked against its stored checksum when it has one.

    Raises:
        WeightsError: the file is missing, a folder, truncated, not safetensors, or damaged.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise WeightsError(path, "weights file not found", REFETCH)
    if path.is_dir():
        raise WeightsError(path, "is a folder, not a weights file", "point at the .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except PermissionError as error:
        raise WeightsError(path, "permission denied", "make the file readable (chmod a+r)") from error
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for every defect
        size = path.stat().st_size
        raise WeightsError(path, f"not a readable safetensors file ({size} bytes; {_short(error)}): it is "
                                 "truncated or corrupt", REFETCH) from error
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensors_digest(tensors) != expected:
        raise WeightsError(path, "checksum mismatch: the tensors are not the ones written (the file is damaged)",
                           REFETCH)
    return tensors


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:200]
