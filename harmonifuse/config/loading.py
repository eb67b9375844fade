"""Typed configuration: dataclasses loaded from YAML, with dotted ``key=value`` overrides.

Every field is checked against its type and, where it has one, its set of choices; unknown keys
and bad values raise :class:`ConfigError` naming the dotted field, e.g. ``model.fusion.mode``.
A YAML file may build on another with ``extends: other.yaml``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from harmonifuse.config.errors import ConfigError  # noqa: F401 (re-exported)


def _check(condition: bool, name: str, problem: str) -> None:
    if not condition:
        raise ConfigError(f"config field '{name}': {problem}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (recursively), converting where lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}': expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config field '{name}': {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"config field '{name}': {value!r} does not fit {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{name}': expected a list, got {value!r}")
        return [_coerce(item, args[0], f"{name}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}': expected a mapping, got {value!r}")
        return {_coerce(k, args[0], name): _coerce(v, args[1], f"{name}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field '{name}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config field '{name}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field '{name}': expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field '{name}': expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and ill-typed values (old
    keys of a model or run config are renamed first: harmonifuse/config/renames.py)."""
    if getattr(cls, "config_scope", None) and isinstance(data, dict):
        from harmonifuse.config.renames import migrate

        data = migrate(data)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    dotted = (prefix + ".") if prefix else ""
    unknown = sorted(set(data) - known)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean '{dotted}{close[0]}'? " if close else ""
        raise ConfigError(
            f"config field '{dotted}{unknown[0]}' is unknown; {hint}known fields here: {sorted(known)}"
        )
    values = {key: _coerce(value, hints[key], f"{dotted}{key}") for key, value in data.items()}
    instance = cls(**values)
    validate(instance, prefix)
    return instance


def validate(instance: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}.{f.name}" if prefix else f.name)
    if hasattr(instance, "validate"):
        instance.validate(prefix or type(instance).__name__)


def to_dict(instance: Any) -> dict:
    return dataclasses.asdict(instance)


def to_yaml(instance: Any) -> str:
    """A config dataclass as YAML text, keys in field order: what ``load_config`` reads back."""
    return yaml.safe_dump(to_dict(instance), sort_keys=False)


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """``["model.fusion.mode=task", "data.train={asr: a.jsonl}"]`` -> ``[(path, value), ...]`` (values parsed as YAML)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({error})") from error
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of ``data`` with each dotted key set; the named leaf is replaced, so a mapping value
    (``data.train={asr: a.jsonl}``) replaces the whole mapping instead of merging into it."""
    from harmonifuse.config.renames import migrate_override

    data = copy.deepcopy(data)
    for parts, value in parse_overrides(overrides):
        parts = migrate_override(parts, value)
        if parts is None:  # a removed setting at its old default: ignored (with a warning)
            continue
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override of '{'.'.join(parts)}': '{'.'.join(parts[:i + 1])}' is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; point at a YAML file")
        raise ConfigError(f"config file {path} does not exist; check the path (e.g. configs/demo.yaml)")
    try:
        with open(path, encoding="utf-8") as handle:  # a stream: YAML's messages then name the file and line
            data = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start}); point at a YAML file") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    from harmonifuse.config.renames import migrate

    return migrate(data, str(path))  # old keys renamed (one warning each), removed settings checked


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge key by key, anything else (lists too) is replaced."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_yaml_extends(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML file with its ``extends: other.yaml`` chain resolved (relative to the file naming it):
    a recipe that builds on another holds only what it changes. Each file's old keys are renamed
    before the merge. ``harmonifuse resolve`` writes the complete result."""
    path = Path(path)
    data = load_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"config field 'extends' of {path} must name one YAML file, got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if parent_path in _seen or parent_path == path.resolve():
        raise ConfigError(f"config field 'extends' of {path}: {parent} extends itself through "
                          f"{' -> '.join(p.name for p in _seen)}; break the cycle")
    if not parent_path.is_file():
        raise ConfigError(f"config field 'extends' of {path}: {parent_path} does not exist; the path is "
                          "relative to the file that names it")
    return _merge(load_yaml_extends(parent_path, _seen + (path.resolve(),)), data)


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Load dataclass ``cls`` from a YAML file (optional; its ``extends`` chain resolved) and dotted overrides."""
    data = load_yaml_extends(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ConfigError as error:
        if path is None:
            raise
        raise ConfigError(f"{path}: {error}") from None
