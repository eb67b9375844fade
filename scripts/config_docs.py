"""Write docs/configuration.md: every config key with its dotted name, type, default and meaning.

The table is generated from the config dataclasses (the run config, whose ``model`` part is the
model config): names, types and defaults from ``dataclasses.fields``, the meaning from each
field's attribute docstring (the string literal that follows the field in the class body, read
with ``ast``). A field without one gets an empty meaning cell; write a docstring under the field
to fill it.

    python scripts/config_docs.py           # (re)write docs/configuration.md
    python scripts/config_docs.py --check   # exit 1 if docs/configuration.md is out of date
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "configuration.md"
COMMAND = "python scripts/config_docs.py"

if str(ROOT) not in sys.path:  # run from anywhere, without an installed package
    sys.path.insert(0, str(ROOT))


def root_config() -> type:
    """The dataclass a run's YAML file is loaded into (its ``model`` field is the model config)."""
    from harmonifuse.config.run import RunConfig

    return RunConfig


# -- reading the classes ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _module_tree(module_name: str) -> ast.Module:
    return ast.parse(inspect.getsource(sys.modules[module_name]))


def _class_node(cls: type) -> ast.ClassDef:
    for node in ast.walk(_module_tree(cls.__module__)):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return node
    raise LookupError(f"class {cls.__qualname__} not found in the source of {cls.__module__}")


def _one_line(text: str) -> str:
    return " ".join(inspect.cleandoc(text).split())


def class_docstring(cls: type) -> str:
    """The docstring written in the class body (not the signature dataclasses make up), one line."""
    doc = ast.get_docstring(_class_node(cls))
    return _one_line(doc) if doc else ""


def attribute_docstrings(cls: type) -> dict[str, str]:
    """Field name -> the string literal that follows its annotated assignment in the class body."""
    body = _class_node(cls).body
    docs: dict[str, str] = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = _one_line(following.value.value)
    return docs


# -- formatting ---------------------------------------------------------------------------------


def format_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else format_type(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(format_type(a) for a in args)}]" if args else name
    if tp is Any:
        return "Any"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def default_value(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_default(value: Any) -> str:
    """The default as it would be written in a YAML config."""
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value if value else '""'
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9).strip()


def _cell(text: str, code: bool = False) -> str:
    text = text.replace("|", "\\|")  # GitHub tables need the escape even inside code spans
    if code:
        return f"`{text}`" if text else text
    # outside code spans, "<cache dir>" would be read as an HTML tag
    parts = re.split(r"(`+[^`]*`+)", text)
    return "".join(p if p.startswith("`") else p.replace("<", "&lt;") for p in parts)


def _source_file(cls: type) -> str:
    path = Path(inspect.getfile(cls)).resolve()
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return path.name


# -- the document -------------------------------------------------------------------------------


def _sections(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) for ``cls`` and every dataclass nested in it, depth first."""
    found = [(prefix, cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found += _sections(tp, f"{prefix}.{f.name}" if prefix else f.name)
    return found


def _renames() -> tuple[dict[str, str], dict[str, Any]]:
    """Old keys of a run config: renamed (old -> new) and removed (-> old default)."""
    from harmonifuse.config import renames

    moved = {f"model.{old}": f"model.{new}" for old, new in renames.MODEL_RENAMES.items()}
    removed = {**{f"model.{k}": v for k, v in renames.MODEL_REMOVED.items()}, **renames.RUN_REMOVED}
    return moved, removed


def render() -> str:
    """The whole of docs/configuration.md."""
    root = root_config()
    sections = _sections(root)
    sources = sorted({_source_file(cls) for _, cls in sections})
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}` from the config dataclasses; do not edit by hand. -->",
        "",
        f"Generated by `{COMMAND}` from the dataclasses in "
        + ", ".join(f"`{s}`" for s in sources)
        + "; a test (`tests/test_config_docs.py`) fails when this file is out of date.",
        "",
        "A run config (`harmonifuse train CONFIG`) is a YAML file with the sections below; every key is",
        "optional and falls back to the default shown. Any key can be overridden on the command line",
        "by its dotted name (`harmonifuse train CONFIG train.max_steps=500 model.fusion.mode=task`;",
        "a mapping value such as `data.train={asr: a.jsonl}` replaces the whole mapping). Unknown",
        "keys and ill-typed values are rejected with the dotted name. A saved model's `config.yaml`",
        "holds the `model` section alone, without the `model.` prefix.",
        "",
        "A run config may build on another with a top-level `extends: other.yaml` (relative to the",
        "file naming it): mappings merge key by key, anything else (lists too) is replaced.",
        "`harmonifuse resolve CONFIG [-o FILE]` writes a config complete: its `extends` chain merged,",
        "old keys renamed, every field set (the defaults too), its comments kept. The recipes in",
        "`configs/` are stored that way, so a changed default never changes what they mean.",
        "The model section's defaults are the shipped recipe's (`configs/demo.yaml`): `ModelConfig()`",
        "builds the shipped model's architecture.",
        "",
        "Old keys (`harmonifuse/config/renames.py`) still load, in YAML files, saved models and",
        "overrides alike: a renamed key moves to its new place with a warning naming both; a removed",
        "setting is an error unless it holds its old default (then a warning).",
        "",
        "| old key | now |",
        "|---|---|",
        *[f"| `{old}` | `{new}` |" for old, new in _renames()[0].items()],
        *[f"| `{old}` | removed (old default `{format_default(default)}`) |" for old, default in _renames()[1].items()],
        "",
        "Types: `a | b | c` is a choice of exactly these values. The meaning is the field's",
        "docstring in the source; an empty cell means the field has none yet.",
        "",
    ]
    for prefix, cls in sections:
        hints = typing.get_type_hints(cls)
        docs = attribute_docstrings(cls)
        leaves = [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]
        if not leaves:
            continue
        lines += [f"## `{prefix}`", ""]
        summary = class_docstring(cls)
        if summary:
            lines += [summary, ""]
        lines += [f"Source: `{_source_file(cls)}`, `{cls.__name__}`.", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in leaves:
            lines.append("| " + " | ".join([
                _cell(f"{prefix}.{f.name}", code=True),
                _cell(format_type(hints[f.name]), code=True),
                _cell(format_default(default_value(f)), code=True),
                _cell(docs.get(f.name, "")),
            ]) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if docs/configuration.md differs from what this script writes")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else None
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run `{COMMAND}`", file=sys.stderr)
            return 1
        print(f"{OUTPUT.relative_to(ROOT)} is up to date")
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
