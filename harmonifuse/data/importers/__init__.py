"""Corpus importers: ``prepare(src, out, **options) -> {name: manifest path}`` per corpus.

``IMPORTERS`` maps the corpus names of ``harmonifuse prepare CORPUS SRC OUT`` to those functions.
Each importer reads its corpus's own layout, measures durations with ``soundfile.info``, and writes
JSONL manifests (see :mod:`harmonifuse.data.manifest`); options are keyword arguments documented
on each ``prepare``. ``"synthetic"`` (the offline demo corpus) and ``"real-speech"`` (human
speech from two Debian game packages, fetched at prepare time) take no source folder
(:data:`SOURCELESS`) and are registered lazily, so their dependencies load only when used.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from harmonifuse.data.importers import (
    amazon_queen,
    cremad,
    drascula,
    iemocap,
    kaldi,
    librispeech,
    pocketsphinx,
    ravdess,
)
from harmonifuse.data.importers._common import CorpusLayoutError
from harmonifuse.data.importers.kaldi import KaldiFormatError

__all__ = ["IMPORTERS", "SOURCELESS", "CorpusLayoutError", "KaldiFormatError", "get_importer"]

Importer = Callable[..., dict[str, Path]]


def _synthetic(out: Path, **options) -> dict[str, Path]:
    """``harmonifuse prepare synthetic OUT``: the built-in corpus has no source folder."""
    return importlib.import_module("harmonifuse.data.synthetic").prepare(out, **options)


def _real_speech(out: Path, **options) -> dict[str, Path]:
    """``harmonifuse prepare real-speech OUT``: fetches its own sources (Debian packages)."""
    return importlib.import_module("harmonifuse.data.importers.real_speech").prepare(out, **options)


IMPORTERS: dict[str, Importer] = {
    "librispeech": librispeech.prepare,
    "iemocap": iemocap.prepare,
    "cremad": cremad.prepare,
    "ravdess": ravdess.prepare,
    "kaldi": kaldi.prepare,
    "pocketsphinx": pocketsphinx.prepare,
    "amazon-queen": amazon_queen.prepare,
    "drascula": drascula.prepare,
}
IMPORTERS["synthetic"] = _synthetic
IMPORTERS["real-speech"] = _real_speech
SOURCELESS = ("synthetic", "real-speech")  # `harmonifuse prepare CORPUS OUT`: no source folder


def get_importer(corpus: str) -> Importer:
    """The ``prepare`` function for ``corpus``, or a ValueError listing the known corpora."""
    try:
        return IMPORTERS[corpus]
    except KeyError:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(sorted(IMPORTERS))}") from None
