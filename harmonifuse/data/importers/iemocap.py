"""IEMOCAP -> SER manifests with five leave-one-session-out folds.

Layout::

    SRC/Session{1..5}/dialog/EmoEvaluation/<dialog>.txt
        "[6.2901 - 8.2357]\\tSes01F_impro01_F000\\tneu\\t[2.5000, 2.5000, 2.5000]"
    SRC/Session{1..5}/dialog/transcriptions/<dialog>.txt      (optional)
        "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me."
    SRC/Session{1..5}/sentences/wav/<dialog>/<utterance>.wav

SRC is ``IEMOCAP_full_release`` or a folder holding it. Labels follow the standard 4-class setup:
neu/hap/sad/ang, with exc (excited) merged into happy (5,531 utterances on the full release);
every other category (frustrated, surprised, fear, disgust, other, xxx = no agreement) is dropped.
The speaker is session plus the talking actor's gender (``Ses01_F``); the utterance id's last
part (``F000``) names who talks, not the dialog prefix (``Ses01F`` = who wore the markers).

Writes ``iemocap_all.jsonl`` and, for every session k present, ``iemocap_fold{k}_test.jsonl``
(Session k) and ``iemocap_fold{k}_train.jsonl`` (every other session). Transcripts, when present,
go into ``text`` as distributed (including markers such as ``[LAUGHTER]``).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from harmonifuse.data.importers._common import (
    BadAudio,
    CorpusLayoutError,
    UtteranceCollector,
    progress,
    require_dir,
    write,
)
from harmonifuse.data.manifest import Utterance

CORPUS = "iemocap"
SESSIONS = (1, 2, 3, 4, 5)
# The standard 4-class mapping; "exc" is merged into happy only with merge_excited.
LABELS_4 = {"neu": "neutral", "hap": "happy", "sad": "sad", "ang": "angry"}

_EXPECTED = ("Session1..Session5/dialog/EmoEvaluation/*.txt label files and "
             "SessionN/sentences/wav/<dialog>/<utterance>.wav audio, in SRC or SRC/IEMOCAP_full_release")
_EVAL_LINE = re.compile(r"^\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\t(?P<utt>\S+)\t(?P<label>\w+)\t")
_TRANSCRIPT_LINE = re.compile(r"^(?P<utt>Ses\S+)\s+\[[^\]]*\]:\s*(?P<text>.*)$")

log = logging.getLogger(__name__)


def prepare(src: Path, out: Path, *, merge_excited: bool = True, with_text: bool = True,
            on_bad_audio: BadAudio = "skip", progress_bar: bool = True) -> dict[str, Path]:
    """Write the IEMOCAP manifests; returns ``{"all": ..., "fold1_train": ..., "fold1_test": ...}``."""
    root = _find_root(require_dir("IEMOCAP", src, _EXPECTED))
    sessions = {k: root / f"Session{k}" for k in SESSIONS
                if (root / f"Session{k}" / "dialog" / "EmoEvaluation").is_dir()}
    if not sessions:
        raise CorpusLayoutError("IEMOCAP", root, _EXPECTED)
    if len(sessions) < len(SESSIONS):
        log.warning("IEMOCAP: only sessions %s found under %s; folds are written for those only",
                    sorted(sessions), root)
    mapping = dict(LABELS_4, **({"exc": "happy"} if merge_excited else {}))

    collector = UtteranceCollector(on_bad_audio)
    by_session: dict[int, list[Utterance]] = {}
    for number, session_dir in sessions.items():
        start = len(collector.utterances)
        _read_session(number, session_dir, mapping, with_text, collector, progress_bar)
        by_session[number] = collector.utterances[start:]
    collector.report("iemocap")

    manifests = {"all": write(out, "iemocap_all.jsonl", collector.utterances, CORPUS)}
    if len(by_session) < 2:  # a fold needs a session to train on besides the test one
        log.warning("IEMOCAP: fewer than two sessions, no leave-one-session-out folds written")
        return manifests
    for k, test in by_session.items():
        train = [u for other, utts in by_session.items() if other != k for u in utts]
        manifests[f"fold{k}_train"] = write(out, f"iemocap_fold{k}_train.jsonl", train, CORPUS)
        manifests[f"fold{k}_test"] = write(out, f"iemocap_fold{k}_test.jsonl", test, CORPUS)
    return manifests


def _find_root(src: Path) -> Path:
    nested = src / "IEMOCAP_full_release"
    return nested if nested.is_dir() and not (src / "Session1").is_dir() else src


def _read_session(number: int, session_dir: Path, mapping: dict[str, str], with_text: bool,
                  collector: UtteranceCollector, progress_bar: bool) -> None:
    label_files = sorted((session_dir / "dialog" / "EmoEvaluation").glob("*.txt"))
    for label_file in progress(label_files, f"iemocap Session{number}", enabled=progress_bar):
        dialog = label_file.stem
        texts = _read_transcripts(session_dir / "dialog" / "transcriptions" / label_file.name) \
            if with_text else {}
        for line in label_file.read_text(encoding="utf-8", errors="replace").splitlines():
            match = _EVAL_LINE.match(line)
            if match is None or match["label"] not in mapping:
                continue  # annotator detail lines, or a category outside the label set
            utt = match["utt"]
            collector.add(session_dir / "sentences" / "wav" / dialog / f"{utt}.wav",
                          id=utt, corpus=CORPUS, speaker=f"Ses{number:02d}_{utt.rsplit('_', 1)[-1][0]}",
                          session=f"Session{number}", emotion=mapping[match["label"]],
                          text=texts.get(utt))


def _read_transcripts(path: Path) -> dict[str, str]:
    """``{utterance id: transcript}`` from one transcription file ({} when it is absent)."""
    if not path.is_file():
        return {}
    texts = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _TRANSCRIPT_LINE.match(line.strip())
        if match and match["text"].strip():
            texts[match["utt"]] = match["text"].strip()
    return texts
