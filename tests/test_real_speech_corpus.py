"""The real-speech corpus: FOTAQ's archive and dialogue files, Drascula's data file and audio, the
pinned Debian packages and the split, on tiny files built here (no network). Tests of the real
packages run only when an earlier `harmonifuse prepare real-speech` left them in the cache."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import struct
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from harmonifuse.data.importers import (
    IMPORTERS,
    CorpusLayoutError,
    amazon_queen,
    debian_packages,
    drascula,
)
from harmonifuse.data.importers.amazon_queen import (
    ArchiveError,
    QueenArchive,
    parse_dialogue,
    split_parts,
)
from harmonifuse.data.importers.debian_packages import DebianPackage, PackageError
from harmonifuse.data.importers.drascula import DatFormatError
from harmonifuse.data.importers.real_speech import split_fotaq
from harmonifuse.data.manifest import read_manifest

# ----------------------------------------------------------------------------- tiny FOTAQ files

def _pascal(body: bytearray, text: str, align: int) -> None:
    """Append a Pascal string and pad the *following* offset to ``align`` (relative to the body)."""
    body += bytes([len(text)]) + text.encode("latin-1")
    if text:
        while len(body) % align:
            body += b"\0"


def make_dog(talk_key: int, joe: list[tuple[int, str]], person: list[tuple[int, str]], again: tuple[str, str]) -> bytes:
    """A dialogue file laid out as the game's: 20-byte header, 32-byte head, a one-level tree."""
    level_max = 1
    body = bytearray(32 + 96 * level_max)
    for ident, text in joe:
        body += b"\0\0" + struct.pack(">h", ident)
        _pascal(body, text, 4)
    person_at = len(body)
    for ident, text in person:
        body += b"\0\0" + struct.pack(">h", ident)
        _pascal(body, text, 4)
    again_at = len(body)
    _pascal(body, again[0], 2)
    _pascal(body, again[1], 2)
    head = [-level_max, 1, talk_key, len(joe), len(person), 0, 0, 0, 0, 0, 0, person_at, 0, again_at, 0, 0]
    body[:32] = struct.pack(">16h", *head)
    return b"H" * 20 + bytes(body)


def mp3(seconds: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(int(seconds * 100)).uniform(-0.3, 0.3, round(seconds * 11_025))
    sf.write(buffer, noise.astype(np.float32), 11_025, format="MP3")
    return buffer.getvalue()


def make_archive(path: Path, files: dict[str, bytes], version: bytes = b"CEM10\0", compression: int = 1) -> Path:
    header = b"QTBL" + version + b"\0\0" + bytes([compression]) + struct.pack(">H", len(files))
    offset = len(header) + 21 * len(files)
    table, blobs = b"", b""
    for name, data in files.items():
        table += name.encode().ljust(12, b"\0") + b"\x01" + struct.pack(">II", offset + len(blobs), len(data))
        blobs += data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + table + blobs)
    return path


DOG = make_dog(2, joe=[(0, "Hello there.*02"), (6, "I need a plane.*FLNow!"), (8, "*GDTake it.*02")],
               person=[(6, "No planes today.*03Sorry."), (7, "*XY00(128,112)*FLGo away."), (9, "Too bad.")],
               again=("Hi again.", "0"))


@pytest.fixture(scope="module")
def clip_mp3() -> bytes:
    return mp3(1.0)


def test_dialogue_file_lines_and_clip_names():
    dialogue = parse_dialogue(DOG, "BOB2.DOG")
    assert dialogue.talk_key == 2 and dialogue.name == "BOB2"
    lines = {(line.role, line.line_id): (line.voice, line.text) for line in dialogue.lines}
    assert lines == {
        ("joe", "SSSS"): ("02SSSSJ", "Hello there.*02"),           # id 0: Joe's opening line
        ("joe", "0006"): ("020006J", "I need a plane.*FLNow!"),
        ("joe", "0008"): ("020008J", "*GDTake it.*02"),
        ("person", "0006"): ("020006P", "No planes today.*03Sorry."),
        ("person", "0007"): ("020007P", "*XY00(128,112)*FLGo away."),
        ("person", "0009"): ("020009P", "Too bad."),
        ("person", "XXXX"): ("02XXXXP", "Hi again."),                # "0" (Joe's greeting) means none
    }
    assert amazon_queen.voice_prefix(67, 0x3B9, "person") == "6703B9P"   # "%2d%4x", blanks as '0', upper case
    assert amazon_queen.voice_prefix(5, 0xABC, "joe") == "050ABCJ"
    assert amazon_queen.clip_name("020006P", 10) == "020006PA.SB"


def test_parts_are_cut_at_star_codes():
    assert split_parts("No planes today.*03Sorry.") == [(1, "No planes today."), (2, "Sorry.")]
    assert split_parts("A.*04*03") == [(1, "A."), (2, "")]
    assert split_parts("*XY00(128,112)*FLGo away.") == [(1, ""), (2, ""), (3, "Go away.")]  # XY: 11 more chars
    assert split_parts("*GDTake it.*02") == [(2, "Take it.")]  # GD ends an unvoiced part: a gap
    assert split_parts("Plain.") == [(1, "Plain.")]


def test_archive_clips_paired_with_their_text(tmp_path, clip_mp3):
    files = {"BOB2.DOG": DOG, "QUEEN.JAS": b"x" * 10}
    for name in ("02SSSSJ1", "020006J1", "020006J2", "020008J2", "020006P1", "020006P2", "020007P3", "02XXXXP1"):
        files[f"{name}.SB"] = clip_mp3
    files["020009P1.SB"] = mp3(0.1)  # too short to keep
    files["0200FFP1.SB"] = clip_mp3  # a clip no line names
    archive = QueenArchive(make_archive(tmp_path / "src" / "queen.1c", files))
    assert archive.version == "CEM10" and len(archive.entries) == len(files)
    assert archive.read("BOB2.DOG") == DOG
    clips = {clip.clip: clip for clip in amazon_queen.iter_clips(archive)}
    assert clips["020006P2.SB"].raw_text == "Sorry." and clips["020006P2.SB"].text == "sorry"
    assert clips["020006P2.SB"].speaker == "fotaq-trader-bob" and clips["020006J2.SB"].speaker == "fotaq-joe"
    assert clips["020008J2.SB"].part == 2 and clips["020007P3.SB"].raw_text == "Go away."
    assert "0200FFP1.SB" not in clips

    written = amazon_queen.prepare(tmp_path / "src", tmp_path / "out", vocabulary=None, progress_bar=False)
    utterances = {u.id: u for u in read_manifest(written["all"])}
    assert "fotaq-020009P1" not in utterances  # under 0.3 s
    hello = utterances["fotaq-02SSSSJ1"]
    assert (hello.text, hello.speaker, hello.session) == ("hello there", "fotaq-joe", "BOB2")
    assert Path(hello.audio).read_bytes() == clip_mp3  # the original MP3 bytes
    assert abs(hello.duration - 1.0) < 0.1
    stats = json.loads((tmp_path / "out" / amazon_queen.STATS).read_text())
    assert stats["kept"] == len(utterances) == 8 and stats["clip under 0.3 s"] == 1

    again = amazon_queen.prepare(tmp_path / "src", tmp_path / "out", vocabulary=None, progress_bar=False)
    assert again["all"].read_text() == written["all"].read_text()  # idempotent


def test_language_filter_and_years():
    words = {"you", "gorilla", "ain", "right", "rash"}
    assert amazon_queen.known_share("Say, you're a gorilla ain't you?", words) == 4 / 6  # not "say", "a"
    assert amazon_queen.known_share("Unga chunga warunga!", words) == 0
    assert amazon_queen.known_share("rashes", words) == 1  # by its stem
    names = amazon_queen.proper_names(["Excuse me, Faye.", "Thanks Faye.", "Floda, probably.", "Hi there Bob."])
    assert names == {"faye"}  # mid-sentence twice; Floda starts a sentence, Bob is seen once
    assert amazon_queen.non_speech("Nyah har har haar!") and amazon_queen.non_speech("WOOF! WOOF!")
    assert amazon_queen.non_speech("Hmmm...") and not amazon_queen.non_speech("Heh heh, that's a common misconception")
    assert amazon_queen.normalise("He found it in 1844.") == "he found it in eighteen forty four"
    assert amazon_queen.normalise("This is the 1940's.") == "this is the nineteen forties"
    assert amazon_queen.normalise("Open 24 Hours!") == "open twenty four hours"


def test_missing_and_damaged_archives(tmp_path, clip_mp3):
    with pytest.raises(CorpusLayoutError, match="queen.1c"):
        amazon_queen.prepare(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "queen.1c").write_bytes(b"RIFF" + b"\0" * 100)
    with pytest.raises(ArchiveError, match="no 'QTBL' table"):
        amazon_queen.prepare(tmp_path / "bad", tmp_path / "out")
    path = make_archive(tmp_path / "cut" / "queen.1c", {"BOB2.DOG": DOG, "020006P1.SB": clip_mp3})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArchiveError, match="truncated"):
        QueenArchive(path)
    floppy = make_archive(tmp_path / "floppy" / "queen.1c", {"BOB2.DOG": DOG}, version=b"PEM10\0")
    with pytest.raises(ArchiveError, match="not the English CD"):
        QueenArchive(floppy)
    with pytest.raises(ArchiveError, match="past the end|too short"):
        parse_dialogue(DOG[:150], "CUT.DOG")


# ----------------------------------------------------------------------------- tiny Drascula files

def _text_array(languages: list[list[str]]) -> bytes:
    out = struct.pack(">H", len(languages[0]))
    for strings in languages:
        block = b"\0\0"
        for text in strings:
            raw = text.encode("cp437") + b"\0"
            pad = 4 - (len(raw) + 2) % 4
            block += struct.pack(">H", len(raw) + pad + 2) + raw + b"\0" * pad
        out += struct.pack(">H", len(block)) + block
    return out


def make_dat(arrays: dict[str, list[str]]) -> bytes:
    """drascula.dat (version 6) with a few table records and two languages (English first)."""
    data = b"DRASCULA\x06"
    for index, (_, size) in enumerate(drascula.TABLES):
        data += struct.pack(">H", index % 3) + b"\x07" * (size * (index % 3))
    data += struct.pack(">H", 2)
    for name in drascula.ARRAYS:
        english = arrays.get(name, [""])
        data += _text_array([english, [f"ES {t}" if t else "" for t in english]])
    return data


ARRAYS = {"text": ["", "THAT'S THE SECOND BIGGEST DOOR", "ROOM 512, UPSTAIRS"],
          "textd": [""] * 57 + ["HOW DO YOU KNOW I'M A FOREIGNER?"] + [""] * 12 + ["AND I'M NOT KIDDING YOU"],
          "textb": ["", "I'M HERE, DRINKING"], "textvb": ["", "WHO THE HELL IS CALLING AT THIS TIME?"]}


def make_als(path: Path, seconds: float, lead: float = 0.5) -> Path:
    """8-bit unsigned PCM with 32-byte ends that are not sound, silence, a tone, silence."""
    tone = (128 + 60 * np.sin(np.arange(round(seconds * 11_025)) * 0.3)).astype(np.uint8)
    silence = np.full(round(lead * 11_025), 128, np.uint8)
    path.write_bytes(b"\x01" * 32 + silence.tobytes() + tone.tobytes() + silence.tobytes() + b"\xff" * 32)
    return path


@pytest.fixture
def drascula_tree(tmp_path) -> Path:
    folder = tmp_path / "game" / "en"
    folder.mkdir(parents=True)
    (folder / "drascula.dat").write_bytes(make_dat(ARRAYS))
    for name, seconds in (("1", 2.0), ("2", 1.5), ("D57", 2.0), ("D70", 1.5), ("B1", 1.0), ("VB1", 2.5),
                          ("S1", 1.0), ("B61", 1.0)):
        make_als(folder / f"{name}.ALS", seconds)
    return tmp_path / "game"


def test_drascula_dat_texts_and_errors(tmp_path):
    data = make_dat(ARRAYS)
    (tmp_path / "drascula.dat").write_bytes(data)
    texts = drascula.read_texts(tmp_path / "drascula.dat")
    assert set(texts) == set(drascula.ARRAYS) and len(texts["text"]) == 2
    assert texts["text"][0] == ARRAYS["text"] and texts["text"][1][1] == "ES THAT'S THE SECOND BIGGEST DOOR"
    assert texts["textd"][0][70] == "AND I'M NOT KIDDING YOU"
    (tmp_path / "cut.dat").write_bytes(data[:-40])
    with pytest.raises(DatFormatError, match="truncated"):
        drascula.read_texts(tmp_path / "cut.dat")
    (tmp_path / "long.dat").write_bytes(data + b"\0" * 8)
    with pytest.raises(DatFormatError, match="8 bytes left"):
        drascula.read_texts(tmp_path / "long.dat")
    (tmp_path / "v5.dat").write_bytes(b"DRASCULA\x05" + data[9:])
    with pytest.raises(DatFormatError, match="version 5"):
        drascula.read_texts(tmp_path / "v5.dat")


def test_drascula_audio_is_trimmed(tmp_path):
    samples = drascula.read_als(make_als(tmp_path / "x.ALS", 1.0, lead=2.0))
    assert abs(samples.size / 11_025 - (1.0 + 2 * drascula.KEEP_SILENCE)) < 0.01  # 2 s of silence cut to 0.2
    assert samples.dtype == np.float32 and np.abs(samples).max() < 0.5


def test_drascula_pairs_speakers_and_noisy_marks(drascula_tree, tmp_path):
    calls = []

    def agreement(paths, texts):
        calls.append(len(paths))
        return [("whatever", 0.9 if "kidding" in text else 0.1) for text in texts]

    out = tmp_path / "out"
    written = drascula.prepare(drascula_tree, out, agreement=agreement, progress_bar=False)
    records = {r["id"]: r for r in map(json.loads, written["all"].read_text().splitlines())}
    assert set(records) == {"drascula-1", "drascula-2", "drascula-D57", "drascula-D70", "drascula-B1", "drascula-VB1"}
    assert records["drascula-1"]["speaker"] == "drascula-john-hacker"
    assert records["drascula-D57"]["speaker"] == "drascula-john-hacker"  # the hero's line in Drascula's array
    assert records["drascula-D70"]["speaker"] == "drascula-blind-man"
    assert records["drascula-VB1"]["speaker"] == "drascula-von-braun"
    assert records["drascula-2"]["text"] == "room five hundred twelve upstairs"
    assert records["drascula-D70"]["noisy"] and records["drascula-D70"]["agreement"] == 0.9
    assert not records["drascula-1"]["noisy"]
    clean = {u.id for u in read_manifest(written["clean"])}
    assert clean == set(records) - {"drascula-D70"}
    info = sf.info(str(out / records["drascula-VB1"]["audio"]))
    assert (info.samplerate, info.subtype, info.format) == (11_025, "PCM_16", "FLAC")
    stats = json.loads((out / drascula.STATS).read_text())
    assert stats["sound effect (S, F)"] == 1 and stats["no text"] == 1  # S1; B61 (no entry)

    again = drascula.prepare(drascula_tree, out, agreement=agreement, progress_bar=False)
    assert calls == [6] and again["all"].read_text() == written["all"].read_text()  # agreement reused


def test_drascula_agreement_resumes_after_an_interruption(drascula_tree, tmp_path, monkeypatch):
    monkeypatch.setattr(drascula, "AGREEMENT_CHUNK", 2)
    calls = []

    def dies_after_one_chunk(paths, texts):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(paths))
        return [("x", 0.1)] * len(paths)

    with pytest.raises(KeyboardInterrupt):
        drascula.prepare(drascula_tree, tmp_path / "out", agreement=dies_after_one_chunk, progress_bar=False)
    assert not (tmp_path / "out" / drascula.MANIFEST).exists()
    rest = []
    drascula.prepare(drascula_tree, tmp_path / "out", progress_bar=False,
                     agreement=lambda paths, texts: rest.append(len(paths)) or [("y", 0.2)] * len(paths))
    assert calls == [2] and rest == [2, 2]  # the first chunk's two answers were kept
    agreements = [r["agreement"] for r in read_jsonl(tmp_path / "out" / drascula.MANIFEST)]
    assert sorted(agreements) == [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_drascula_layout_error(tmp_path):
    with pytest.raises(CorpusLayoutError, match="drascula.dat"):
        drascula.prepare(tmp_path, tmp_path / "out", agreement=None)


def test_cli_prepare_drascula(drascula_tree, tmp_path, capsys, monkeypatch):
    from harmonifuse.cli import main

    monkeypatch.setattr(drascula, "whisper_agreement", lambda paths, refs, **kw: [("x", 0.0)] * len(paths))
    assert "amazon-queen" in IMPORTERS and "real-speech" in IMPORTERS
    assert main(["prepare", "drascula", str(drascula_tree), str(tmp_path / "cli")]) == 0
    assert f"all: {tmp_path / 'cli' / 'drascula.jsonl'}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the split

def _records(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for c in range(12):
        speaker = f"fotaq-c{c}"
        for d in range(1 + c % 3):
            session = f"C{c}D{d}"
            for i in range(10):
                records.append({"id": f"{session}-{i}", "speaker": speaker, "session": session,
                                "duration": 6.0 + (c * 7 + i) % 5, "text": "a b c"})
                records.append({"id": f"{session}-j{i}", "speaker": "fotaq-joe", "session": session,
                                "duration": 3.0, "text": "d e"})
    rng.shuffle(records)
    return records


def test_split_is_speaker_and_dialogue_disjoint_and_deterministic():
    records = _records()
    splits = split_fotaq(records, test_minutes=6, dev_minutes=(2, 4), max_group_minutes=6)
    train_speakers = {r["speaker"] for r in splits["train"]}
    train_sessions = {r["session"] for r in splits["train"]}
    for held in ("dev", "test"):
        assert splits[held], held
        assert not {r["speaker"] for r in splits[held]} & train_speakers
        assert not {r["session"] for r in splits[held]} & train_sessions
        assert "fotaq-joe" not in {r["speaker"] for r in splits[held]}
    assert not {r["speaker"] for r in splits["dev"]} & {r["speaker"] for r in splits["test"]}
    assert sum(r["duration"] for r in splits["test"]) / 60 >= 6
    assert 2 <= sum(r["duration"] for r in splits["dev"]) / 60 <= 4
    assert all(r["speaker"] == "fotaq-joe" for r in splits["dropped"])  # Joe inside held-out dialogues
    assert "fotaq-joe" in train_speakers
    assert sum(map(len, splits.values())) == len(records)
    again = split_fotaq(_records(seed=1), test_minutes=6, dev_minutes=(2, 4), max_group_minutes=6)
    for split in splits:
        assert sorted(r["id"] for r in again[split]) == sorted(r["id"] for r in splits[split])
    other = split_fotaq(records, test_minutes=6, dev_minutes=(2, 4), max_group_minutes=6, seed="other")
    assert {r["speaker"] for r in other["test"]} != {r["speaker"] for r in splits["test"]}


def test_split_keeps_a_character_linked_through_a_shared_dialogue_together():
    records = _records()
    # c1 also speaks in one of c0's dialogues: c0 and c1 (and all their dialogues) are one group
    records.append({"id": "x", "speaker": "fotaq-c1", "session": "C0D0", "duration": 5.0, "text": "x"})
    for seed in ("a", "b", "c", "d"):
        splits = split_fotaq(records, test_minutes=6, dev_minutes=(2, 4), max_group_minutes=9, seed=seed)
        where = {r["speaker"]: split for split in ("train", "dev", "test") for r in splits[split]}
        assert where["fotaq-c0"] == where["fotaq-c1"]


def test_split_refuses_too_little_held_out_speech():
    with pytest.raises(ValueError, match="test minutes"):
        split_fotaq(_records(), test_minutes=600)


def test_real_speech_end_to_end_on_tiny_packages(tmp_path, monkeypatch, clip_mp3, drascula_tree, capsys):
    from harmonifuse.data.importers import real_speech

    fotaq = tmp_path / "fotaq"
    files = {}
    for key, character in enumerate(("BOB1", "BOB2", "FAYE1", "IAN1", "SEC1", "TAM1"), start=10):
        files[f"{character}.DOG"] = make_dog(key, joe=[(6, "Hello there.")], person=[(6, "Good day to you."),
                                                                                    (7, "Bye now.")], again=("0", "0"))
        for role in ("J", "P"):
            files[f"{key}0006{role}1.SB"] = clip_mp3
        files[f"{key}0007P1.SB"] = clip_mp3
    make_archive(fotaq / debian_packages.PACKAGES["flight-of-the-amazon-queen"].data / "queen.1c", files)
    for name, root in (("flight-of-the-amazon-queen", fotaq), ("drascula", drascula_tree)):
        package = debian_packages.PACKAGES[name]
        for notice in (package.copyright, package.readme):
            (root / notice).parent.mkdir(parents=True, exist_ok=True)
            text = b"Readme." if "readme" in notice else b"Licence."
            (root / notice).write_bytes(gzip.compress(text) if notice.endswith(".gz") else text)
    (drascula_tree / debian_packages.PACKAGES["drascula"].data).parent.mkdir(parents=True)
    shutil.move(drascula_tree / "en", drascula_tree / debian_packages.PACKAGES["drascula"].data / "en")
    roots = {"flight-of-the-amazon-queen": fotaq, "drascula": drascula_tree}
    monkeypatch.setattr(debian_packages, "fetch", lambda name, cache=None: roots[name])
    monkeypatch.setattr(real_speech, "TEST_MINUTES", 0.05)  # 3 s: one character
    monkeypatch.setattr(real_speech, "DEV_MINUTES", (0.05, 0.1))
    monkeypatch.setattr(amazon_queen, "english_vocabulary", lambda: None)

    def agreement(paths, texts):
        return [("x", 0.8 if "kidding" in text else 0.0) for text in texts]

    out = tmp_path / "corpus"
    written = real_speech.prepare(out, agreement=agreement, progress_bar=False)
    splits = {split: read_manifest(path) for split, path in written.items()}
    assert {u.speaker for u in splits["test"]} | {u.speaker for u in splits["dev"]} <= {
        "fotaq-trader-bob", "fotaq-faye", "fotaq-ian", "fotaq-secretary", "fotaq-mary-lou-cook"}
    held = {split: {u.speaker for u in splits[split]} for split in ("dev", "test")}
    assert held["dev"] and held["test"] and not held["dev"] & held["test"]
    assert not (held["dev"] | held["test"]) & {u.speaker for u in splits["train"]}
    assert {u.corpus for u in splits["test"] + splits["dev"]} == {"amazon-queen"}
    assert "drascula-D70" not in {u.id for u in splits["train"]}  # noisy: out of train
    assert {u.corpus for u in splits["train"]} == {"amazon-queen", "drascula"}
    assert all(Path(u.audio).is_file() for us in splits.values() for u in us)
    assert (out / "LICENSE-drascula.txt").read_text() == "Licence."
    assert (out / "README-flight-of-the-amazon-queen.txt").read_text() == "Readme."
    assert "Test speakers: fotaq-" in (out / "README.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["clips"] == len(splits["test"]) and "test" in capsys.readouterr().out
    before = {path: path.read_text() for path in written.values()}
    assert real_speech.prepare(out, agreement=agreement, progress_bar=False) == written
    assert {path: path.read_text() for path in written.values()} == before  # deterministic re-run


# ----------------------------------------------------------------------------- pinned packages

def _fake_apt(tmp_path: Path, deb: Path | None, fail: str = "", name: str = "tinygame_1.0-1_all.deb") -> Path:
    """An `apt-get` that copies ``deb`` into the working folder as ``name`` (or fails with ``fail``)."""
    script = tmp_path / "bin" / "apt-get"
    script.parent.mkdir(exist_ok=True)
    body = f'echo "{fail}" >&2; exit 100' if fail else f'cp "{deb}" "./{name}"'
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def _use(monkeypatch, **tools):
    real = shutil.which
    monkeypatch.setattr(debian_packages.shutil, "which", lambda name: tools[name] if name in tools else real(name))


@pytest.fixture
def tiny_deb(tmp_path, monkeypatch) -> DebianPackage:
    """A real .deb built here, pinned under a test name, with the layout of the game packages."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not available")
    tree = tmp_path / "tree"
    control = "Package: tinygame\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: test\n"
    for path, text in (("DEBIAN/control", control),
                       ("usr/share/scummvm/tinygame/data.bin", "data"),
                       ("usr/share/doc/tinygame/copyright", "You may distribute this game for free."),
                       ("usr/share/doc/tinygame/readme.txt", "Readme.")):
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
    deb = tmp_path / "tinygame_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True,
                   capture_output=True)
    package = DebianPackage("tinygame", "1.0-1", hashlib.sha256(deb.read_bytes()).hexdigest(),
                            data="usr/share/scummvm/tinygame", copyright="usr/share/doc/tinygame/copyright",
                            readme="usr/share/doc/tinygame/readme.txt")
    monkeypatch.setitem(debian_packages.PACKAGES, "tinygame", package)
    return package


def test_fetch_downloads_verifies_unpacks_and_reuses(tiny_deb, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _use(monkeypatch, **{"apt-get": str(_fake_apt(tmp_path, tmp_path / tiny_deb.deb_name))})
    assert debian_packages.cached_root("tinygame", cache) is None
    root = debian_packages.fetch("tinygame", cache)
    assert (root / tiny_deb.data / "data.bin").read_text() == "data"
    assert (cache / tiny_deb.deb_name).is_file() and debian_packages.cached_root("tinygame", cache) == root
    _use(monkeypatch, **{"apt-get": None, "dpkg-deb": None})  # neither is needed a second time
    assert debian_packages.fetch("tinygame", cache) == root
    notices = debian_packages.copy_notices("tinygame", root, tmp_path / "out")
    assert [p.name for p in notices] == ["LICENSE-tinygame.txt", "README-tinygame.txt"]
    assert "distribute" in notices[0].read_text()


def test_fetch_checksum_mismatch_is_refused(tiny_deb, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / tiny_deb.deb_name).write_bytes(b"not the pinned package")
    with pytest.raises(PackageError, match=r"sha256 [0-9a-f]{64} differs from the pinned .*Delete it"):
        debian_packages.fetch("tinygame", cache)
    (cache / tiny_deb.deb_name).unlink()
    other = tmp_path / "other.deb"
    other.write_bytes(b"another build")
    _use(monkeypatch, **{"apt-get": str(_fake_apt(tmp_path, other))})
    with pytest.raises(PackageError, match="differs from the pinned"):
        debian_packages.fetch("tinygame", cache)
    assert not (cache / tiny_deb.deb_name).exists()  # a wrong download never takes the pinned name


def test_fetch_without_tools_or_package_says_what_to_do(tiny_deb, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _use(monkeypatch, **{"apt-get": None})
    with pytest.raises(PackageError, match="apt-get not found.*packages.debian.org/bookworm/tinygame"):
        debian_packages.fetch("tinygame", cache)
    _use(monkeypatch, **{"apt-get": str(_fake_apt(tmp_path, None, fail="E: Unable to locate package"))})
    with pytest.raises(PackageError, match="Unable to locate package.*apt-get update"):
        debian_packages.fetch("tinygame", cache)
    shutil.copy(tmp_path / tiny_deb.deb_name, cache / tiny_deb.deb_name)
    _use(monkeypatch, **{"dpkg-deb": None})
    with pytest.raises(PackageError, match="dpkg-deb not found"):
        debian_packages.fetch("tinygame", cache)
    with pytest.raises(PackageError, match="unknown package 'scummvm'"):
        debian_packages.fetch("scummvm", cache)


# ----------------------------------------------------------------------------- the real packages

FOTAQ_ROOT = debian_packages.cached_root("flight-of-the-amazon-queen")
DRASCULA_ROOT = debian_packages.cached_root("drascula")


@pytest.mark.skipif(FOTAQ_ROOT is None, reason="flight-of-the-amazon-queen not in the cache "
                    "(run `harmonifuse prepare real-speech DIR` once)")
def test_real_fotaq_archive():
    archive = QueenArchive(amazon_queen.find_archive(FOTAQ_ROOT))
    assert archive.version == "CEM10" and len(archive.entries) == 7671 and len(archive.names(".SB")) == 6745
    clips = list(amazon_queen.iter_clips(archive))
    assert 3950 <= len(clips) <= 3990  # of the 3,984 dialogue clips
    assert sum(c.role == "joe" for c in clips) > 1300 and len({c.dialogue for c in clips}) == 73


@pytest.mark.skipif(DRASCULA_ROOT is None, reason="drascula not in the cache "
                    "(run `harmonifuse prepare real-speech DIR` once)")
def test_real_drascula_texts():
    folder = drascula.find_folder(DRASCULA_ROOT)
    texts = drascula.read_texts(folder / "drascula.dat")
    assert len(texts["text"]) == 6 and texts["textd"][0][68] == "HI THERE FOREIGNER"
    pairs = drascula.pair_files(folder, texts, stats := Counter())
    assert 735 <= len(pairs) <= 745 and len({p.speaker for p in pairs}) == 11
    assert stats["sound effect (S, F)"] == 18
