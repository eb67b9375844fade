"""The trained model that ships inside the package (package data), and how the default model is found.

Order: an explicit folder, else ``$HARMONIFUSE_MODEL``, else the shipped model, so any install,
editable or not, run from any folder, has a model.
"""
from __future__ import annotations

import os
from pathlib import Path

from harmonifuse.config import ConfigError

MODEL_ENV = "HARMONIFUSE_MODEL"
CONFIG_NAME = "config.yaml"  # a model folder: its config and its trained weights
WEIGHTS_NAME = "trained.safetensors"
DEMO_MODEL = Path(__file__).resolve().parent / "harmonifuse-demo"


def find_model_folder(name_or_path: str | os.PathLike) -> Path | None:
    """A trained model folder by path, or the shipped model by its name ("harmonifuse-demo"); None if neither."""
    path = Path(name_or_path).expanduser()
    for candidate in (path, DEMO_MODEL if os.fspath(name_or_path) == DEMO_MODEL.name else None):
        if candidate is not None and (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    return None


def default_model() -> str | None:
    """$HARMONIFUSE_MODEL, else the model shipped in the package when present, else None."""
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV]
    return str(DEMO_MODEL) if (DEMO_MODEL / CONFIG_NAME).is_file() else None


def resolve_model(model: str | os.PathLike | None) -> str:
    """The model to use: ``model``, else $HARMONIFUSE_MODEL, else the shipped model.

    Raises:
        ConfigError: none of them names an existing model, saying how to name one.
    """
    if model:
        return os.fspath(model)
    chosen = default_model()
    if chosen is None:
        raise ConfigError(f"no trained model found: pass --model FOLDER or set {MODEL_ENV}=FOLDER "
                          f"(the shipped model is missing from {DEMO_MODEL})")
    if not Path(chosen).exists():
        raise ConfigError(f"{MODEL_ENV}={chosen}: no model folder or config file there; "
                          f"point it at a model folder, or unset it to use the shipped model")
    return chosen
