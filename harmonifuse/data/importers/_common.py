"""Helpers shared by the corpus importers: layout errors, durations, progress, bad files.

Every importer has the same shape: find the corpus's files (or raise :class:`CorpusLayoutError`
saying what was expected), build :class:`~harmonifuse.data.manifest.Utterance` objects with
durations from ``soundfile.info`` under a progress bar, and write manifests with
:func:`~harmonifuse.data.manifest.write_manifest`. An unreadable or empty audio file is skipped
and reported (``on_bad_audio="skip"``, the default) or stops the import (``"fail"``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal, TypeVar

import soundfile as sf
from tqdm.auto import tqdm

from harmonifuse.audio import AudioError, BadSamplePolicy
from harmonifuse.data.manifest import Utterance, write_manifest

log = logging.getLogger("harmonifuse.data.importers")

T = TypeVar("T")
BadAudio = Literal["skip", "fail"]


class CorpusLayoutError(ValueError):
    """SRC is not laid out like the corpus the importer reads; the message says what was expected."""

    def __init__(self, corpus: str, src: Path, expected: str, hint: str = "") -> None:
        message = f"{src} does not look like {corpus}: expected {expected}"
        super().__init__(message + (f". {hint}" if hint else ""))


def require_dir(corpus: str, src: Path, expected: str) -> Path:
    """``src`` as an absolute path, or a layout error if it is not a directory."""
    src = Path(os.path.abspath(src))
    if not src.is_dir():
        raise CorpusLayoutError(corpus, src, expected, "The folder does not exist.")
    return src


def progress(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """A tqdm bar on stderr (hidden when ``enabled`` is False)."""
    return iter(tqdm(items, desc=desc, total=total, unit="file", disable=not enabled, leave=False))


def audio_info(path: Path):
    """``soundfile.info`` of a non-empty audio file, raising AudioError if it is unusable."""
    if not path.is_file():
        raise AudioError(path, "audio file not found", "re-extract the corpus, or remove the entry")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as error:
        raise AudioError(path, f"not a readable audio file ({error})",
                         "re-extract or re-download it") from error
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(path, "audio file contains no samples", "re-extract or re-download it")
    return info


def audio_duration(path: Path) -> float:
    """Seconds of audio from the header, raising AudioError if the file is unusable."""
    info = audio_info(path)
    return info.frames / info.samplerate


class UtteranceCollector:
    """Measures audio and collects utterances, skipping or failing on bad files per policy."""

    def __init__(self, on_bad_audio: BadAudio = "skip") -> None:
        self.policy = BadSamplePolicy(on_bad_audio)
        self.utterances: list[Utterance] = []

    def add(self, audio: Path, **fields) -> Utterance | None:
        """Append an utterance for ``audio`` (duration measured here); None if it was skipped."""
        try:
            duration = audio_duration(audio)
        except AudioError as error:
            self.policy.handle(audio, error)
            return None
        utterance = Utterance(audio=str(audio), duration=duration, **fields)
        self.utterances.append(utterance)
        return utterance

    def skip(self, source: str | Path, reason: str) -> None:
        """Record an entry left out for lack of a label (a data choice, so never fatal)."""
        self.policy.counter.record(str(source), f"{source}: {reason}")

    def report(self, corpus: str) -> None:
        if self.policy.counter.count:
            log.warning("%s: %s", corpus, self.policy.counter.summary())


def write(out: Path, name: str, utterances: list[Utterance], corpus: str) -> Path:
    """Write ``out/name`` (making ``out``) and return its path; refuses to write an empty manifest."""
    if not utterances:
        raise ValueError(f"{corpus}: no usable utterances for {name}; check the warnings above "
                         "(every file was skipped) and the corpus folder")
    path = Path(os.path.abspath(out)) / name
    write_manifest(path, utterances)
    log.info("%s: wrote %d utterances to %s", corpus, len(utterances), path)
    return path
