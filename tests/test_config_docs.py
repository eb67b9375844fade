"""docs/configuration.md is generated from the config dataclasses by scripts/config_docs.py and
must stay equal to what the script renders now."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "config_docs.py"
DOC = ROOT / "docs" / "configuration.md"


def _load_script():
    spec = importlib.util.spec_from_file_location("harmonifuse_config_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(text: str, key: str) -> list[str]:
    """The cells of the table row for dotted ``key`` (pipes escaped as \\| stay inside a cell)."""
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells and cells[0] == f"`{key}`":
            return cells
    raise AssertionError(f"no row for {key} in the rendered configuration reference")


def test_configuration_doc_is_up_to_date():
    script = _load_script()
    assert DOC.is_file(), f"{DOC.relative_to(ROOT)} is missing: run `python scripts/config_docs.py`"
    assert DOC.read_text(encoding="utf-8") == script.render(), (
        f"{DOC.relative_to(ROOT)} is out of date with the config dataclasses: "
        "regenerate it with `python scripts/config_docs.py`")


def test_render_lists_keys_with_type_default_and_meaning():
    text = _load_script().render()
    key, type_, default, _ = _row(text, "model.fusion.mode")
    assert default == "`prompt`"
    assert "static" in type_ and "task" in type_ and "prompt" in type_
    # a field with an attribute docstring gets it as its meaning
    assert _row(text, "train.max_steps")[3].startswith("Steps of the main stage")
