"""Drascula: The Vampire Strikes Back (Debian ``drascula``, English speech) -> ASR manifest.

Real human speech with its text: the dialogue of a 1996 adventure game, freeware since 2008
(redistributable, not for sale; see the package's copyright file). Narrowband: 8-bit PCM at
11,025 Hz. About 740 voiced lines (47 minutes) by eleven characters.

**Audio** ``en/<PREFIX><N>.ALS``: raw unsigned 8-bit mono PCM at 11,025 Hz. The first 32 and
the last 32 bytes are not sound (the game skips them); silence longer than 0.2 s at either end
(``3.ALS`` has seconds of it) is trimmed here. Written as 16-bit FLAC at the native rate.

**Text** ``en/drascula.dat`` (ScummVM's data file, version 6), all numbers big-endian: "DRASCULA",
a version byte, 13 tables of fixed-size records (each a u16 count, then the records: the game's
character map, positions, room updates, talk sequences, ...), a u16 language count (6), then 15
text arrays. Each array is a u16 string count and per language (English first) a u16 byte
length and a block: 2 bytes of padding, then per string a u16 (the distance from this string to
the next, 2 + text + NUL + padding to a multiple of 4) and the NUL-terminated text (CP437).

**Pairing**: the file-name prefix names the character and the text array, the number is the
index in it: ``N`` John Hacker (the hero; ``text``), ``D`` Count Drascula (``textd``; but D56-67
are the hero and D68-78 the blind man, in the blind man's scene, and D82 the bartender), ``I``
Igor, ``B`` the drunk, ``BJ`` B.J., ``E`` Desiderio, ``L`` the werewolf, ``P`` the pianist, ``T``
the bartender, ``VB`` Von Braun. ``S`` and ``F`` files are sound effects; files whose entry is
empty (B61, B62, D79-81) have no text; both are skipped and counted, as are lines of laughter
or hesitation alone (:func:`harmonifuse.data.importers.amazon_queen.non_speech`).

**Noisy pairs.** The subtitles are not always what is said (the voice actors improvised, cut or
reworded lines). Each pair gets ``agreement``: the CER of Whisper tiny.en's own greedy decoding
(30 s window, as ``scripts/whisper_reference.py`` runs it) against the subtitle after
normalisation (saved as it goes in ``OUT/drascula.agreement.jsonl``, so a stopped run resumes),
and ``noisy``: true when ``agreement > max_cer`` (default 0.5) or the text's length is
implausible for the audio (outside 2-30 characters per second). ``OUT/drascula.jsonl`` keeps
every pair; ``OUT/drascula_clean.jsonl`` drops the noisy ones. Whisper's opinion decides only
which *training* pairs are kept (this corpus never enters dev or test), so the filter does not
bias a benchmark toward Whisper. Without Whisper (``agreement=None``) only the length check marks
pairs. Agreement values of an earlier run are reused for unchanged pairs.
"""
from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from harmonifuse.atomic import atomic_write, atomic_write_text
from harmonifuse.data.importers._common import CorpusLayoutError, progress
from harmonifuse.data.importers.amazon_queen import non_speech, normalise, write_jsonl

log = logging.getLogger("harmonifuse.data.importers")

CORPUS = "drascula"
RATE = 11_025
MANIFEST = "drascula.jsonl"
CLEAN_MANIFEST = "drascula_clean.jsonl"
STATS = "drascula.stats.json"
AGREEMENT_CACHE = "drascula.agreement.jsonl"  # appended while Whisper runs: a killed run resumes
AGREEMENT_CHUNK = 32
PACKAGE_DATA = "usr/share/scummvm/drascula"
TEXT_FILE = "drascula.dat"
DAT_VERSION = 6
DATA_ALIGNMENT = 4
SKIP_BYTES = 32           # at each end of an .ALS file
KEEP_SILENCE = 0.2        # seconds of silence kept at each end
SILENCE_LEVEL = 3         # 8-bit steps from 128 below which a sample counts as silence
MAX_CER = 0.5
CHARS_PER_SECOND = (2.0, 30.0)
# Fixed-size tables before the texts: (name, bytes per record).
TABLES = (("character map", 4), ("item locations", 4), ("x_pol/y_pol", 4), ("verb bar", 2),
          ("menu positions", 4), ("frames", 2), ("candles", 4), ("pianist frames", 2), ("drunk frames", 2),
          ("room pre-updates", 20), ("room updates", 20), ("room actions", 10), ("talk sequences", 8))
ARRAYS = ("text", "textd", "textb", "textbj", "texte", "texti", "textl", "textp", "textt", "textvb",
          "textsys", "texthis", "textverbs", "textmisc", "textd1")
# File-name prefix -> (text array, speaker).
PREFIXES = {
    "": ("text", "john-hacker"), "D": ("textd", "count-drascula"), "I": ("texti", "igor"),
    "B": ("textb", "drunk"), "BJ": ("textbj", "bj"), "E": ("texte", "desiderio"), "L": ("textl", "werewolf"),
    "P": ("textp", "pianist"), "T": ("textt", "bartender"), "VB": ("textvb", "von-braun"),
}
SOUND_EFFECTS = ("S", "F")
_NAME = re.compile(r"(?P<prefix>[A-Z]*)(?P<index>\d+)\.ALS", re.IGNORECASE)
_EXPECTED = (f"en/*.ALS next to en/{TEXT_FILE} (the English Drascula with ScummVM's data file), in SRC, "
             f"SRC/en or SRC/{PACKAGE_DATA} (the unpacked Debian package)")


class DatFormatError(ValueError):
    """``drascula.dat`` is damaged or of another version; the message says what was expected."""


def speaker_of(prefix: str, index: int) -> str:
    """Speaker id of ``<prefix><index>.ALS`` (the Drascula array also holds other characters' lines)."""
    prefix = prefix.upper()
    if prefix == "D":
        if 56 <= index <= 67:
            return "drascula-john-hacker"
        if 68 <= index <= 78:
            return "drascula-blind-man"
        if index == 82:
            return "drascula-bartender"
    return "drascula-" + PREFIXES[prefix][1]


def read_texts(path: str | os.PathLike) -> dict[str, list[list[str]]]:
    """``{array name: [strings of language 0 (English), of language 1, ...]}`` from ``drascula.dat``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatFormatError(f"{path}: cannot read ({error.strerror or error})") from error
    fix = "re-download the drascula package (`harmonifuse prepare real-speech` verifies it)"
    if data[:8] != b"DRASCULA":
        raise DatFormatError(f"{path}: not ScummVM's drascula.dat (no 'DRASCULA' header); {fix}")
    if len(data) < 9 or data[8] != DAT_VERSION:
        raise DatFormatError(f"{path}: version {data[8] if len(data) > 8 else '?'}, expected {DAT_VERSION}; use "
                             "the one in Debian's drascula 1.0+ds4-2")
    offset = 9

    def u16(what: str) -> int:
        nonlocal offset
        if offset + 2 > len(data):
            raise DatFormatError(f"{path}: ends inside {what} (byte {offset} of {len(data)}): truncated; {fix}")
        (value,) = struct.unpack(">H", data[offset:offset + 2])
        offset += 2
        return value

    for name, size in TABLES:
        count = u16(name)
        offset += count * size
    languages = u16("the language count")
    arrays: dict[str, list[list[str]]] = {}
    for name in ARRAYS:
        count = u16(f"array {name}")
        arrays[name] = []
        for language in range(languages):
            length = u16(f"array {name}")
            block = data[offset:offset + length]
            if len(block) < length:
                raise DatFormatError(f"{path}: array {name} runs past the end: truncated; {fix}")
            offset += length
            strings, start = [], DATA_ALIGNMENT
            for _ in range(count):
                if start > len(block):
                    raise DatFormatError(f"{path}: array {name} (language {language}) is inconsistent; {fix}")
                strings.append(block[start:].split(b"\0", 1)[0].decode("cp437"))
                (step,) = struct.unpack(">H", block[start - 2:start])
                start += step
            arrays[name].append(strings)
    if offset != len(data):
        raise DatFormatError(f"{path}: {len(data) - offset} bytes left after the 15 text arrays; {fix}")
    return arrays


def read_als(path: str | os.PathLike) -> np.ndarray:
    """The samples of an ``.ALS`` file as float32 in [-1, 1), without its 32-byte ends and with
    leading and trailing silence cut to :data:`KEEP_SILENCE` seconds (empty if all silent)."""
    raw = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)[SKIP_BYTES:-SKIP_BYTES]
    centred = raw.astype(np.int16) - 128
    loud = np.flatnonzero(np.abs(centred) >= SILENCE_LEVEL)
    if loud.size == 0:
        return np.zeros(0, dtype=np.float32)
    keep = round(KEEP_SILENCE * RATE)
    start, end = max(0, loud[0] - keep), min(len(centred), loud[-1] + 1 + keep)
    return (centred[start:end] / 128.0).astype(np.float32)


@dataclass(frozen=True)
class Pair:
    stem: str        # "VB12"
    source: Path
    speaker: str
    raw_text: str
    text: str


def find_folder(src: Path) -> Path:
    src = Path(os.path.abspath(src))
    for candidate in (src, src / "en", src / PACKAGE_DATA / "en"):
        if (candidate / TEXT_FILE).is_file() and any(candidate.glob("*.[Aa][Ll][Ss]")):
            return candidate
    raise CorpusLayoutError("Drascula", src, _EXPECTED,
                            "Fetch it with `harmonifuse prepare real-speech OUT`, or `apt-get download "
                            "drascula && dpkg-deb -x drascula_*.deb DIR`")


def pair_files(folder: Path, texts: dict[str, list[list[str]]], stats: Counter) -> list[Pair]:
    """Every ``.ALS`` file with an English text, in name order; the others are counted in ``stats``."""
    pairs = []
    for path in sorted(folder.iterdir()):
        match = _NAME.fullmatch(path.name)
        if not match:
            continue
        prefix, index = match["prefix"].upper(), int(match["index"])
        if prefix in SOUND_EFFECTS:
            stats["sound effect (S, F)"] += 1
            continue
        if prefix not in PREFIXES:
            stats["unknown prefix"] += 1
            continue
        english = texts[PREFIXES[prefix][0]][0]
        raw = english[index].strip() if index < len(english) else ""
        if not raw:
            stats["no text"] += 1
            continue
        text = normalise(raw)
        if not text:
            stats["text empty after normalisation"] += 1
            continue
        if non_speech(raw):
            stats["laughter or hesitation only"] += 1
            continue
        pairs.append(Pair(f"{prefix}{index}", path, speaker_of(prefix, index), raw, text))
    return pairs


Agreement = Callable[[Sequence[Path], Sequence[str]], list[tuple[str, float]]]


def whisper_agreement(paths: Sequence[Path], references: Sequence[str], *, batch_size: int = 8,
                      progress_bar: bool = True, whisper=None) -> list[tuple[str, float]]:
    """``[(Whisper tiny.en's transcript, its CER against the reference)]`` per clip: greedy decoding
    in Whisper's 30 s window (:class:`harmonifuse.evaluation.whisper_reference.WhisperReference`,
    loaded here unless ``whisper`` is one), both sides normalised; an empty transcript scores 1."""
    import jiwer

    from harmonifuse.audio import load_audio
    from harmonifuse.text import normalize_text

    if whisper is None:
        from harmonifuse.evaluation.whisper_reference import WhisperReference

        whisper = WhisperReference()
    results: list[tuple[str, float]] = []
    starts = range(0, len(paths), batch_size)
    for start in progress(starts, f"whisper agreement (batches of {batch_size})", total=len(starts),
                          enabled=progress_bar):
        waves = [load_audio(str(path)) for path in paths[start:start + batch_size]]
        for hypothesis, reference in zip(whisper.transcribe(waves, batch_size=batch_size),
                                         references[start:start + batch_size]):
            hyp = normalize_text(hypothesis)
            results.append((hypothesis, round(float(jiwer.cer(normalize_text(reference), hyp)) if hyp else 1.0, 4)))
    return results


def _previous(*paths: Path) -> dict[str, dict]:
    """Records with an agreement from an earlier run (its manifest, and the cache it appends to
    while Whisper runs), by id; unreadable files and lines (a run killed mid-write) are ignored."""
    found: dict[str, dict] = {}
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("agreement"), (int, float)) and "id" in record:
                found[record["id"]] = record
    return found


def prepare(src: Path, out: Path, *, agreement: str | Agreement | None = "whisper", max_cer: float = MAX_CER,
            progress_bar: bool = True) -> dict[str, Path]:
    """Write the clips as ``OUT/audio/<stem>.flac`` (16-bit, 11,025 Hz), ``OUT/drascula.jsonl`` (every
    pair: ``id audio duration corpus speaker text`` plus ``raw_text``, ``agreement``, ``whisper_text``,
    ``noisy``), ``OUT/drascula_clean.jsonl`` (the pairs not marked noisy) and the counts in
    ``OUT/drascula.stats.json``.

    ``agreement``: ``"whisper"`` (Whisper tiny.en, see the module doc), a function
    ``(paths, texts) -> [(transcript, CER)]``, or None (only the length check marks noisy pairs).
    """
    import soundfile as sf

    folder = find_folder(Path(src))
    texts = read_texts(folder / TEXT_FILE)
    out = Path(os.path.abspath(out))
    stats: Counter = Counter()
    pairs = pair_files(folder, texts, stats)
    records = []
    for pair in progress(pairs, "drascula clips", enabled=progress_bar):
        target = out / "audio" / f"{pair.stem}.flac"
        samples = read_als(pair.source)
        if samples.size < 0.3 * RATE:
            stats["silent or under 0.3 s"] += 1
            continue
        if not (target.is_file() and sf.info(str(target)).frames == samples.size):
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda tmp, x=samples: sf.write(str(tmp), x, RATE, format="FLAC", subtype="PCM_16"))
        duration = samples.size / RATE
        records.append({"id": f"drascula-{pair.stem}", "audio": target.relative_to(out).as_posix(),
                        "duration": round(duration, 3), "corpus": CORPUS, "speaker": pair.speaker,
                        "text": pair.text, "raw_text": pair.raw_text})
    if not records:
        raise ValueError(f"drascula: no usable clips in {folder}")
    _mark_noisy(records, out, agreement, max_cer, progress_bar, stats)
    stats["kept"] = len(records)
    stats["noisy"] = sum(r["noisy"] for r in records)
    manifest = write_jsonl(out / MANIFEST, records)
    clean = write_jsonl(out / CLEAN_MANIFEST, [r for r in records if not r["noisy"]])
    atomic_write_text(out / STATS, json.dumps(dict(sorted(stats.items())), indent=2) + "\n")
    log.info("drascula: %d pairs (%.1f min), %d marked noisy; skipped: %s", len(records),
             sum(r["duration"] for r in records) / 60, stats["noisy"],
             {k: v for k, v in stats.items() if k not in ("kept", "noisy")})
    return {"all": manifest, "clean": clean}


def _mark_noisy(records: list[dict], out: Path, agreement: str | Agreement | None, max_cer: float,
                progress_bar: bool, stats: Counter) -> None:
    """Set ``agreement``/``whisper_text`` (when an agreement function is given) and ``noisy``."""
    if agreement == "whisper":
        loaded = []

        def agreement(paths, references):
            if not loaded:
                from harmonifuse.evaluation.whisper_reference import WhisperReference

                loaded.append(WhisperReference())
            return whisper_agreement(paths, references, progress_bar=False, whisper=loaded[0])
    if agreement is not None:
        cache = out / AGREEMENT_CACHE
        previous = _previous(out / MANIFEST, cache)
        todo = []
        for record in records:
            old = previous.get(record["id"], {})
            if old.get("text") == record["text"] and old.get("duration") == record["duration"]:
                record["agreement"], record["whisper_text"] = old["agreement"], old.get("whisper_text", "")
            else:
                todo.append(record)
        if todo:
            log.info("drascula: agreement of %d pairs (%d reused)", len(todo), len(records) - len(todo))
            with tqdm(total=len(todo), desc="drascula agreement", unit="clip", disable=not progress_bar,
                      leave=False) as bar, open(cache, "a", encoding="utf-8") as saved:
                for start in range(0, len(todo), AGREEMENT_CHUNK):
                    part = todo[start:start + AGREEMENT_CHUNK]
                    found = agreement([out / r["audio"] for r in part], [r["text"] for r in part])
                    for record, (hypothesis, cer) in zip(part, found):
                        record["agreement"], record["whisper_text"] = cer, hypothesis
                        saved.write(json.dumps({k: record[k] for k in ("id", "text", "duration", "agreement",
                                                                          "whisper_text")}) + "\n")
                    saved.flush()
                    os.fsync(saved.fileno())  # a killed run resumes from here
                    bar.update(len(part))
    for record in records:
        rate = len(record["text"]) / record["duration"]
        implausible = not CHARS_PER_SECOND[0] <= rate <= CHARS_PER_SECOND[1]
        disagrees = record.get("agreement", 0.0) > max_cer
        stats["noisy: length implausible for the audio"] += implausible
        stats[f"noisy: Whisper CER > {max_cer}"] += disagrees
        record["noisy"] = bool(implausible or disagrees)
