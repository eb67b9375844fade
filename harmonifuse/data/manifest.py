"""One JSONL manifest schema for every corpus, and its validator.

Each line is one utterance::

    {"id": "84-121123-0000", "audio": "audio/84-121123-0000.flac", "duration": 3.2,
     "corpus": "librispeech", "speaker": "84", "session": "121123", "text": "GO DO YOU HEAR"}

Required: ``id`` (str, unique in the file), ``audio`` (path, relative paths are relative to the
manifest's folder), ``duration`` (seconds, a finite number > 0), ``corpus`` (str), ``speaker``
(str). Optional: ``session`` (str). Labels, at least one: ``text`` (ASR transcript) and/or
``emotion`` (SER label). A missing label may be omitted or null. Other keys are ignored.

:func:`read_manifest` checks *every* line and reports all problems at once, each as
``<file>:<line>: field '<field>': <problem>; <what to do>``, so a broken manifest is fixed in one
pass rather than one error per run.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmonifuse.atomic import atomic_write_text
from harmonifuse.tasks import get_task

__all__ = [
    "Utterance",
    "ManifestIssue",
    "ManifestError",
    "read_manifest",
    "write_manifest",
]


_REQUIRED_STR = ("id", "audio", "corpus", "speaker")
_OPTIONAL_STR = ("session", "text", "emotion")
_FIELD_ORDER = ("id", "audio", "duration", "corpus", "speaker", "session", "text", "emotion")
# At most this many problems are spelled out in the exception message (all are in `.issues`).
_MAX_LISTED = 50


@dataclass(frozen=True)
class Utterance:
    """One manifest line. ``audio`` is an absolute path; ``duration`` is in seconds."""

    id: str
    audio: str
    duration: float
    corpus: str
    speaker: str
    text: str | None = None
    emotion: str | None = None
    session: str | None = None

    def has_task(self, task: str) -> bool:
        """Whether this utterance carries the label ``task`` ("asr" or "ser") trains on."""
        return getattr(self, get_task(task).label_field) is not None


@dataclass(frozen=True)
class ManifestIssue:
    """One problem: where (file, 1-based line, field or None) and what to do."""

    file: str
    line: int | None
    field: str | None
    problem: str
    fix: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.problem}; {self.fix}"


class ManifestError(ValueError):
    """A manifest with one or more problems; ``issues`` lists every one of them."""

    def __init__(self, issues: Sequence[ManifestIssue]) -> None:
        self.issues = list(issues)
        lines = [str(issue) for issue in self.issues[:_MAX_LISTED]]
        if len(self.issues) > _MAX_LISTED:
            lines.append(f"... and {len(self.issues) - _MAX_LISTED} more problems")
        header = "" if len(self.issues) == 1 else f"{len(self.issues)} problems in manifest:\n"
        super().__init__(header + "\n".join(lines))


def read_manifest(
    path: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    check_audio: bool = True,
) -> list[Utterance]:
    """Read and validate a JSONL manifest.

    Args:
        path: the manifest file.
        labels: the allowed emotion labels (e.g. :data:`EMOTION_LABELS`); ``None`` accepts any.
        check_audio: also check that every audio file exists (a stat per line).

    Returns:
        The utterances in file order, ``audio`` resolved to absolute paths.

    Raises:
        ManifestError: listing every problem found (bad JSON, missing or mistyped field, missing
            audio, unknown emotion, duplicate id, bad duration, no label, empty manifest).
    """
    file = os.fspath(path)
    if not os.path.isfile(file):
        raise ManifestError([ManifestIssue(file, None, None, "manifest not found",
                                           "check the path, or write it with `harmonifuse prepare`")])
    base = Path(os.path.abspath(file)).parent
    allowed = None if labels is None else set(labels)
    issues: list[ManifestIssue] = []
    utterances: list[Utterance] = []
    first_line_of: dict[str, int] = {}
    with open(file, "rb") as handle:
        for number, raw_bytes in enumerate(handle, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as error:
                issues.append(ManifestIssue(file, number, None, f"not UTF-8 text (byte {error.start})",
                                            "write the manifest as UTF-8 JSON lines"))
                continue
            if not raw.strip():
                continue
            utterance = _parse_line(raw, file, number, base, allowed, check_audio, issues)
            if utterance is None:
                continue
            if utterance.id in first_line_of:
                issues.append(ManifestIssue(file, number, "id", f"duplicate id {utterance.id!r} "
                                            f"(first on line {first_line_of[utterance.id]})",
                                            "give every utterance a unique id"))
                continue
            first_line_of[utterance.id] = number
            utterances.append(utterance)
    if not utterances and not issues:
        issues.append(ManifestIssue(file, None, None, "manifest has no utterances",
                                    "re-run `harmonifuse prepare`, or point at a non-empty manifest"))
    if issues:
        raise ManifestError(issues)
    return utterances


def _parse_line(raw: str, file: str, number: int, base: Path, allowed: set[str] | None,
                check_audio: bool, issues: list[ManifestIssue]) -> Utterance | None:
    """Validate one line; append its problems to ``issues`` and return None if it has any."""
    found: list[ManifestIssue] = []

    def problem(field: str | None, message: str, fix: str) -> None:
        found.append(ManifestIssue(file, number, field, message, fix))

    try:
        record: Any = json.loads(raw)
    except json.JSONDecodeError as error:
        problem(None, f"not valid JSON ({error.msg} at column {error.colno})",
                "write one JSON object per line")
        issues.extend(found)
        return None
    if not isinstance(record, dict):
        problem(None, f"expected a JSON object, got {type(record).__name__}",
                "write one JSON object per line")
        issues.extend(found)
        return None

    for name in _REQUIRED_STR:
        value = record.get(name)
        if name not in record or value is None:
            problem(name, "missing", f"every line needs '{name}'")
        elif not isinstance(value, str) or not value.strip():
            problem(name, f"expected a non-empty string, got {value!r}", f"write '{name}' as a string")
    for name in _OPTIONAL_STR:
        value = record.get(name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            problem(name, f"expected a non-empty string or null, got {value!r}",
                    f"write '{name}' as a string, or omit it")

    duration = record.get("duration")
    if duration is None:
        problem("duration", "missing", "every line needs 'duration' in seconds")
    elif isinstance(duration, bool) or not isinstance(duration, (int, float)):
        problem("duration", f"expected a number of seconds, got {duration!r}", "write it as a number")
    elif not math.isfinite(duration) or duration <= 0:
        problem("duration", f"must be a finite number > 0, got {duration!r}",
                "re-measure the audio, or drop the line if the file is empty")

    if record.get("text") is None and record.get("emotion") is None:
        problem("text", "no label: neither 'text' nor 'emotion' is set",
                "add 'text' (for ASR) and/or 'emotion' (for SER), or drop the line")
    emotion = record.get("emotion")
    if allowed is not None and isinstance(emotion, str) and emotion not in allowed:
        problem("emotion", f"unknown label {emotion!r}",
                f"use one of {sorted(allowed)}, or map/drop it when preparing the corpus")

    audio = record.get("audio")
    if isinstance(audio, str) and audio.strip():
        resolved = Path(audio) if os.path.isabs(audio) else base / audio
        audio = os.path.normpath(resolved)
        if check_audio and not os.path.isfile(audio):
            problem("audio", f"file not found: {audio}",
                    "fix the path (relative paths are relative to the manifest's folder)")

    issues.extend(found)
    if found:
        return None
    return Utterance(id=record["id"], audio=audio, duration=float(duration),
                     corpus=record["corpus"], speaker=record["speaker"], text=record.get("text"),
                     emotion=record.get("emotion"), session=record.get("session"))


def write_manifest(
    path: str | os.PathLike,
    utterances: Iterable[Utterance],
    *,
    relative_to_manifest: bool = True,
) -> None:
    """Write ``utterances`` as JSONL, atomically (:func:`harmonifuse.atomic.atomic_write_text`).

    With ``relative_to_manifest``, audio paths *inside* the manifest's folder are written relative
    to it, so the folder can be moved as a whole; paths outside it stay absolute (a ``../..`` path
    would break as soon as the manifest moved without its audio).

    Raises:
        ManifestError: duplicate ids or an utterance without a label (nothing is written).
    """
    target = Path(os.path.abspath(path))
    folder = target.parent
    issues: list[ManifestIssue] = []
    seen: set[str] = set()
    lines: list[str] = []
    for utterance in utterances:
        if utterance.id in seen:
            issues.append(ManifestIssue(str(target), None, "id", f"duplicate id {utterance.id!r}",
                                        "give every utterance a unique id"))
        if utterance.text is None and utterance.emotion is None:
            issues.append(ManifestIssue(str(target), None, "text", f"utterance {utterance.id!r} "
                                        "has no label", "set 'text' and/or 'emotion'"))
        seen.add(utterance.id)
        record = {name: getattr(utterance, name) for name in _FIELD_ORDER}
        record["audio"] = _portable_path(utterance.audio, folder, relative_to_manifest)
        lines.append(json.dumps({k: v for k, v in record.items() if v is not None}, ensure_ascii=False))
    if issues:
        raise ManifestError(issues)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, "".join(line + "\n" for line in lines))


def _portable_path(audio: str, folder: Path, relative: bool) -> str:
    absolute = Path(os.path.abspath(audio))
    if relative and absolute.is_relative_to(folder):
        return absolute.relative_to(folder).as_posix()
    return str(absolute)
