"""Prompt variety in training: a reproducible per-item draw of each task's phrasings, and the model and
trainer reading it."""
import types

import pytest
import torch
from tiny import perturbed, tiny_harmonifuse, write_tiny_run_config

from harmonifuse.data.batch import SpeechBatch
from harmonifuse.data.prompt_choice import PromptChoice
from harmonifuse.evaluation.evaluate import evaluate
from harmonifuse.model import HarmoniFuse
from harmonifuse.training.run import load_run_config, train

PROMPTS = {"asr": "Transcribe the audio.", "ser": "What emotion?"}
EXTRA = {"asr": ["What is said?", "Transcribe the audio.", "Type the words."]}


def test_each_task_draws_from_its_own_phrasings_canonical_first_without_repeats():
    choice = PromptChoice(PROMPTS, EXTRA)
    assert choice.phrasings == {"asr": ["Transcribe the audio.", "What is said?", "Type the words."],
                                "ser": ["What emotion?"]}
    ids = [f"utt{i}" for i in range(60)]
    drawn = choice.choose(["asr"] * 60, ids, stage="main", step=3)
    assert set(drawn) == set(choice.phrasings["asr"])  # all three within 60 draws
    assert max(drawn.count(p) for p in set(drawn)) < 40  # not stuck on one
    assert choice.choose(["ser"] * 5, ids[:5], stage="main", step=3) == ["What emotion?"] * 5


def test_the_draw_depends_on_item_and_step_not_on_batch_position_or_split():
    choice = PromptChoice(PROMPTS, EXTRA, seed=1)
    ids = [f"utt{i}" for i in range(16)]
    whole = choice.choose(["asr"] * 16, ids, stage="main", step=7)
    # two ranks holding halves, in another order, draw the same phrasing per item
    halves = choice.choose(["asr"] * 8, ids[8:][::-1], stage="main", step=7)[::-1] + \
        choice.choose(["asr"] * 8, ids[:8], stage="main", step=7)
    assert halves[8:] + halves[:8] == whole
    assert choice.choose(["asr"] * 16, ids, stage="main", step=7) == whole  # a resumed run repeats it
    later = [choice.choose(["asr"] * 16, ids, stage="main", step=s) for s in range(8, 12)]
    assert any(d != whole for d in later)  # and an item's phrasing changes from step to step
    assert PromptChoice(PROMPTS, EXTRA, seed=2).choose(["asr"] * 16, ids, stage="main", step=7) != whole


def test_batches_keep_their_prompts_unset_when_nothing_varies():
    batch = SpeechBatch(task="asr", tasks=["asr", "asr"], ids=["a", "b"], targets=["x", "y"])
    assert PromptChoice(PROMPTS, {})(batch, stage="main", step=0) is batch
    varied = PromptChoice(PROMPTS, EXTRA)(batch, stage="main", step=0)
    assert len(varied.prompts) == 2 and set(varied.prompts) <= set(PROMPTS.values()) | set(EXTRA["asr"])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['sr'\]"):
        PromptChoice(PROMPTS, {"sr": ["Feel."]})


def test_the_model_answers_the_batch_prompts():
    model = tiny_harmonifuse(seed=0)
    perturbed(model)
    torch.manual_seed(0)
    lengths = torch.tensor([16000, 9600])
    encoded = model.encode(torch.randn(2, 16000) * 0.1, lengths)
    batch = types.SimpleNamespace(hidden_states=encoded.hidden_states, frame_lengths=encoded.lengths,
                                  tasks=["asr", "asr"], targets=["hello world", "the lazy dog"], prompts=None)
    default = model(batch)
    assert torch.equal(default.loss, model(batch, prompts=model.prompts_for(batch.tasks)).loss)
    batch.prompts = ["Type the words.", "What is said?"]
    varied = model(batch)
    assert torch.equal(varied.loss, model(batch, prompts=batch.prompts).loss)
    assert not torch.allclose(varied.loss, default.loss)
    assert not torch.allclose(varied.layer_weights, default.layer_weights)


def test_both_training_stages_feed_every_phrasing_to_the_model(tmp_path, monkeypatch):
    config = load_run_config(write_tiny_run_config(
        tmp_path, train={"max_steps": 6, "eval_every": 1000, "save_every": 1000},
        align={"max_steps": 6, "eval_every": 1000},
        model={"tasks": {"train_prompts": {"asr": ["What is said?", "Type the words."]}}}))
    seen: dict[str, list] = {"answer": [], "align": []}  # both stages' steps go through forward (DDP's hooks)
    original = HarmoniFuse.forward

    def recording(self, batch, *args, objective="answer", **kwargs):
        seen[objective].append((batch.tasks, batch.prompts))
        return original(self, batch, *args, objective=objective, **kwargs)

    monkeypatch.setattr(HarmoniFuse, "forward", recording)
    train(config, progress=False)
    for stage, calls in seen.items():
        assert len(calls) == 6, stage
        asr = {p for tasks, prompts in calls for t, p in zip(tasks, prompts) if t == "asr"}
        ser = {p for tasks, prompts in calls for t, p in zip(tasks, prompts) if t == "ser"}
        assert asr == {"Transcribe the audio.", "What is said?", "Type the words."}, stage
        # the alignment stage here sees ASR only (model.ctc.tasks)
        assert ser == ({config.model.tasks.prompts["ser"]} if stage == "answer" else set()), stage


def test_evaluate_refuses_a_prompt_for_a_task_the_model_does_not_have():
    model = tiny_harmonifuse()
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['sr'\].*\['asr', 'ser'\]"):
        evaluate(model, {"asr": []}, prompts={"sr": "How does it sound?"}, progress=False)
    assert evaluate(model, {"asr": []}, prompts={"asr": "Type the words."}, progress=False)["metrics"] == {}
