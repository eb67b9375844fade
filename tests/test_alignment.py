"""The embedding-CTC head and the alignment stage (CTC alone, before the LLM takes part)."""
import json
import math
import types

import pytest
import torch
from conftest import run_cli, torchrun
from safetensors.torch import load_file
from test_training import _final_weights, kill_and_resume
from tiny import tiny_harmonifuse, write_tiny_run_config

from harmonifuse.config import ConfigError
from ctc_oracle import embedding_ctc_loss

from harmonifuse.modules.ctc import EmbeddingCTC
from harmonifuse.training.run import load_run_config, train

CTC_SETTINGS = {"loss_weight": 0.3, "learn_scale": True, "learned_blank": True, "scale": 4.0, "tasks": ["asr"]}
MATCHED = {"match_embedding_norm": True}
CTC_MODEL = {"projector": {"stack": 2, "hidden_size": 24, **MATCHED}, "ctc": CTC_SETTINGS}  # a tiny run's model section


def test_greedy_decode_merges_repeats_and_drops_blanks_up_to_the_length():
    table = torch.eye(6)  # token t is the direction e_t; token 0 is the blank
    speech = table[[3, 3, 0, 4, 4, 3, 5]][None] * 2.0  # the last position lies beyond the length
    head = EmbeddingCTC()  # fixed scale, the blank a token of the table
    assert head.decode(speech, torch.tensor([6]), table, blank=0) == [[3, 4, 3]]
    # a blank between two equal tokens keeps both
    speech = table[[3, 0, 3]][None]
    assert head.decode(speech, torch.tensor([3]), table, blank=0) == [[3, 3]]


def test_learned_blank_is_an_extra_class_outside_the_vocabulary():
    torch.manual_seed(0)
    table = torch.randn(7, 4)
    head = EmbeddingCTC(init_scale=3.0, learn_scale=True, blank_size=4)
    with torch.no_grad():
        head.blank_vector.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    speech, lengths, targets = torch.randn(2, 6, 4), torch.tensor([6, 4]), [[1, 2], [5]]
    expected = embedding_ctc_loss(speech, lengths, targets, torch.cat([table, head.blank_vector[None]]), blank=7,
                                  scale=3.0)
    assert float(head(speech, lengths, targets, table, blank=0)) == pytest.approx(float(expected), rel=1e-5)
    # positions on the blank vector decode to nothing; token 0 is an ordinary token here
    speech = torch.stack([head.blank_vector.detach(), table[0] * 9, head.blank_vector.detach()])[None]
    assert head.decode(speech, torch.tensor([3]), table, blank=0) == [[0]]
    assert float(head.scale) == pytest.approx(3.0)
    assert {name for name, _ in head.named_parameters()} == {"log_scale", "blank_vector"}


def test_a_fixed_scale_and_token_blank_add_no_trained_parameters():
    plain = tiny_harmonifuse(seed=0)
    assert not any(name.startswith("ctc.") for name in plain.trained_state_dict())
    learned = tiny_harmonifuse(seed=0, projector=MATCHED, ctc=CTC_SETTINGS)
    assert {n for n in learned.trained_state_dict() if n.startswith("ctc.")} == {"ctc.log_scale", "ctc.blank_vector"}
    assert float(learned.ctc.log_scale) == pytest.approx(math.log(4.0))


def _asr_batch(model, tasks=("asr", "asr"), targets=("hello world", "the lazy dog")):
    torch.manual_seed(1)
    lengths = torch.tensor([16000, 9600])
    encoded = model.encode(torch.randn(2, 16000) * 0.1, lengths)
    return types.SimpleNamespace(hidden_states=encoded.hidden_states, frame_lengths=encoded.lengths,
                                 tasks=list(tasks), targets=list(targets))


def test_alignment_loss_trains_fusion_gate_projector_and_ctc_head_but_not_the_llm():
    model = tiny_harmonifuse(seed=0, projector=MATCHED, ctc=CTC_SETTINGS).train()
    out = model.alignment_loss(_asr_batch(model))
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(grads[n] is None for n in grads if n.startswith("llm."))  # no LLM pass at all
    for part in ("projector.", "fusion.", "gate.", "ctc.log_scale", "ctc.blank_vector"):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(part)), part
    assert out.num_tokens == len(model.llm.tokenize("hello world")) + len(model.llm.tokenize("the lazy dog"))
    with pytest.raises(ValueError, match=r"model.ctc.tasks \['asr'\] only, got tasks \['ser'\]"):
        model.alignment_loss(_asr_batch(model, tasks=("asr", "ser"), targets=("hello world", "sad")))


def test_with_ser_among_the_ctc_tasks_its_label_word_is_a_ctc_target_too():
    model = tiny_harmonifuse(seed=0, projector=MATCHED, ctc={**CTC_SETTINGS, "tasks": ["asr", "ser"]}).train()
    batch = _asr_batch(model, tasks=("asr", "ser"), targets=("hello world", "sad"))
    out = model.alignment_loss(batch)
    assert out.num_tokens == len(model.llm.tokenize("hello world")) + len(model.llm.tokenize("sad"))
    speech = model.speech_embeddings(batch.hidden_states, batch.frame_lengths, batch.tasks)
    table = model.llm.model.get_input_embeddings().weight
    expected = model.ctc(speech.ctc_input, speech.lengths, [model.llm.tokenize(t) for t in batch.targets], table,
                         blank=model.llm.ctc_blank_id)
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
    asr_only = tiny_harmonifuse(seed=0, projector=MATCHED, ctc=CTC_SETTINGS).train()  # same weights, SER left out
    expected_asr = asr_only.ctc(speech.ctc_input[:1], speech.lengths[:1], [model.llm.tokenize("hello world")],
                                table, blank=model.llm.ctc_blank_id)
    assert float(asr_only.train()(batch).ctc_loss) == pytest.approx(float(expected_asr), rel=1e-5)


def test_candidate_nll_is_each_whole_sequence_ctc_loss_and_infinite_when_it_cannot_fit():
    torch.manual_seed(0)
    table, head = torch.randn(6, 4), EmbeddingCTC(init_scale=2.0)
    speech, lengths = torch.randn(2, 5, 4), torch.tensor([5, 2])
    nll = head.candidate_nll(speech, lengths, [[1], [2, 3], [4, 4]], table, blank=0)
    assert nll.shape == (2, 3)
    log_probs = (2.0 * speech @ table.T).log_softmax(-1)
    for b in range(2):
        for k, ids in enumerate([[1], [2, 3], [4, 4]]):
            expected = torch.nn.functional.ctc_loss(log_probs[b, : lengths[b]][:, None], torch.tensor([ids]),
                                                    lengths[b:b + 1], torch.tensor([len(ids)]), blank=0,
                                                    reduction="sum")
            if b == 1 and k == 2:  # "4 4" needs a blank between the repeats: 3 positions, the item has 2
                assert math.isinf(float(nll[b, k]))
            else:
                assert float(nll[b, k]) == pytest.approx(float(expected), rel=1e-5)


def test_ctc_transcripts_read_back_what_the_projector_puts_on_token_embeddings():
    model = tiny_harmonifuse(seed=0, projector=MATCHED, ctc=CTC_SETTINGS).eval()
    ids = model.llm.tokenize("hello world")
    table = model.llm.model.get_input_embeddings().weight
    with torch.no_grad():  # the words' tokens on orthogonal directions, every other token near zero
        table.mul_(0.01)
        for k, i in enumerate(sorted(set(ids))):
            table[i] = torch.nn.functional.one_hot(torch.tensor(k), table.shape[1]).float()
    table = table.detach()
    with torch.no_grad():
        model.ctc.blank_vector.fill_(-1.0)
    blank = model.ctc.blank_vector.detach()
    # a projector that emits each token twice, blanks between them ("hello" has a double "l")
    rows = [blank] + [row for i in ids for row in (table[i] * 5, table[i] * 5, blank)]
    speech = torch.stack(rows)[None]
    model.speech_embeddings = lambda hidden, lengths, tasks, prompts: types.SimpleNamespace(
        ctc_input=speech, lengths=torch.tensor([speech.shape[1]]))
    assert model.ctc_transcribe_hidden(torch.zeros(1, 1, 1, 1), torch.tensor([1])) == ["hello world"]
    # closed-set scoring: of the emotion labels, the one whose tokens the projector spells wins
    labels = model.config.tasks.emotion_labels
    spelled = [label for label in labels if set(model.llm.tokenize(label)) <= set(ids)]
    assert not spelled  # none of them is "hello world": the scores are a distribution, nothing sure
    probs = model.ctc_classify_hidden(torch.zeros(1, 1, 1, 1), torch.tensor([1]))
    assert sorted(probs[0]) == sorted(labels) and sum(probs[0].values()) == pytest.approx(1.0)
    word = model.llm.tokenize(labels[2])
    with torch.no_grad():
        for k, i in enumerate(sorted(set(word))):
            table[i] = torch.nn.functional.one_hot(torch.tensor(k + 4), table.shape[1]).float()
    speech = torch.stack([blank] + [row for i in word for row in (table[i] * 5, blank)])[None]
    probs = model.ctc_classify_hidden(torch.zeros(1, 1, 1, 1), torch.tensor([1]))
    assert max(probs[0], key=probs[0].get) == labels[2] and probs[0][labels[2]] > 0.9


@pytest.fixture(scope="module")
def aligned_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    path = write_tiny_run_config(root, align={"max_steps": 60, "eval_every": 30, "batch_size": 4, "lr": 1e-2,
                                              "warmup_steps": 0},
                                 model=CTC_MODEL,
                                 train={"max_steps": 6, "eval_every": 6, "save_every": 3, "keep_last": 10})
    summary = train(load_run_config(path), progress=False)
    return root, summary


def test_alignment_stage_lowers_ctc_loss_before_the_main_stage(aligned_run):
    root, summary = aligned_run
    records = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.index("train") > max(i for i, k in enumerate(kinds) if k.startswith("align"))  # stage 1 first
    align = [r for r in records if r["kind"] == "align"]
    assert [r["step"] for r in align] == list(range(1, 61))
    first, last = sum(r["loss_ctc"] for r in align[:5]) / 5, sum(r["loss_ctc"] for r in align[-5:]) / 5
    assert last < 0.5 * first
    assert align[-1]["ctc_scale"] != pytest.approx(4.0)  # the scale is learned
    dev = [r for r in records if r["kind"] == "align_dev"]
    assert [r["step"] for r in dev] == [30, 60] and all("wer" in r and "cer" in r for r in dev)
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert summary["align_steps"] == 60 and summary["steps"] == 6
    assert summary["minutes"] >= summary["align_minutes"] > 0
    # minutes run on across the two stages, so the training curves can share one axis
    minutes = [r["minutes"] for r in records if "minutes" in r and r["kind"] in ("align", "train")]
    assert minutes == sorted(minutes)
    from harmonifuse.evaluation.plots import plot_training_curves

    assert plot_training_curves(root / "run" / "log.jsonl", root / "curves.png").stat().st_size > 10_000


def test_an_alignment_stage_over_both_tasks_interleaves_them_and_scores_ser_by_its_labels(tmp_path):
    path = write_tiny_run_config(tmp_path, align={"max_steps": 6, "eval_every": 6, "batch_size": 4},
                                 model={"projector": {"stack": 2, "hidden_size": 24, **MATCHED},
                                        "ctc": {**CTC_SETTINGS, "tasks": ["asr", "ser"]}},
                                 train={"max_steps": 2, "eval_every": 1000, "save_every": 1000})
    train(load_run_config(path), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {t for r in records if r["kind"] == "align" for t in r["tasks"]} == {"asr", "ser"}
    (dev,) = [r for r in records if r["kind"] == "align_dev"]
    assert {"wer", "cer", "wa", "ua", "macro_f1"} <= set(dev) and 0 <= dev["ua"] <= 1


def test_the_alignment_stage_alone_trains_the_front_end_and_exports_it(tmp_path):
    path = write_tiny_run_config(tmp_path, align={"max_steps": 40, "eval_every": 40, "batch_size": 4, "lr": 1e-2,
                                                  "warmup_steps": 0},
                                 model=CTC_MODEL,
                                 train={"max_steps": 0, "eval_every": 5, "save_every": 25})
    summary = train(load_run_config(path), progress=False)
    assert (summary["steps"], summary["align_steps"], summary["stop_reason"]) == (0, 40, "max_steps")
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["kind"] in ("train", "dev")]  # no LLM step, no LLM scoring
    align = [r for r in records if r["kind"] == "align"]
    assert sum(r["loss_ctc"] for r in align[-5:]) < 0.5 * sum(r["loss_ctc"] for r in align[:5])
    # the exported model is the last alignment step's, and the final checkpoint holds it for --resume
    best = load_file(str(tmp_path / "run" / "best" / "trained.safetensors"))
    last = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000040" / "trained.safetensors"))
    assert best.keys() == last.keys() and all(torch.equal(best[k], last[k]) for k in best)
    with pytest.raises(ConfigError, match="train.max_steps.*align.max_steps"):
        load_run_config(path, ["align.max_steps=0"])


def test_alignment_stage_leaves_the_lora_adapters_untouched(aligned_run):
    root, _ = aligned_run
    from harmonifuse.model import HarmoniFuse
    from harmonifuse.training.run import seed_everything

    seed_everything(0)  # as train() does before building: the same initial LoRA weights
    fresh = HarmoniFuse.build(load_run_config(str(root / "run.yaml")).model).trained_state_dict()
    after_align = load_file(str(root / "run" / "checkpoints" / "step_0000060" / "trained.safetensors"))
    after_main = load_file(str(root / "run" / "checkpoints" / "step_0000066" / "trained.safetensors"))
    lora = [name for name in fresh if "lora_" in name]
    assert lora and all(torch.equal(after_align[n], fresh[n]) for n in lora)
    assert any(not torch.equal(after_main[n], fresh[n]) for n in lora)
    assert not torch.equal(after_align["projector.mlp.0.weight"], fresh["projector.mlp.0.weight"])


def test_an_unfrozen_encoder_learns_in_the_alignment_stage_and_the_lora_adapters_do_not(tmp_path):
    import yaml

    from harmonifuse.model import HarmoniFuse
    from harmonifuse.training.run import seed_everything

    path = write_tiny_run_config(tmp_path, align={"max_steps": 4, "batch_size": 4, "eval_every": 1000},
                                 train={"max_steps": 1, "save_every": 1000, "eval_every": 1000})
    config = yaml.safe_load(path.read_text())
    config["model"]["encoder"]["trainable"] = True
    path.write_text(yaml.safe_dump(config))
    train(load_run_config(path), progress=False)
    seed_everything(0)
    fresh = HarmoniFuse.build(load_run_config(str(path)).model).trained_state_dict()
    after_align = load_file(str(tmp_path / "run" / "checkpoints" / "step_0000004" / "trained.safetensors"))
    encoder = [name for name in fresh if name.startswith("encoder.")]
    lora = [name for name in fresh if "lora_" in name]
    assert encoder and lora and set(after_align) == set(fresh)
    assert any(not torch.equal(after_align[n], fresh[n]) for n in encoder)
    assert all(torch.equal(after_align[n], fresh[n]) for n in lora)


@pytest.mark.multiprocess
def test_kill_during_alignment_then_resume_equals_uninterrupted_run(tmp_path):
    config_path = write_tiny_run_config(tmp_path, align={"max_steps": 30, "batch_size": 4, "eval_every": 1000},
                                        model=CTC_MODEL,
                                        train={"max_steps": 4, "save_every": 2, "eval_every": 1000})
    a, b, at_kill = kill_and_resume(config_path, tmp_path, "step_0000006", poll=0.02)
    assert "step_0000030" not in at_kill, "killed after the alignment stage"
    assert a.keys() == b.keys() and "ctc.log_scale" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.multiprocess
def test_alignment_under_ddp_equals_one_process_with_the_global_batch(tmp_path):
    config_path = write_tiny_run_config(tmp_path, align={"max_steps": 4, "batch_size": 4, "eval_every": 1000},
                                        model=CTC_MODEL,
                                        train={"max_steps": 2, "save_every": 2, "eval_every": 1000})
    single = load_run_config(config_path, [f"train.output_dir={tmp_path / 'single'}", "data.batch_size=4"])
    train(single, progress=False)
    result = torchrun(2, "-m", "harmonifuse.cli", "train", config_path, f"train.output_dir={tmp_path / 'ddp'}",
                      "data.batch_size=2", "align.batch_size=2", "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _final_weights(tmp_path / "single"), _final_weights(tmp_path / "ddp")
    assert "ctc.blank_vector" in a
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-5, rtol=1e-4), (name, (a[name] - b[name]).abs().max())
    records = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "align"] == [1, 2, 3, 4]


@pytest.mark.multiprocess
def test_resume_with_a_config_that_changes_the_stages_is_refused(tmp_path):
    config_path = write_tiny_run_config(tmp_path, train={"max_steps": 2, "save_every": 2, "eval_every": 1000})
    assert run_cli("train", str(config_path), "-q").returncode == 0
    result = run_cli("train", str(config_path), "align.max_steps=5", "train.max_steps=4", "--resume", "-q")
    assert result.returncode != 0 and "alignment stage" in result.stderr and "align.max_steps" in result.stderr


def test_bad_alignment_settings_name_the_field(tmp_path):
    config_path = write_tiny_run_config(tmp_path)
    with pytest.raises(ConfigError, match="align.batch_size"):
        load_run_config(config_path, ["align.batch_size=0"])
    with pytest.raises(ConfigError, match="align.max_steps"):
        load_run_config(config_path, ["align.max_steps=-1"])
    with pytest.raises(ConfigError, match="model.ctc.scale"):
        load_run_config(config_path, ["model.ctc.scale=0"])
    with pytest.raises(ConfigError, match="model.ctc.tasks"):
        load_run_config(config_path, ["model.ctc.tasks=[asr, speaker]"])
    no_asr = load_run_config(config_path, ["align.max_steps=5", "data.train={ser: ser_train.jsonl}"])
    with pytest.raises(ValueError, match=r"no manifest for \['asr'\].*align.max_steps=0"):
        train(no_asr, progress=False)
