"""Corpus importers on tiny fabricated trees in each corpus's real layout (no downloaded data)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from harmonifuse.audio import AudioError
from harmonifuse.data.importers import (
    IMPORTERS,
    CorpusLayoutError,
    KaldiFormatError,
    cremad,
    get_importer,
    iemocap,
    kaldi,
    librispeech,
    ravdess,
)
from harmonifuse.data.manifest import read_manifest
from harmonifuse.tasks import EMOTION_LABELS

RATE = 16_000


def make_audio(path: Path, seconds: float = 0.2, rate: int = RATE) -> Path:
    """A short noise burst; its length encodes the duration the importer must report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(len(path.name)).uniform(-0.3, 0.3, round(seconds * rate))
    sf.write(str(path), noise.astype(np.float32), rate)
    return path


def by_id(manifest: Path) -> dict:
    return {u.id: u for u in read_manifest(manifest, labels=None)}


def test_registry():
    assert {"librispeech", "iemocap", "cremad", "ravdess", "kaldi"} <= set(IMPORTERS)
    assert get_importer("cremad") is cremad.prepare
    with pytest.raises(ValueError, match="unknown corpus 'timit'; known: .*librispeech"):
        get_importer("timit")


def test_cli_prepare_synthetic_tiny(tmp_path, capsys):
    from harmonifuse.cli import main

    assert main(["prepare", "synthetic", str(tmp_path / "corpus"), "--size", "tiny"]) == 0
    printed = capsys.readouterr().out
    assert "asr_train" in printed and (tmp_path / "corpus" / "ser_test.jsonl").is_file()


def test_cli_prepare_synthetic_offers_exactly_the_corpus_options(tmp_path, capsys):
    from harmonifuse.cli import main
    from harmonifuse.config.run import SYNTHETIC_SIZES, SYNTHETIC_VOICE_SETS
    from harmonifuse.data import synthetic

    assert set(SYNTHETIC_SIZES) == set(synthetic.SIZES)
    assert set(SYNTHETIC_VOICE_SETS) == set(synthetic.VOICE_SETS)
    with pytest.raises(SystemExit):
        main(["prepare", "synthetic", str(tmp_path / "x"), "--voices", "many"])
    assert "argument --voices: invalid choice: 'many'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- LibriSpeech ----------------------------------------------------------------------------

def make_librispeech_split(split: Path, entries: dict[tuple[str, str], dict[str, str]]) -> None:
    for (speaker, chapter), utterances in entries.items():
        folder = split / speaker / chapter
        folder.mkdir(parents=True)
        lines = []
        for i, (utt, text) in enumerate(utterances.items()):
            make_audio(folder / f"{utt}.flac", 0.2 + 0.1 * i)
            lines.append(f"{utt} {text}")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")


def test_librispeech_one_split(tmp_path):
    split = tmp_path / "LibriSpeech" / "dev-clean"
    make_librispeech_split(split, {("84", "121123"): {"84-121123-0000": "GO DO YOU HEAR",
                                                      "84-121123-0001": "BUT IN LESS THAN FIVE MINUTES"},
                                   ("174", "50561"): {"174-50561-0000": "FORGOTTEN TOO"}})
    manifests = librispeech.prepare(split, tmp_path / "out", progress_bar=False)
    assert manifests == {"dev-clean": tmp_path / "out" / "librispeech_dev-clean.jsonl"}
    utts = by_id(manifests["dev-clean"])
    assert set(utts) == {"84-121123-0000", "84-121123-0001", "174-50561-0000"}
    second = utts["84-121123-0001"]
    assert (second.text, second.speaker, second.session, second.corpus) == (
        "BUT IN LESS THAN FIVE MINUTES", "84", "121123", "librispeech")
    assert second.duration == pytest.approx(0.3)
    assert second.audio == str(split / "84" / "121123" / "84-121123-0001.flac")
    assert all(u.has_task("asr") and not u.has_task("ser") for u in utts.values())


def test_librispeech_root_with_splits_and_missing_audio(tmp_path, caplog):
    root = tmp_path / "LibriSpeech"
    make_librispeech_split(root / "dev-clean", {("1", "2"): {"1-2-0000": "A B"}})
    make_librispeech_split(root / "test-clean", {("3", "4"): {"3-4-0000": "C D", "3-4-0001": "E"}})
    (root / "test-clean" / "3" / "4" / "3-4-0001.flac").unlink()
    manifests = librispeech.prepare(root, tmp_path / "out", progress_bar=False)
    assert set(manifests) == {"dev-clean", "test-clean"}
    assert set(by_id(manifests["test-clean"])) == {"3-4-0000"}  # the missing file is skipped...
    assert "skipped 1 bad sample" in caplog.text and "3-4-0001.flac" in caplog.text  # ...and said
    with pytest.raises(AudioError, match=r"3-4-0001\.flac: audio file not found"):
        librispeech.prepare(root, tmp_path / "out2", on_bad_audio="fail", progress_bar=False)


def test_librispeech_wrong_layout(tmp_path):
    make_audio(tmp_path / "src" / "a.flac")
    with pytest.raises(CorpusLayoutError, match=r"src does not look like LibriSpeech: expected "
                                                r"<speaker>/<chapter>/<speaker>-<chapter>\.trans\.txt"):
        librispeech.prepare(tmp_path / "src", tmp_path / "out")
    with pytest.raises(CorpusLayoutError, match="does not exist"):
        librispeech.prepare(tmp_path / "nowhere", tmp_path / "out")


# --- IEMOCAP --------------------------------------------------------------------------------

IEMOCAP_LABELS = [("F000", "neu"), ("M000", "exc"), ("F001", "fru"), ("M001", "ang"),
                  ("F002", "sad"), ("M002", "hap"), ("F003", "xxx")]


def make_iemocap(root: Path) -> None:
    for k in range(1, 6):
        session = root / f"Session{k}"
        dialog = f"Ses0{k}F_impro01"
        evaluation, transcripts = [], []
        for i, (suffix, label) in enumerate(IEMOCAP_LABELS):
            utt = f"{dialog}_{suffix}"
            make_audio(session / "sentences" / "wav" / dialog / f"{utt}.wav", 0.2)
            evaluation += [f"[{i}.0000 - {i}.5000]\t{utt}\t{label}\t[2.5000, 2.5000, 2.5000]",
                           "C-E1:\tNeutral;\t()", "A-E1:\tval 3; act 2; dom  2;\t()", ""]
            transcripts.append(f"{utt} [00{i}.0000-00{i}.5000]: Line {i} of session {k}.")
        (session / "dialog" / "EmoEvaluation").mkdir(parents=True)
        header = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
        (session / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text(header + "\n".join(evaluation))
        (session / "dialog" / "transcriptions").mkdir(parents=True)
        (session / "dialog" / "transcriptions" / f"{dialog}.txt").write_text("\n".join(transcripts))


def test_iemocap_four_classes_and_folds(tmp_path):
    make_iemocap(tmp_path / "IEMOCAP_full_release")
    manifests = iemocap.prepare(tmp_path, tmp_path / "out", progress_bar=False)  # parent folder works
    assert set(manifests) == {"all"} | {f"fold{k}_{s}" for k in range(1, 6) for s in ("train", "test")}
    assert manifests["fold3_test"].name == "iemocap_fold3_test.jsonl"
    everything = by_id(manifests["all"])
    assert len(everything) == 5 * 5  # fru and xxx dropped in each session
    utt = everything["Ses02F_impro01_M000"]
    assert (utt.emotion, utt.speaker, utt.session, utt.text) == (
        "happy", "Ses02_M", "Session2", "Line 1 of session 2.")  # exc merged into happy
    assert sorted({u.emotion for u in everything.values()}) == sorted(EMOTION_LABELS)
    for k in range(1, 6):
        test = read_manifest(manifests[f"fold{k}_test"], labels=EMOTION_LABELS)
        train = read_manifest(manifests[f"fold{k}_train"], labels=EMOTION_LABELS)
        assert {u.session for u in test} == {f"Session{k}"} and len(test) == 5
        assert f"Session{k}" not in {u.session for u in train} and len(train) == 20


def test_iemocap_without_excited_merge_or_transcripts(tmp_path):
    make_iemocap(tmp_path / "IEMOCAP_full_release")
    for transcripts in (tmp_path / "IEMOCAP_full_release").glob("Session*/dialog/transcriptions"):
        for file in transcripts.iterdir():
            file.unlink()
    manifests = iemocap.prepare(tmp_path / "IEMOCAP_full_release", tmp_path / "out",
                                merge_excited=False, progress_bar=False)
    utts = by_id(manifests["all"])
    assert len(utts) == 5 * 4 and "Ses01F_impro01_M000" not in utts
    assert all(u.text is None for u in utts.values())


def test_iemocap_wrong_layout(tmp_path):
    (tmp_path / "Session1" / "dialog").mkdir(parents=True)
    with pytest.raises(CorpusLayoutError, match="does not look like IEMOCAP: expected Session1..Session5"):
        iemocap.prepare(tmp_path, tmp_path / "out")


# --- CREMA-D --------------------------------------------------------------------------------

CREMAD_FILES = ["1001_DFA_ANG_XX", "1001_IEO_DIS_HI", "1002_TIE_HAP_LO", "1002_ITS_NEU_XX",
                "1003_WSI_SAD_MD", "1003_IWW_FEA_XX"]


def test_cremad_subsets_and_text(tmp_path):
    for name in CREMAD_FILES:
        make_audio(tmp_path / "CREMA-D" / "AudioWAV" / f"{name}.wav")
    four = by_id(cremad.prepare(tmp_path / "CREMA-D", tmp_path / "out", progress_bar=False)["all"])
    assert {k: u.emotion for k, u in four.items()} == {
        "1001_DFA_ANG_XX": "angry", "1002_TIE_HAP_LO": "happy", "1002_ITS_NEU_XX": "neutral",
        "1003_WSI_SAD_MD": "sad"}
    assert four["1001_DFA_ANG_XX"].speaker == "1001" and four["1001_DFA_ANG_XX"].text is None
    six = by_id(cremad.prepare(tmp_path / "CREMA-D" / "AudioWAV", tmp_path / "out6", all_emotions=True,
                               with_text=True, progress_bar=False)["all"])
    assert len(six) == 6 and six["1001_IEO_DIS_HI"].emotion == "disgust"
    assert six["1003_IWW_FEA_XX"].emotion == "fear"
    assert six["1001_DFA_ANG_XX"].text == "Don't forget a jacket"


def test_cremad_wrong_layout(tmp_path):
    make_audio(tmp_path / "AudioWAV" / "hello.wav")
    with pytest.raises(CorpusLayoutError, match=r"CREMA-D: expected AudioWAV/<actor>_<sentence>"):
        cremad.prepare(tmp_path, tmp_path / "out")


# --- RAVDESS --------------------------------------------------------------------------------

RAVDESS_FILES = {"01": ["03-01-01-01-01-01-01", "03-01-02-01-01-01-01", "03-01-05-02-02-01-01",
                        "03-02-03-01-01-01-01"],  # song: left out by default
                 "12": ["03-01-03-01-02-02-12", "03-01-04-02-01-01-12", "03-01-08-01-01-01-12"]}


def make_ravdess(root: Path) -> None:
    for actor, names in RAVDESS_FILES.items():
        for name in names:
            make_audio(root / f"Actor_{actor}" / f"{name}.wav")


def test_ravdess_default_four_classes(tmp_path):
    make_ravdess(tmp_path / "src")
    utts = by_id(ravdess.prepare(tmp_path / "src", tmp_path / "out")["all"])  # with a bar
    assert {k: u.emotion for k, u in utts.items()} == {
        "03-01-01-01-01-01-01": "neutral", "03-01-05-02-02-01-01": "angry",
        "03-01-03-01-02-02-12": "happy", "03-01-04-02-01-01-12": "sad"}
    assert utts["03-01-04-02-01-01-12"].speaker == "Actor_12"


def test_ravdess_options(tmp_path):
    make_ravdess(tmp_path / "src")
    calm = by_id(ravdess.prepare(tmp_path / "src", tmp_path / "a", merge_calm=True,
                                 progress_bar=False)["all"])
    assert calm["03-01-02-01-01-01-01"].emotion == "neutral"
    every = by_id(ravdess.prepare(tmp_path / "src", tmp_path / "b", all_emotions=True, include_song=True,
                                  with_text=True, progress_bar=False)["all"])
    assert len(every) == 7 and every["03-01-08-01-01-01-12"].emotion == "surprise"
    assert every["03-01-02-01-01-01-01"].emotion == "calm"
    assert every["03-01-03-01-02-02-12"].text == "Dogs are sitting by the door"


def test_ravdess_wrong_layout(tmp_path):
    make_audio(tmp_path / "Actor_01" / "take1.wav")
    with pytest.raises(CorpusLayoutError, match=r"RAVDESS: expected Actor_XX/MM-VV-EE"):
        ravdess.prepare(tmp_path, tmp_path / "out")


# --- Kaldi ----------------------------------------------------------------------------------

def test_kaldi_plain_recordings(tmp_path, monkeypatch):
    make_audio(tmp_path / "audio" / "r1.wav", 0.3)
    make_audio(tmp_path / "audio" / "r2.wav", 0.4)
    make_audio(tmp_path / "audio" / "r3.wav", 0.2)
    data = tmp_path / "recipe" / "data" / "train"
    data.mkdir(parents=True)
    (data / "wav.scp").write_text(f"r1 {tmp_path / 'audio' / 'r1.wav'}\nr2 audio/r2.wav\nr3 audio/r3.wav\n")
    (data / "text").write_text("r1 hello world\nr2 good morning\n")  # r3 has no transcript
    (data / "utt2spk").write_text("r1 alice\nr2 bob\nr3 bob\n")
    utts = by_id(kaldi.prepare(data, tmp_path / "out", audio_root=tmp_path, progress_bar=False)["all"])
    assert set(utts) == {"r1", "r2"}
    assert (utts["r2"].text, utts["r2"].speaker, utts["r2"].corpus) == ("good morning", "bob", "train")
    assert utts["r2"].duration == pytest.approx(0.4)
    monkeypatch.chdir(tmp_path)  # without audio_root, relative paths are relative to the cwd
    (data / "utt2spk").unlink()
    utts = by_id(kaldi.prepare(data, tmp_path / "out2", corpus="mine", progress_bar=False)["all"])
    assert utts["r2"].speaker == "r2" and utts["r2"].corpus == "mine"


def test_kaldi_segments_are_cut(tmp_path):
    rate = 8_000
    ramp = np.linspace(-0.5, 0.5, 2 * rate, dtype=np.float32)  # 2 s, distinct value per sample
    sf.write(str(tmp_path / "rec.wav"), ramp, rate, subtype="FLOAT")
    data = tmp_path / "data"
    data.mkdir()
    (data / "wav.scp").write_text(f"rec {tmp_path / 'rec.wav'}\n")
    (data / "segments").write_text("s1 rec 0.0 0.5\ns2 rec 1.25 -1\ns3 rec 1.5 9.0\ns4 rec 3.0 4.0\n")
    (data / "text").write_text("s1 one\ns2 two\ns3 three\ns4 four\n")
    utts = by_id(kaldi.prepare(data, tmp_path / "out", progress_bar=False)["all"])
    assert set(utts) == {"s1", "s2", "s3"}  # s4 starts after the recording ends
    assert [utts[s].duration for s in ("s1", "s2", "s3")] == pytest.approx([0.5, 0.75, 0.5])
    s2, s2_rate = sf.read(utts["s2"].audio, dtype="float32")
    assert s2_rate == rate and utts["s2"].audio == str(tmp_path / "out" / "data_segments" / "s2.wav")
    np.testing.assert_allclose(s2, ramp[int(1.25 * rate):], atol=1e-4)  # 16-bit PCM


@pytest.mark.parametrize("entry, problem", [("sox in.flac -t wav - |", "is a piped command"),
                                            ("exp/raw.ark:1234", "points into an archive")])
def test_kaldi_rejects_pipes_and_archives(tmp_path, entry, problem):
    make_audio(tmp_path / "ok.wav")
    (tmp_path / "wav.scp").write_text(f"ok {tmp_path / 'ok.wav'}\nbad {entry}\n")
    (tmp_path / "text").write_text("ok hi\nbad there\n")
    with pytest.raises(KaldiFormatError, match=rf"wav\.scp:2: recording 'bad' {problem}"):
        kaldi.prepare(tmp_path, tmp_path / "out")


def test_kaldi_wrong_layout(tmp_path):
    (tmp_path / "wav.scp").write_text("")
    with pytest.raises(CorpusLayoutError, match="Kaldi data directory: expected .*Missing: text"):
        kaldi.prepare(tmp_path, tmp_path / "out")


def test_importer_manifests_keep_absolute_paths_to_audio_outside_out(tmp_path):
    """Audio stays in SRC, so manifests in OUT hold absolute paths and survive a cwd change."""
    for name in CREMAD_FILES[:1]:
        make_audio(tmp_path / "src" / "AudioWAV" / f"{name}.wav")
    manifest = cremad.prepare(tmp_path / "src", tmp_path / "out", progress_bar=False)["all"]
    record = json.loads(manifest.read_text())
    assert Path(record["audio"]).is_absolute()
