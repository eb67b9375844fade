"""CREMA-D -> an SER manifest.

Layout: ``SRC/AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav`` (e.g. ``1001_DFA_ANG_XX.wav``);
SRC may also be the ``AudioWAV`` folder itself. Emotion codes ANG DIS FEA HAP NEU SAD; by default
only the 4-class subset (angry, happy, neutral, sad) is kept, ``all_emotions=True`` keeps all six
(adding ``disgust`` and ``fear``). The speaker is the actor id.

Every clip speaks one of 12 fixed sentences; ``with_text=True`` adds it as ``text``. It is off by
default because 12 sentences make a useless (trivially memorised) ASR set that would otherwise
slip into ASR training through ``has_task("asr")``.

Writes ``cremad.jsonl``.
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

CORPUS = "cremad"
EMOTIONS = {"ANG": "angry", "HAP": "happy", "NEU": "neutral", "SAD": "sad",
            "DIS": "disgust", "FEA": "fear"}
EMOTIONS_4_CODES = ("ANG", "HAP", "NEU", "SAD")
# The sentence codes of the CREMA-D README.
SENTENCES = {
    "IEO": "It's eleven o'clock",
    "TIE": "That is exactly what happened",
    "IOM": "I'm on my way to the meeting",
    "IWW": "I wonder what this is about",
    "TAI": "The airplane is almost full",
    "MTI": "Maybe tomorrow it will be cold",
    "IWL": "I would like a new alarm clock",
    "ITH": "I think I have a doctor's appointment",
    "DFA": "Don't forget a jacket",
    "ITS": "I think I've seen this before",
    "TSI": "The surface is slick",
    "WSI": "We'll stop in a couple of minutes",
}

_EXPECTED = "AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav files such as AudioWAV/1001_DFA_ANG_XX.wav"
_NAME = re.compile(r"^(?P<actor>\d+)_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_(?P<level>[A-Z]{2})$")


def prepare(src: Path, out: Path, *, all_emotions: bool = False, with_text: bool = False,
            on_bad_audio: BadAudio = "skip", progress_bar: bool = True) -> dict[str, Path]:
    """Write ``OUT/cremad.jsonl``; returns ``{"all": manifest}``."""
    src = require_dir("CREMA-D", src, _EXPECTED)
    folder = src / "AudioWAV" if (src / "AudioWAV").is_dir() else src
    files = sorted(folder.glob("*.wav"))
    parsed = [(path, _NAME.match(path.stem)) for path in files]
    if not any(match for _, match in parsed):
        raise CorpusLayoutError("CREMA-D", src, _EXPECTED)
    keep = EMOTIONS if all_emotions else {code: EMOTIONS[code] for code in EMOTIONS_4_CODES}

    collector = UtteranceCollector(on_bad_audio)
    for path, match in progress(parsed, "cremad", enabled=progress_bar):
        if match is None or match["emotion"] not in EMOTIONS:
            collector.skip(path, "file name is not <actor>_<sentence>_<emotion>_<level>.wav "
                                 f"with an emotion in {sorted(EMOTIONS)}")
            continue
        if match["emotion"] not in keep:
            continue
        collector.add(path, id=path.stem, corpus=CORPUS, speaker=match["actor"],
                      emotion=keep[match["emotion"]],
                      text=SENTENCES.get(match["sentence"]) if with_text else None)
    collector.report("cremad")
    return {"all": write(out, "cremad.jsonl", collector.utterances, CORPUS)}
