"""Old config keys and where they went: the one table every loader reads (YAML files, model folders'
``config.yaml``, dotted overrides, dicts given to ``from_dict``).

A renamed key is moved to its new place with one :class:`ConfigRenamedWarning` naming both keys; a
key of a removed setting is an error when it asks for anything but the old default (the model it
describes cannot be built any more), and a warning when it holds the default (it changed nothing).
Keys are dotted paths inside the ``model:`` section; a run config has them under ``model.``.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

from harmonifuse.config.errors import ConfigError


class ConfigRenamedWarning(UserWarning):
    """A config key was renamed (its value moved to the new key) or a removed setting was ignored."""


MODEL_RENAMES: dict[str, str] = {
    "augment": "feature_masking",
    "projector.ctc_weight": "ctc.loss_weight",
    "projector.ctc_tasks": "ctc.tasks",
    "projector.ctc_scale": "ctc.scale",
    "projector.ctc_learn_scale": "ctc.learn_scale",
    "projector.ctc_learned_blank": "ctc.learned_blank",
    "projector.ctc_vocab_chunk": "ctc.vocab_chunk",
}
"""Old key -> new key, inside the model section (a section's rename moves all its keys)."""

MODEL_REMOVED: dict[str, Any] = {
    "projector.context_layers": 0,
    "projector.context_heads": 8,
    "projector.context_kernel": 1,
    "projector.token_mixture": False,
}
"""Settings of probes that were not adopted, with the value that meant "off" (their old default)."""

RUN_REMOVED: dict[str, Any] = {"optim.fusion_lr_scale": 1.0}
"""Removed settings outside the model section, with their old default."""

RENAMES: dict[str, str] = {**MODEL_RENAMES, **{f"model.{old}": f"model.{new}" for old, new in MODEL_RENAMES.items()}}
"""Both scopes: a model folder's keys and a run config's (no key of one is a valid key of the other)."""
REMOVED: dict[str, Any] = {**MODEL_REMOVED, **{f"model.{k}": v for k, v in MODEL_REMOVED.items()}, **RUN_REMOVED}


def _warn(message: str) -> None:
    warnings.warn(message, ConfigRenamedWarning, stacklevel=4)


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def _pop(data: dict, parts: list[str]) -> tuple[bool, Any]:
    node = data
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return False, None
    if parts[-1] not in node:
        return False, None
    return True, node.pop(parts[-1])


def _has(data: dict, parts: list[str]) -> bool:
    node: Any = data
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _put(data: dict, parts: list[str], value: Any, name: str) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config field '{'.'.join(parts[:i + 1])}' must be a mapping to hold '{name}'")
        node = child
    node[parts[-1]] = value


def _prune(data: dict, parts: list[str]) -> None:
    """Drop the mappings along ``parts`` that a move left empty."""
    for depth in range(len(parts) - 1, 0, -1):
        parent: Any = data
        for part in parts[:depth - 1]:
            parent = parent.get(part)
            if not isinstance(parent, dict):
                return
        if parent.get(parts[depth - 1]) != {}:
            return
        parent.pop(parts[depth - 1])


def _removed_check(key: str, value: Any, default: Any, source: str) -> None:
    if value != default:
        raise ConfigError(f"{_where(source)}config field '{key}' was removed (a probe that was not adopted); "
                          f"it is set to {value!r}, which this version cannot build: delete the key "
                          f"(only its old default {default!r} is accepted, and ignored)")
    _warn(f"{_where(source)}config field '{key}' was removed (a probe that was not adopted); its value "
          f"{value!r} is the old default and is ignored: delete the key")


def migrate(data: dict, source: str = "") -> dict:
    """A copy of config mapping ``data`` with every old key moved to its new place (one warning
    each) and every removed key dropped (a warning at its old default, else :class:`ConfigError`).
    ``source`` (a file name) prefixes the messages. Setting both an old key and its new one is an error."""
    if not isinstance(data, dict) or not any(_has(data, k.split(".")) for k in (*RENAMES, *REMOVED)):
        return data
    data = copy.deepcopy(data)
    for key, default in REMOVED.items():
        found, value = _pop(data, key.split("."))
        if found:
            _prune(data, key.split("."))
            _removed_check(key, value, default, source)
    for old, new in RENAMES.items():
        old_parts, new_parts = old.split("."), new.split(".")
        found, value = _pop(data, old_parts)
        if not found:
            continue
        if _has(data, new_parts):
            raise ConfigError(f"{_where(source)}config field '{old}' is the old name of '{new}', and both are "
                              f"set: keep '{new}' alone")
        _prune(data, old_parts)
        _put(data, new_parts, value, new)
        _warn(f"{_where(source)}config field '{old}' is now '{new}': its value was moved there; "
              f"rename the key (harmonifuse resolve writes a config file in the new form)")
    return data


def migrate_override(parts: list[str], value: Any, source: str = "") -> list[str] | None:
    """The key path of a dotted override with its old prefix renamed (one warning); None for a
    removed setting at its old default (a warning; the override is dropped), a
    :class:`ConfigError` for one at any other value."""
    key = ".".join(parts)
    for name, default in REMOVED.items():
        if key == name:
            _removed_check(key, value, default, source)
            return None
    for old, new in RENAMES.items():
        if key == old or key.startswith(old + "."):
            renamed = new + key[len(old):]
            _warn(f"{_where(source)}config field '{key}' is now '{renamed}': the override was applied there; "
                  "rename the key")
            return renamed.split(".")
    return parts
