"""pocketsphinx-testdata -> one ASR manifest of its ten transcribed real recordings.

Debian's ``pocketsphinx-testdata`` holds the only real transcribed English speech available
offline: five LibriVox sentences (``librivox/``, one reader of *Sense and Sensibility*) and five
spoken card names (``cards/``, a different speaker). Ten utterances are a smoke signal, not a
benchmark; they show whether a model trained on synthetic voices holds on real ones.

Layout::

    SRC/librivox/<id>.wav + SRC/librivox/transcription      lines "<s> TEXT </s> (<id>)"
    SRC/cards/<id>.wav    + SRC/cards/cards.transcription   the same format

Transcripts are normalised as the evaluation normalises (lower case, no punctuation) and are
already spelt out (no digits).
"""
from __future__ import annotations

import re
from pathlib import Path

from harmonifuse.data.importers._common import BadAudio, CorpusLayoutError, UtteranceCollector, require_dir, write
from harmonifuse.text import normalize_text

CORPUS = "pocketsphinx"
DEFAULT_SRC = Path("/usr/share/pocketsphinx/test/data")
MANIFEST = "pocketsphinx_real.jsonl"
PARTS = {"librivox": "transcription", "cards": "cards.transcription"}
_LINE = re.compile(r"^(?:<s>)?\s*(?P<text>.*?)\s*(?:</s>)?\s*\((?P<id>[^()]+)\)\s*$")
_EXPECTED = "librivox/transcription and cards/cards.transcription next to their .wav files " \
            f"(Debian's pocketsphinx-testdata installs them in {DEFAULT_SRC})"


def read_transcription(path: Path) -> dict[str, str]:
    """``"<s> text </s> (id)"`` lines -> {id: text}; a line in another format raises, naming its line."""
    texts = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        match = _LINE.match(line.strip())
        if not match or not match["text"]:
            raise ValueError(f"{path}:{number}: expected '<s> TEXT </s> (ID)', got {line.strip()!r}")
        texts[match["id"].strip()] = match["text"]
    return texts


def prepare(src: Path = DEFAULT_SRC, out: Path | None = None, *, on_bad_audio: BadAudio = "skip",
            progress_bar: bool = False) -> dict[str, Path]:
    """Write ``OUT/pocketsphinx_real.jsonl`` (10 utterances when the package is complete)."""
    src = require_dir("pocketsphinx-testdata", Path(src), _EXPECTED)
    if out is None:
        raise ValueError("pocketsphinx: give an output folder")
    collector = UtteranceCollector(on_bad_audio)
    found = False
    for part, transcription in PARTS.items():
        path = src / part / transcription
        if not path.is_file():
            continue
        found = True
        for utt_id, text in sorted(read_transcription(path).items()):
            collector.add(src / part / f"{utt_id}.wav", id=f"{part}-{utt_id}", corpus=CORPUS,
                          speaker=part, text=normalize_text(text))
    if not found:
        raise CorpusLayoutError("pocketsphinx-testdata", src, _EXPECTED)
    collector.report(CORPUS)
    return {"real": write(Path(out), MANIFEST, collector.utterances, CORPUS)}
