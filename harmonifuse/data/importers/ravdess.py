"""RAVDESS (audio-only speech) -> an SER manifest.

Layout: ``SRC/Actor_XX/MM-VV-EE-II-SS-RR-AA.wav`` (e.g. ``Actor_12/03-01-05-01-01-01-12.wav``):
modality (03 = audio-only), vocal channel (01 speech, 02 song), emotion, intensity, statement,
repetition, actor. Emotion codes: 01 neutral, 02 calm, 03 happy, 04 sad, 05 angry, 06 fearful,
07 disgust, 08 surprised. By default only the 4-class subset (neutral, happy, sad, angry) is
kept; ``merge_calm=True`` relabels calm as neutral; ``all_emotions=True`` keeps every emotion
(named ``calm``, ``fear``, ``disgust``, ``surprise`` as in the other importers). Song files are
left out unless ``include_song=True``.

Statements are "Kids are talking by the door" (01) and "Dogs are sitting by the door" (02);
``with_text=True`` adds them as ``text`` (off by default: two sentences are no ASR data).

Writes ``ravdess.jsonl``.
"""
from __future__ import annotations

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
from harmonifuse.tasks import EMOTION_LABELS

CORPUS = "ravdess"
EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry",
            "06": "fear", "07": "disgust", "08": "surprise"}
STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
_SPEECH, _SONG = "01", "02"

_EXPECTED = ("Actor_XX/MM-VV-EE-II-SS-RR-AA.wav files such as Actor_12/03-01-05-01-01-01-12.wav "
             "(the audio-only release, e.g. Audio_Speech_Actors_01-24)")
_NAME = re.compile(r"^(?P<modality>\d{2})-(?P<channel>\d{2})-(?P<emotion>\d{2})-(?P<intensity>\d{2})-"
                   r"(?P<statement>\d{2})-(?P<repetition>\d{2})-(?P<actor>\d{2})$")


def prepare(src: Path, out: Path, *, all_emotions: bool = False, merge_calm: bool = False,
            include_song: bool = False, with_text: bool = False, on_bad_audio: BadAudio = "skip",
            progress_bar: bool = True) -> dict[str, Path]:
    """Write ``OUT/ravdess.jsonl``; returns ``{"all": manifest}``."""
    src = require_dir("RAVDESS", src, _EXPECTED)
    files = sorted(src.glob("Actor_*/*.wav"))
    parsed = [(path, _NAME.match(path.stem)) for path in files]
    if not any(match for _, match in parsed):
        raise CorpusLayoutError("RAVDESS", src, _EXPECTED)
    names = dict(EMOTIONS, **({"02": "neutral"} if merge_calm else {}))
    keep = set(names.values()) if all_emotions else set(EMOTION_LABELS)
    channels = {_SPEECH, _SONG} if include_song else {_SPEECH}

    collector = UtteranceCollector(on_bad_audio)
    for path, match in progress(parsed, "ravdess", enabled=progress_bar):
        if match is None or match["emotion"] not in names:
            collector.skip(path, "file name is not MM-VV-EE-II-SS-RR-AA.wav with emotion 01..08")
            continue
        emotion = names[match["emotion"]]
        if emotion not in keep or match["channel"] not in channels:
            continue
        collector.add(path, id=path.stem, corpus=CORPUS, speaker=f"Actor_{match['actor']}",
                      emotion=emotion, text=STATEMENTS.get(match["statement"]) if with_text else None)
    collector.report("ravdess")
    return {"all": write(out, "ravdess.jsonl", collector.utterances, CORPUS)}
