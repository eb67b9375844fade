"""LibriSpeech -> ASR manifests.

Layout (one split)::

    SRC/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   lines "<utt-id> TRANSCRIPT"
    SRC/<speaker>/<chapter>/<utt-id>.flac

SRC may be one split (``LibriSpeech/dev-clean``), giving ``librispeech_dev-clean.jsonl``, or the
``LibriSpeech`` folder holding several splits, giving one manifest per split. Transcripts are kept
as distributed (upper case, no punctuation); text normalisation belongs to evaluation.
The chapter is recorded as the ``session``.
"""
from __future__ import annotations

from pathlib import Path

from harmonifuse.data.importers._common import (
    BadAudio,
    CorpusLayoutError,
    UtteranceCollector,
    progress,
    require_dir,
    write,
)

CORPUS = "librispeech"
_EXPECTED = ("<speaker>/<chapter>/<speaker>-<chapter>.trans.txt files next to .flac audio, "
             "in SRC (one split, e.g. LibriSpeech/dev-clean) or in SRC/<split>/ (the LibriSpeech folder)")


def prepare(src: Path, out: Path, *, on_bad_audio: BadAudio = "skip",
            progress_bar: bool = True) -> dict[str, Path]:
    """Write ``OUT/librispeech_<split>.jsonl`` per split found; returns ``{split: manifest}``."""
    src = require_dir("LibriSpeech", src, _EXPECTED)
    splits = _find_splits(src)
    if not splits:
        raise CorpusLayoutError("LibriSpeech", src, _EXPECTED)
    return {name: _prepare_split(name, transcripts, out, on_bad_audio, progress_bar)
            for name, transcripts in splits.items()}


def _find_splits(src: Path) -> dict[str, list[Path]]:
    """``{split name: its transcript files}``: SRC itself if it is a split, else its subfolders."""
    own = sorted(src.glob("*/*/*.trans.txt"))
    if own:
        return {src.name: own}
    nested = sorted(src.glob("*/*/*/*.trans.txt"))
    splits: dict[str, list[Path]] = {}
    for transcript in nested:
        splits.setdefault(transcript.parents[2].name, []).append(transcript)
    return splits


def _prepare_split(name: str, transcripts: list[Path], out: Path, on_bad_audio: BadAudio,
                   progress_bar: bool) -> Path:
    collector = UtteranceCollector(on_bad_audio)
    for transcript in progress(transcripts, f"librispeech {name}", enabled=progress_bar):
        chapter_dir = transcript.parent
        speaker, chapter = chapter_dir.parent.name, chapter_dir.name
        for line in transcript.read_text(encoding="utf-8").splitlines():
            utt_id, _, text = line.strip().partition(" ")
            if not utt_id:
                continue
            if not text.strip():
                collector.skip(f"{transcript}: {utt_id}", "empty transcript")
                continue
            collector.add(chapter_dir / f"{utt_id}.flac", id=utt_id, corpus=CORPUS,
                          speaker=speaker, session=chapter, text=text.strip())
    collector.report(f"librispeech {name}")
    return write(out, f"librispeech_{name}.jsonl", collector.utterances, CORPUS)
