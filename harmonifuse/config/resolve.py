"""A run config written out complete: its ``extends`` chain merged, old keys renamed, every field
set (the defaults too), and the comments of the file it came from kept beside the keys they
described. A recipe stored this way means the same whatever later versions choose as defaults:
``harmonifuse resolve RECIPE -o RECIPE`` (see ``harmonifuse resolve --help``)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from harmonifuse.config.loading import load_config, to_dict

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")


def _inline_comment(rest: str) -> str | None:
    """The comment after a key's value (outside quotes), without its ``#``."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[i + 1:].strip()
    return None


def _comments(text: str) -> tuple[list[str], dict[tuple[str, ...], list[str]]]:
    """A YAML file's header comment lines and, per dotted key path of a block-style key, the
    comment lines before it and after it on its line (block keys only; comments inside a flow
    mapping stay with the key that opens it)."""
    from harmonifuse.config.renames import RENAMES

    header: list[str] = []
    pending: list[str] = []
    found: dict[tuple[str, ...], list[str]] = {}
    stack: list[tuple[int, str]] = []
    seen_key = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            (pending if seen_key else header).append(stripped[1:].strip())
            continue
        if not stripped:
            if not seen_key and header:
                header.append("")
            continue
        match = _KEY.match(line)
        if not match:  # a continued flow mapping or list: its comments join the key that opened it
            inline = _inline_comment(line)
            if inline and stack:
                found.setdefault(tuple(k for _, k in stack), []).append(inline)
            continue
        seen_key = True
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        path = tuple(k for _, k in stack)
        inline = _inline_comment(match["rest"])
        lines = pending + ([inline] if inline else [])
        pending = []
        if lines:
            found.setdefault(path, []).extend(lines)
    renamed: dict[tuple[str, ...], list[str]] = {}
    for path, lines in found.items():
        dotted = ".".join(path)
        for old, new in RENAMES.items():
            if dotted == old or dotted.startswith(old + "."):
                dotted = new + dotted[len(old):]
                break
        renamed.setdefault(tuple(dotted.split(".")), []).extend(lines)
    while header and not header[-1]:
        header.pop()
    return header, renamed


def _flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=2**30, allow_unicode=True, sort_keys=False)
    return text[:-5].strip() if text.endswith("\n...\n") else text.strip()


FLOW_WIDTH = 90
"""A list is written on its key's line when the line fits in this many characters."""


def _block(data: dict, indent: int = 0) -> list[str]:
    """``data`` as block-style YAML lines: mappings one key a line, a list on its key's line when
    it is short, else one item a line."""
    pad = " " * indent
    lines = []
    for key, value in data.items():
        head = f"{pad}{_flow(key)}:"
        leaf = isinstance(value, list) and not any(isinstance(v, dict) for v in value)
        short = leaf and len(head) + 1 + len(_flow(value)) <= FLOW_WIDTH
        if not isinstance(value, (dict, list)) or not value or short:
            lines.append(f"{head} {_flow(value)}")
        elif isinstance(value, dict):
            lines += [head, *_block(value, indent + 2)]
        else:
            lines += [head, *(f"{pad}  - {_flow(item)}" for item in value)]
    return lines


def resolved_yaml(cls: type, path: str | Path, overrides: list[str] | None = None, *,
                  note: str | None = None, comments_from: str | Path | None = None) -> str:
    """``path`` (a YAML config of dataclass ``cls``, its ``extends`` chain and ``overrides``
    applied) as complete YAML text: every field, the source's comments kept (a comment on a key
    that is now inside a one-line mapping goes on the line before it; ``comments_from``: another
    file's comments instead)."""
    config = load_config(cls, path, overrides)
    lines = _block(to_dict(config))
    header, comments = _comments(Path(comments_from or path).read_text(encoding="utf-8"))
    emitted: list[tuple[tuple[str, ...], int]] = []
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        match = _KEY.match(line)
        if match:
            indent = len(match["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, match["key"]))
            emitted.append((tuple(k for _, k in stack), i))
    where = {path_: i for path_, i in emitted}
    before: dict[int, list[str]] = {}
    for comment_path, texts in comments.items():
        target = comment_path
        while target and target not in where:
            target = target[:-1]
        if not target:
            continue
        if target != comment_path:  # a deeper key, written inside its parent's one-line mapping
            texts = [f"{'.'.join(comment_path[len(target):])}: {t}" for t in texts]
        before.setdefault(where[target], []).extend(texts)
    out = [f"# {line}" if line else "#" for line in header]
    out += [f"# {note}"] if note else []
    for i, line in enumerate(lines):
        indent = " " * (len(line) - len(line.lstrip(" ")))
        out += [f"{indent}# {t}" if t else f"{indent}#" for t in before.get(i, [])]
        out.append(line)
    return "\n".join(out) + "\n"
