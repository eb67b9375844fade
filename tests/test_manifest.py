"""harmonifuse.data.manifest: round trips, path handling, and a validator that reports every problem."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harmonifuse.data.manifest import ManifestError, Utterance, read_manifest, write_manifest
from harmonifuse.tasks import EMOTION_LABELS


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF")  # the validator checks existence, not content
    return path


def line(**fields) -> str:
    record = {"id": "u1", "audio": "a.wav", "duration": 1.5, "corpus": "c", "speaker": "s",
              "text": "hello"}
    record.update(fields)
    return json.dumps({k: v for k, v in record.items() if v is not ...})


def test_round_trip_and_relative_paths(tmp_path):
    inside = touch(tmp_path / "data" / "audio" / "x.wav")
    outside = touch(tmp_path / "elsewhere" / "y.wav")
    utts = [
        Utterance("x", str(inside), 1.25, "lib", "spk1", text="HELLO WORLD", session="ch1"),
        Utterance("y", str(outside), 2.0, "iemocap", "Ses01_F", emotion="happy", text="Hi."),
    ]
    manifest = tmp_path / "data" / "m.jsonl"
    write_manifest(manifest, utts)
    records = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert records[0]["audio"] == "audio/x.wav"  # inside the folder: relative
    assert records[1]["audio"] == str(outside)  # outside: stays absolute
    assert "emotion" not in records[0]  # None fields are omitted
    assert list(records[0]) == ["id", "audio", "duration", "corpus", "speaker", "session", "text"]
    assert read_manifest(manifest, labels=EMOTION_LABELS) == utts
    assert [p.name for p in manifest.parent.iterdir() if p.is_file()] == ["m.jsonl"]  # no temp left


def test_absolute_paths_when_asked(tmp_path):
    audio = touch(tmp_path / "a.wav")
    write_manifest(tmp_path / "m.jsonl", [Utterance("a", str(audio), 1.0, "c", "s", text="t")],
                   relative_to_manifest=False)
    assert json.loads((tmp_path / "m.jsonl").read_text())["audio"] == str(audio)


def test_relative_audio_is_resolved_against_manifest_folder_not_cwd(tmp_path, monkeypatch):
    touch(tmp_path / "sub" / "a.wav")
    (tmp_path / "sub" / "m.jsonl").write_text(line(audio="a.wav") + "\n\n")  # blank lines are fine
    monkeypatch.chdir(tmp_path)
    [utt] = read_manifest(Path("sub/m.jsonl"))
    assert utt.audio == str(tmp_path / "sub" / "a.wav") and os.path.isabs(utt.audio)


def test_has_task():
    asr = Utterance("a", "/a.wav", 1.0, "c", "s", text="hi")
    ser = Utterance("b", "/b.wav", 1.0, "c", "s", emotion="sad")
    both = Utterance("c", "/c.wav", 1.0, "c", "s", text="hi", emotion="sad")
    assert [u.has_task("asr") for u in (asr, ser, both)] == [True, False, True]
    assert [u.has_task("ser") for u in (asr, ser, both)] == [False, True, True]
    with pytest.raises(ValueError, match="unknown task 'st'"):
        asr.has_task("st")


def test_every_problem_is_reported_with_file_line_and_field(tmp_path):
    touch(tmp_path / "a.wav")
    lines = [
        line(id="ok1"),                                   # 1 fine
        '{"id": "broken", ',                              # 2 bad JSON
        line(id="u3", speaker=...),                       # 3 missing speaker
        line(id="u4", speaker=7),                         # 4 wrong type
        line(id="u5", audio="missing.wav"),               # 5 audio not found
        line(id="u6", emotion="bored"),                   # 6 unknown emotion
        line(id="ok1"),                                   # 7 duplicate id
        line(id="u8", duration=-1),                       # 8 bad duration
        line(id="u9", duration="2.0"),                    # 9 duration as string
        line(id="u10", text=None),                        # 10 no label at all
        line(id="u11", text=""),                          # 11 empty transcript
        line(id="u12", corpus=3, duration=0),             # 12 two problems on one line
    ]
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest, labels=EMOTION_LABELS)
    found = [(i.line, i.field) for i in caught.value.issues]
    assert found == [(2, None), (3, "speaker"), (4, "speaker"), (5, "audio"), (6, "emotion"),
                     (7, "id"), (8, "duration"), (9, "duration"), (10, "text"), (11, "text"),
                     (12, "corpus"), (12, "duration")]
    message = str(caught.value)
    assert message.startswith("12 problems in manifest:")
    for number, field in found[1:]:
        assert f"{manifest}:{number}: field '{field}': " in message
    assert f"{manifest}:2: not valid JSON" in message
    assert "duplicate id 'ok1' (first on line 1)" in message
    assert "unknown label 'bored'; use one of ['angry', 'happy', 'neutral', 'sad']" in message


def test_labels_none_accepts_any_emotion_and_check_audio_off(tmp_path):
    (tmp_path / "m.jsonl").write_text(line(emotion="bored", audio="nowhere.wav") + "\n")
    [utt] = read_manifest(tmp_path / "m.jsonl", check_audio=False)
    assert utt.emotion == "bored"
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: field 'audio': file not found"):
        read_manifest(tmp_path / "m.jsonl")


def test_missing_and_empty_manifest(tmp_path):
    with pytest.raises(ManifestError, match=r"none\.jsonl: manifest not found"):
        read_manifest(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match=r"empty\.jsonl: manifest has no utterances"):
        read_manifest(tmp_path / "empty.jsonl")


def test_write_rejects_duplicates_and_unlabelled_without_touching_the_file(tmp_path):
    target = tmp_path / "m.jsonl"
    target.write_text("old\n")
    dup = [Utterance("a", "/a.wav", 1.0, "c", "s", text="x")] * 2
    with pytest.raises(ManifestError, match="duplicate id 'a'"):
        write_manifest(target, dup)
    with pytest.raises(ManifestError, match="has no label"):
        write_manifest(target, [Utterance("b", "/b.wav", 1.0, "c", "s")])
    assert target.read_text() == "old\n"
