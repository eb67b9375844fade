"""Metrics against values computed by hand."""
import pytest

from harmonifuse.evaluation.metrics import asr_metrics, mean_std, normalize_text, ser_metrics


def test_normalisation_is_case_and_punctuation_blind():
    assert normalize_text("  Hello,  World!  ") == "hello world"


def test_wer_and_cer_by_hand():
    # ref 1: 4 words, one substitution; ref 2: 2 words, one deletion -> 2 errors / 6 words
    m = asr_metrics(["The cat sat down.", "Good morning"], ["the cat sat town", "good"])
    assert m["wer"] == pytest.approx(2 / 6)
    # chars: "the cat sat down" (16) 1 sub; "good morning" (12) 8 deleted (" morning") -> 9 / 28
    assert m["cer"] == pytest.approx(9 / 28)
    # raw: case and punctuation count: "The"≠"the", "down."≠"town", "Good"≠"good", deletion -> 4 / 6
    assert m["wer_raw"] == pytest.approx(4 / 6)
    assert m["n_asr"] == 2


def test_label_answers_count_asr_replies_that_start_with_an_emotion_label():
    labels = ["neutral", "happy", "sad", "angry"]
    refs = ["the cat sat", "Sad songs say so much", "good morning", "a dog", "one two"]
    # 1: "Angry," -> counted (normalised); 2: the reference itself starts with a label -> not counted;
    # 3: a label later in the answer -> not counted; 4: "Happy" -> counted; 5: empty answer -> not counted
    hyps = ["Angry, the cat sat", "sad songs say so much", "good morning happy", "Happy a dog", ""]
    m = asr_metrics(refs, hyps, labels)
    assert m["label_answers"] == pytest.approx(2 / 5)
    assert "label_answers" not in asr_metrics(refs, hyps)


def test_asr_metrics_reject_mismatched_lists():
    with pytest.raises(ValueError, match="as many"):
        asr_metrics(["a"], [])


def test_ser_metrics_by_hand():
    labels = ["neutral", "happy", "sad", "angry"]
    refs = ["neutral", "neutral", "neutral", "happy", "sad", "sad"]
    hyps = ["neutral", "neutral", "happy", "happy", "sad", "angry"]
    m = ser_metrics(refs, hyps, labels)
    assert m["wa"] == pytest.approx(4 / 6)
    # recalls: neutral 2/3, happy 1/1, sad 1/2 (angry absent from the references)
    assert m["ua"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    # F1: neutral p=1 r=2/3 -> 0.8; happy p=1/2 r=1 -> 2/3; sad p=1 r=1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 2 / 3) / 3)
    assert m["confusion"] == [[2, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]


def test_ser_metrics_reject_unknown_reference_label():
    with pytest.raises(ValueError, match="not in the label set"):
        ser_metrics(["bored"], ["sad"], ["sad", "happy"])


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([5.0]) == (5.0, 0.0)


def test_evaluation_scores_each_speaker_and_writes_their_table(monkeypatch):
    from types import SimpleNamespace

    from harmonifuse.data.manifest import Utterance
    from harmonifuse.evaluation import evaluate as evaluation
    from harmonifuse.evaluation.model_report import markdown_table

    def utt(i, speaker, text=None, emotion=None):
        return Utterance(f"u{i}", f"/a/{i}.wav", 1.0, "c", speaker, text=text, emotion=emotion)

    asr = [utt(0, "a", "one two"), utt(1, "b", "three four five"), utt(2, "a", "six")]
    ser = [utt(3, "a", emotion="sad"), utt(4, "b", emotion="happy"), utt(5, "b", emotion="sad")]
    answers = {"asr": [{"transcript": t, "transcript_confidence": 0.5} for t in ("one two", "three for", "happy six")],
               "ser": [{"emotion": e, "emotion_confidence": c, "emotion_probs": {}}
                       for e, c in (("sad", 0.9), ("happy", 0.6), ("happy", 0.8))]}
    monkeypatch.setattr(evaluation, "predict", lambda model, utterances, task, **_: answers[task][:len(utterances)])
    model = SimpleNamespace(config=SimpleNamespace(tasks=SimpleNamespace(emotion_labels=["happy", "sad"]),
                                                   encoder=SimpleNamespace(max_seconds=30.0)), vad=None)
    result = evaluation.evaluate(model, {"asr": asr, "ser": ser}, progress=False)
    metrics, per_speaker = result["metrics"], result["metrics"]["per_speaker"]
    assert metrics["wer"] == pytest.approx(3 / 6)
    # a: "one two" right, "happy" inserted before "six": 1 of 3 words; b: "four" -> "for", "five" deleted: 2 of 3
    assert per_speaker["a"]["wer"] == pytest.approx(1 / 3) and per_speaker["b"]["wer"] == pytest.approx(2 / 3)
    # "happy six" answers the ASR prompt with an emotion label: 1 of 3 answers, 1 of speaker a's 2
    assert metrics["label_answers"] == pytest.approx(1 / 3)
    # right at 0.9 and 0.6, wrong at 0.8: each its own bin
    assert metrics["ser_ece"] == pytest.approx((0.1 + 0.4 + 0.8) / 3) and metrics["asr_confidence"] == 0.5
    assert per_speaker["a"]["label_answers"] == 0.5 and per_speaker["b"]["label_answers"] == 0.0
    assert per_speaker["a"]["wa"] == 1.0 and per_speaker["b"]["wa"] == 0.5
    assert per_speaker["b"]["ua"] == 0.5 and "confusion" not in per_speaker["b"]
    assert (per_speaker["a"]["n_asr"], per_speaker["a"]["n_ser"]) == (2, 1)
    assert [p["speaker"] for p in result["predictions"]["ser"]] == ["a", "b", "b"]
    table = markdown_table(per_speaker, "Per speaker", "speaker")
    assert "| speaker | wer |" in table and "| b | 0.6667 |" in table and table.count("\n| ") == 3

    one_speaker = evaluation.evaluate(model, {"asr": asr[:1]}, progress=False)["metrics"]
    assert "per_speaker" not in one_speaker


def test_numbers_in_digits_compare_equal_to_numbers_in_words():
    assert normalize_text("Ten of clubs.") == normalize_text("10 of clubs") == "ten of clubs"
    assert normalize_text("1,250 and 21") == "one thousand two hundred fifty and twenty one"
    assert asr_metrics(["eight of spades four of clubs"], ["8 of spades, 4 of clubs"])["wer"] == 0.0
    assert normalize_text("mp3 and 10th") == "mp3 and 10th"  # only whole numbers are spelt out
