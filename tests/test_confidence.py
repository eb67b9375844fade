"""Answers that say how sure they are: no speech, transcript confidence, calibrated emotion probabilities."""
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny import perturbed, tiny_harmonifuse, write_tiny_corpus

from harmonifuse.data.nonspeech import nonspeech_clips
from harmonifuse.evaluation.calibration import calibration_report, fit_temperature
from harmonifuse.evaluation.metrics import expected_calibration_error, text_agreement

POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")
REAL_SPEECH = POCKETSPHINX / "librivox" / "sense_and_sensibility_01_austen_64kb-0880.wav"


def test_expected_calibration_error_on_a_hand_computed_case():
    # bin 0.9: confidences .9, .9 with one right -> |0.5 - 0.9| ; bin 0.6: .6 right -> |1 - 0.6|
    assert expected_calibration_error([0.9, 0.9, 0.6], [True, False, True]) == pytest.approx(
        2 / 3 * 0.4 + 1 / 3 * 0.4)
    assert expected_calibration_error([1.0, 0.25], [True, False]) == pytest.approx(0.5 * 0.0 + 0.5 * 0.25)
    with pytest.raises(ValueError, match="as many"):
        expected_calibration_error([0.5], [])


def test_text_agreement_is_one_minus_the_character_error_rate_clipped():
    assert text_agreement("Hello, world", "hello world") == 1.0
    assert text_agreement("abcd", "abcx") == pytest.approx(0.75)
    assert text_agreement("", "") == 1.0 and text_agreement("", "words") == 0.0
    assert text_agreement("ab", "completely different") == 0.0


def test_temperature_scaling_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(0, 4, size=(4000, 4)), dtype=torch.float32)
    true_t = 3.0
    targets = torch.multinomial((logits / true_t).softmax(-1), 1, generator=torch.Generator().manual_seed(0))[:, 0]
    fitted = fit_temperature(logits, targets)
    assert fitted == pytest.approx(true_t, rel=0.08)
    before, after = calibration_report(logits, targets, 1.0), calibration_report(logits, targets, fitted)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"] and after["ece"] < 0.03
    assert after["accuracy"] == before["accuracy"]  # a temperature never changes a prediction


def test_calibration_fits_on_drifted_copies_of_dev_seeded_and_in_memory(tmp_path):
    from harmonifuse.data.manifest import read_manifest
    from harmonifuse.evaluation.calibration import DRIFT, calibrate, drifted, label_scores

    dev = read_manifest(write_tiny_corpus(tmp_path, per_task=6) / "ser_dev.jsonl")
    model = perturbed(tiny_harmonifuse(seed=0)).eval()
    # every perturbation changes the audio, and the same seed draws the same copies again
    for name in DRIFT:
        copies = drifted(dev, name)
        assert [c.id for c in copies] == [f"{u.id}@{name}" for u in dev]
        wave, rate = copies[0].audio
        assert rate == 16000 and wave.dtype == np.float32 and np.abs(wave).max() <= 1.0
        original = sf.read(dev[0].audio, dtype="float32")[0]
        assert len(wave) != len(original) or not np.allclose(wave, original, atol=1e-3)
        assert np.array_equal(wave, drifted(dev, name)[0].audio[0])
    labels = model.config.tasks.emotion_labels
    targets = torch.tensor([labels.index(u.emotion) for u in dev])
    clean = label_scores(model, dev, progress=False)
    drift = torch.cat([label_scores(model, drifted(dev, name), progress=False) for name in DRIFT])
    expected = {"dev": fit_temperature(clean, targets),
                "drift": fit_temperature(drift, targets.repeat(len(DRIFT))),
                "dev+drift": fit_temperature(torch.cat([clean, drift]), targets.repeat(len(DRIFT) + 1))}
    for fit_on, temperature in expected.items():
        report = calibrate(model, dev, fit_on=fit_on, progress=False)
        assert report["ser_temperature"] == pytest.approx(temperature, abs=1e-4)
        assert model.config.calibration.ser_temperature == report["ser_temperature"]
        assert report["n_fitted"] == len(dev) * {"dev": 1, "drift": len(DRIFT), "dev+drift": len(DRIFT) + 1}[fit_on]
        assert report["after"]["nll"] <= report["before"]["nll"] + 1e-6
    with pytest.raises(ValueError, match="fit_on must be dev, drift or dev\+drift, got 'test'"):
        calibrate(model, dev, fit_on="test", progress=False)


def test_the_nonspeech_set_is_seeded_and_holds_at_least_twenty_kinds():
    clips = nonspeech_clips(seconds=1.0)
    assert len(clips) >= 20
    again = nonspeech_clips(seconds=1.0)
    assert all(np.array_equal(clips[k], again[k]) for k in clips)
    assert all(c.dtype == np.float32 and c.shape == (16000,) and np.abs(c).max() <= 1 for c in clips.values())


def test_the_detector_finds_no_speech_in_the_nonspeech_set_and_speech_in_a_real_recording():
    from harmonifuse.modules.vad import SileroVAD

    vad = SileroVAD()
    flags = vad.has_speech(list(nonspeech_clips(seconds=2.0).values()))
    assert sum(flags) <= 1  # the goal is >= 95 % detected as no speech
    if REAL_SPEECH.is_file():
        from harmonifuse.audio import load_audio

        assert vad.has_speech([load_audio(REAL_SPEECH)]) == [True]
        assert vad.speech_seconds([load_audio(REAL_SPEECH)])[0] > 1.5


def test_analyze_answers_no_speech_for_noise_and_silence_and_still_answers_speech(tmp_path):
    model = tiny_harmonifuse(seed=0, vad={"enabled": True}).eval()
    clips = nonspeech_clips(seconds=1.0)
    sf.write(tmp_path / "silence.wav", np.zeros(16000, dtype=np.float32), 16000)
    noise, silence = model.analyze([clips["white noise -15 dBFS"], str(tmp_path / "silence.wav")])
    for answer in (noise, silence):
        assert answer == {"no_speech": True, "transcript": "", "transcript_confidence": 1.0, "emotion": None,
                          "emotion_confidence": None, "emotion_probs": None, "duration": 1.0}
    if REAL_SPEECH.is_file():
        speech = model.analyze(str(REAL_SPEECH))
        assert speech["no_speech"] is False
        assert 0.0 <= speech["transcript_confidence"] <= 1.0
        assert speech["emotion_confidence"] == pytest.approx(max(speech["emotion_probs"].values()))
    off = tiny_harmonifuse(seed=0, vad={"enabled": False}).eval()
    from harmonifuse.audio import AudioError

    with pytest.raises(AudioError, match="silence.wav"):  # without a detector silence stays an error
        off.analyze(str(tmp_path / "silence.wav"))


def test_the_temperature_divides_the_label_scores_and_keeps_the_ranking():
    model = tiny_harmonifuse(seed=0).eval()
    torch.manual_seed(3)
    clip = (torch.randn(12000) * 0.1).numpy()
    sharp = model.analyze(clip, tasks=("ser",))
    model.config.calibration.ser_temperature = 4.0
    soft = model.analyze(clip, tasks=("ser",))
    labels = model.config.tasks.emotion_labels
    encoded = model.encode(*model.load_waveforms([clip]))
    speech = model.speech_embeddings(encoded.hidden_states, encoded.lengths, ["ser"])
    scores = model.llm.score_labels(speech.embeddings, speech.lengths, model.prompts_for(["ser"]), labels)[0]
    assert [sharp["emotion_probs"][k] for k in labels] == pytest.approx(scores.softmax(-1).tolist(), abs=1e-6)
    assert [soft["emotion_probs"][k] for k in labels] == pytest.approx((scores / 4.0).softmax(-1).tolist(), abs=1e-6)
    assert soft["emotion"] == sharp["emotion"] and soft["emotion_confidence"] < sharp["emotion_confidence"]


def test_the_real_speech_importer_writes_ten_normalised_utterances(tmp_path):
    from harmonifuse.data.importers import get_importer
    from harmonifuse.data.manifest import read_manifest

    fake = tmp_path / "src"
    (fake / "cards").mkdir(parents=True)
    sf.write(fake / "cards" / "001.wav", np.zeros(1600, dtype=np.float32), 16000)
    (fake / "cards" / "cards.transcription").write_text("<s> Ten of CLUBS,  </s> (001)\n")
    written = get_importer("pocketsphinx")(fake, tmp_path / "out")
    [utt] = read_manifest(written["real"])
    assert (utt.id, utt.text, utt.speaker) == ("cards-001", "ten of clubs", "cards")
    (fake / "cards" / "cards.transcription").write_text("ten of clubs without an id\n")
    with pytest.raises(ValueError, match=r"cards.transcription:1: expected"):
        get_importer("pocketsphinx")(fake, tmp_path / "out")
    if POCKETSPHINX.is_dir():
        real = read_manifest(get_importer("pocketsphinx")(POCKETSPHINX, tmp_path / "real")["real"])
        assert len(real) == 10 and {u.speaker for u in real} == {"librivox", "cards"}
        assert all(u.text == u.text.lower() and not any(c.isdigit() for c in u.text) for u in real)


def test_stored_label_scores_are_reused_for_the_same_weights_only(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "score_store.py"  # a research helper
    spec = importlib.util.spec_from_file_location("score_store", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ScoreStore = module.ScoreStore

    model = perturbed(tiny_harmonifuse(seed=0)).eval()
    store = ScoreStore(tmp_path / "scores.pt", model)
    assert store.scores == {}
    store.scores["dev"] = torch.arange(8.0).reshape(2, 4)
    store.save()
    again = ScoreStore(tmp_path / "scores.pt", model)
    assert again.scores.keys() == {"dev"} and torch.equal(again.scores["dev"], store.scores["dev"])
    other = perturbed(tiny_harmonifuse(seed=0), seed=1).eval()  # same architecture, other weights
    assert ScoreStore(tmp_path / "scores.pt", other).scores == {}
    torch.save({"dev": torch.zeros(2, 4)}, tmp_path / "old.pt")  # a store from before weights were recorded
    assert ScoreStore(tmp_path / "old.pt", model).scores == {}
