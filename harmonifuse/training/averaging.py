"""Averaging trained models: one model folder whose weights are a weighted mean of several.

Models fine-tuned from one start lie in one basin of the loss, so the mean of their weights is a
model too, often more robust than any of them ("model soups", Wortsman et al. 2022; interpolating a
fine-tune with its start, WiSE-FT, Wortsman et al. 2022; ESPnet averages a run's best checkpoints
the same way). It takes model folders (a run's ``best/``, the shipped model). Only the trained weights are averaged; the
frozen base models are the same in every folder by construction.

The averaged folder's emotion temperature is reset to 1 (uncalibrated): a temperature fitted for
one set of weights says nothing about another. Run ``harmonifuse calibrate`` on it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from harmonifuse.config import ConfigError, to_dict

__all__ = ["INFERENCE_FIELDS", "PROVENANCE_NAME", "average_models"]

INFERENCE_FIELDS = ("calibration", "decoding", "vad")
"""Model config sections that only change how answers are read out, not the weights: they may differ
between the averaged models (the first model's are kept)."""
PROVENANCE_NAME = "averaging.json"


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(_flat(value, name) if isinstance(value, dict) else {name: value})
    return out


def _architecture(config) -> dict:
    """The config fields that decide the weights' meaning: all but :data:`INFERENCE_FIELDS`."""
    return {k: v for k, v in _flat(to_dict(config)).items() if k.split(".")[0] not in INFERENCE_FIELDS}


def average_models(models: Sequence[str | os.PathLike], out: str | os.PathLike,
                   weights: Sequence[float] | None = None) -> Path:
    """Write to ``out`` a model folder whose trained weights are the weighted mean of ``models``'.

    Args:
        models: two or more model folders (or the shipped model's name) with the same model config
            apart from :data:`INFERENCE_FIELDS` and the same trained tensors.
        out: a new folder (refused if it already holds a model: nothing is overwritten).
        weights: one non-negative weight per model (normalised to sum 1); default: equal.

    Raises:
        ConfigError: fewer than two models, a missing folder, bad weights, differing configs.
        WeightsError: a weights file that is unreadable or holds other tensors than the first's.
    """
    from harmonifuse.atomic import atomic_write, atomic_write_text
    from harmonifuse.model import config_text, read_folder_config
    from harmonifuse.pretrained import CONFIG_NAME, WEIGHTS_NAME, find_model_folder
    from harmonifuse.weights import WeightsError, load_weights, save_weights, tensors_digest

    if len(models) < 2:
        raise ConfigError(f"averaging needs two or more models, got {len(models)}")
    folders = []
    for model in models:
        folder = find_model_folder(model)
        if folder is None:
            raise ConfigError(f"{model}: not a model folder (it needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                              "pass a folder written by `harmonifuse train` (its best/) or the shipped model's name")
        folders.append(folder)
    weights = [1.0] * len(folders) if weights is None else [float(w) for w in weights]
    if len(weights) != len(folders):
        raise ConfigError(f"--weights: {len(weights)} weights for {len(folders)} models; give one per model")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--weights: {weights} must be >= 0 with a positive sum")
    total = sum(weights)
    weights = [w / total for w in weights]
    out = Path(out)
    holds_model = (out / CONFIG_NAME).exists() or (out / WEIGHTS_NAME).exists()
    if holds_model or any(out.resolve() == f.resolve() for f in folders):
        raise ConfigError(f"{out} already holds a model; averaging never overwrites one: choose a new --out folder")

    configs = [read_folder_config(f / CONFIG_NAME, None) for f in folders]
    reference = _architecture(configs[0])
    for folder, config in zip(folders[1:], configs[1:]):
        fields = _architecture(config)
        differ = sorted(k for k in reference.keys() | fields.keys() if reference.get(k) != fields.get(k))
        if differ:
            name = differ[0]
            raise ConfigError(f"{folder} was built with model.{name} = {fields.get(name)!r}, {folders[0]} with "
                              f"{reference.get(name)!r} ({len(differ)} field(s) differ): only models of one "
                              "architecture can be averaged")

    mean: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    digests = []
    for folder, weight in zip(folders, weights):
        path = folder / WEIGHTS_NAME
        state = load_weights(path)
        digests.append(tensors_digest(state))
        if mean and (state.keys() != mean.keys()
                     or any(state[k].shape != mean[k].shape for k in mean)):
            odd = sorted(state.keys() ^ mean.keys()) or [k for k in mean if state[k].shape != mean[k].shape]
            raise WeightsError(path, f"holds other trained tensors than {folders[0] / WEIGHTS_NAME} (first: {odd[0]})",
                               "average models trained with one recipe from one start")
        for name, tensor in state.items():
            dtypes.setdefault(name, tensor.dtype)
            mean[name] = mean.get(name, 0) + weight * tensor.double()  # float64: no drift with many models
    averaged = {name: tensor.to(dtypes[name]) for name, tensor in mean.items()}

    config = dataclasses.replace(configs[0], calibration=type(configs[0].calibration)())  # fitted per weights
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_weights(averaged, tmp))
    atomic_write_text(out / CONFIG_NAME, config_text(config))
    provenance = {"models": [str(f) for f in folders], "weights": weights,
                  "sha256": digests,
                  "note": "emotion temperature reset to 1: run `harmonifuse calibrate` on this folder"}
    atomic_write_text(out / PROVENANCE_NAME, json.dumps(provenance, indent=1) + "\n")
    return out
