"""The trainer end to end on tiny models: learning, kill-and-resume, DDP equivalence, the CLI."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import ENV, run_cli, torchrun
from tiny import tiny_harmonifuse, write_tiny_run_config

from harmonifuse.training.run import load_run_config, train



def _final_weights(run_dir: Path) -> dict:
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    return load_file(str(checkpoints[-1] / "trained.safetensors"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    config = load_run_config(write_tiny_run_config(root, train={"max_steps": 120, "eval_every": 60}))
    summary = train(config, progress=False)
    return root, summary


def test_loss_falls_and_dev_metrics_improve(trained_run):
    root, summary = trained_run
    records = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    ser = [r["loss_ser"] for r in records if "loss_ser" in r]
    assert sum(ser[-5:]) / 5 < 0.3 * sum(ser[:5]) / 5
    dev = [r for r in records if r["kind"] == "dev"]
    assert [r["step"] for r in dev] == [60, 120]
    assert dev[-1]["ua"] == 1.0 and dev[-1]["wer"] < 1.0
    assert summary["steps"] == 120 and summary["best_step"] == 120
    # the log carries what each task reads and how it is gated
    assert any("layer_weights_asr" in r for r in records) and any("gate_mean_ser" in r for r in records)
    assert (root / "run" / "best" / "trained.safetensors").is_file()


def kill_and_resume(config_path: Path, root: Path, kill_at: str, poll: float = 0.05):
    """Train ``config_path`` uninterrupted, and again in a subprocess SIGKILLed as soon as checkpoint
    ``kill_at`` is complete, then resumed; -> (reference weights, resumed weights, checkpoints at the kill)."""
    train(load_run_config(config_path, [f"train.output_dir={root / 'reference'}"]), progress=False)
    killed_dir = root / "killed"
    args = [sys.executable, "-m", "harmonifuse.cli", "train", str(config_path), f"train.output_dir={killed_dir}", "-q"]
    process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed_dir / "checkpoints" / kill_at / "done.json").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(poll)
    process.send_signal(signal.SIGKILL)
    process.wait()
    at_kill = sorted(p.name for p in (killed_dir / "checkpoints").glob("step_*"))
    resumed = run_cli("train", str(config_path), f"train.output_dir={killed_dir}", "--resume", "-q")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return _final_weights(root / "reference"), _final_weights(killed_dir), at_kill


@pytest.mark.multiprocess
def test_kill_then_resume_equals_uninterrupted_run(tmp_path):
    settings = {"max_steps": 24, "save_every": 2, "eval_every": 1000}
    config_path = write_tiny_run_config(tmp_path, train=settings)
    a, b, at_kill = kill_and_resume(config_path, tmp_path, "step_0000008")
    assert "step_0000024" not in at_kill
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.multiprocess
def test_ddp_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    settings = {"max_steps": 4, "save_every": 4, "eval_every": 1000}
    config_path = write_tiny_run_config(tmp_path, train=settings)
    single = load_run_config(config_path, [f"train.output_dir={tmp_path / 'single'}", "data.batch_size=4"])
    train(single, progress=False)
    result = torchrun(2, "-m", "harmonifuse.cli", "train", config_path, f"train.output_dir={tmp_path / 'ddp'}",
                      "data.batch_size=2", "-q")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _final_weights(tmp_path / "single"), _final_weights(tmp_path / "ddp")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=2e-5, rtol=1e-4), (name, (a[name] - b[name]).abs().max())
    # one writer: rank 0's log only, one line per step
    records = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]


@pytest.mark.multiprocess
def test_cli_evaluate_and_analyze_on_the_trained_tiny_model(trained_run, tmp_path):
    root, _ = trained_run
    model_dir = root / "run" / "best"
    manifest = root / "corpus" / "ser_test.jsonl"
    result = run_cli("evaluate", "--model", str(model_dir), "--manifest", str(root / "corpus" / "asr_test.jsonl"),
                  "--manifest", str(manifest), "--json", "--out", str(tmp_path / "report"),
                  "--log", str(root / "run" / "log.jsonl"), "-q")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"wer", "cer", "wa", "ua", "macro_f1"} <= set(metrics)
    assert metrics["ua"] == 1.0
    for name in ("metrics.json", "summary.md", "confusion.png", "layer_weights_and_gates.png", "training_curves.png"):
        assert (tmp_path / "report" / name).is_file(), name
    assert "per_speaker" not in metrics  # the printed object stays flat; metrics.json has it
    per_speaker = json.loads((tmp_path / "report" / "metrics.json").read_text())["per_speaker"]
    assert sorted(per_speaker) == ["spk0", "spk1"] and all(s["n_asr"] == s["n_ser"] == 4 for s in per_speaker.values())
    assert "## Per speaker" in (tmp_path / "report" / "summary.md").read_text()

    # another ASR prompt: the layer weights and gates reported are the ones that prompt reads
    result = run_cli("evaluate", "--model", str(model_dir), "--manifest", str(root / "corpus" / "asr_test.jsonl"),
                  "--prompt", "asr=Write down what is said.", "--out", str(tmp_path / "paraphrased"), "-q")
    assert result.returncode == 0, result.stderr[-2000:]
    trained, paraphrased = (json.loads((tmp_path / d / "task_profiles.json").read_text())
                            for d in ("report", "paraphrased"))
    assert paraphrased["ser"] == trained["ser"]
    assert paraphrased["asr"]["layer_weights"] != pytest.approx(trained["asr"]["layer_weights"], abs=1e-6)

    clips = sorted((root / "corpus" / "audio").glob("ser_*.wav"))[:3]
    result = run_cli("analyze", *map(str, clips), "--model", str(model_dir), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [line["file"] for line in lines] == [str(c) for c in clips]
    assert all({"transcript", "emotion", "emotion_probs"} <= set(line) for line in lines)
    assert [line["emotion"] for line in lines] == ["neutral", "happy", "sad"]

    # batched by duration inside each window, printed in input order all the same
    result = run_cli("analyze", *map(str, clips[::-1]), "--model", str(model_dir), "--json", "--batch-size", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    reordered = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [line["file"] for line in reordered] == [str(c) for c in clips[::-1]]
    assert [line["emotion"] for line in reordered] == ["sad", "happy", "neutral"]
    result = run_cli("analyze", *map(str, clips), "--model", str(model_dir), "--batch-size", "0")
    assert result.returncode == 2 and "--batch-size" in result.stderr and "must be a whole number >= 1" in result.stderr

    # the LLM in bf16: same answers on this learned set, probabilities within bf16 rounding
    result = run_cli("analyze", *map(str, clips), "--model", str(model_dir), "--json", "--bf16")
    assert result.returncode == 0, result.stderr[-2000:]
    halves = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [h["emotion"] for h in halves] == ["neutral", "happy", "sad"]
    for half, full in zip(halves, lines):
        assert half["emotion_probs"] == pytest.approx(full["emotion_probs"], abs=0.05)


@pytest.mark.slow
def test_demo_evaluates_a_spread_out_subset_of_the_test_split(trained_run, tmp_path):
    root, _ = trained_run
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "harmonifuse.demo", "--model", str(root / "run" / "best"),
                             "--corpus", str(root / "corpus"), "--out", str(out), "--limit", "3",
                             "--real-speech", ""],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 utterances per task, a fixed spread-out subset" in result.stdout and "| ua |" in result.stdout
    assert "## Per test voice" in result.stdout and "| spk0 |" in result.stdout
    for task in ("asr", "ser"):
        ids = [json.loads(line)["id"] for line in (out / "limited" / f"{task}_test.jsonl").read_text().splitlines()]
        assert len(ids) == 3 and ids != [f"{task}_{i}" for i in range(3)]  # not simply the first three
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_ser"] == 3
    clips = json.loads((out / "nonspeech.json").read_text())  # shown first, then kept with the figures
    assert metrics["n_nonspeech"] == clips["n_nonspeech"] >= 20
    assert metrics["nonspeech_detected"] == clips["nonspeech_detected"]


@pytest.mark.multiprocess
def test_cli_reports_bad_config_values_by_field(tmp_path):
    config_path = write_tiny_run_config(tmp_path)
    result = run_cli("train", str(config_path), "model.fusion.mode=layerwise", "-q")
    assert result.returncode == 2
    assert "model.fusion.mode" in result.stderr and "'layerwise' is not one of" in result.stderr
    result = run_cli("train", str(config_path), "train.max_step=3", "-q")
    assert result.returncode == 2 and "train.max_step" in result.stderr


@pytest.mark.multiprocess
def test_cli_evaluate_refuses_malformed_prompts_and_unknown_tasks(trained_run):
    root, _ = trained_run
    common = ["evaluate", "--model", str(root / "run" / "best"), "--manifest", str(root / "corpus" / "asr_test.jsonl")]
    result = run_cli(*common, "--prompt", "Write down what is said.", "-q")
    assert result.returncode == 2 and "is not of the form task=TEXT" in result.stderr
    result = run_cli(*common, "--prompt", "sr=How does it sound?", "-q")
    assert result.returncode == 2 and "['sr']" in result.stderr and "['asr', 'ser']" in result.stderr


@pytest.mark.multiprocess
def test_cli_analyze_keeps_good_files_when_one_is_bad(trained_run, tmp_path):
    root, _ = trained_run
    good = sorted((root / "corpus" / "audio").glob("ser_*.wav"))[0]
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF0000WAVEnot really")
    result = run_cli("analyze", str(good), str(bad), "--model", str(root / "run" / "best"), "--json")
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert lines[0]["file"] == str(good) and "emotion" in lines[0]
    assert lines[1]["file"] == str(bad) and "broken.wav" in lines[1]["error"]
    result = run_cli("analyze", str(tmp_path / "absent.flac"), "--model", str(root / "run" / "best"))
    assert result.returncode == 1 and "absent.flac" in result.stdout


def test_bf16_training_with_frozen_weights_stored_in_bf16_is_bit_identical(tmp_path, monkeypatch):
    """Under bf16 autocast the trainer keeps frozen Linear weights in bf16: same numbers, fewer copies."""
    from harmonifuse.modules.llm import SpeechLLM

    runs = {}
    for name in ("stored", "cast_per_call"):
        if name == "cast_per_call":
            monkeypatch.setattr(SpeechLLM, "store_frozen_linears_in", lambda self, dtype: 0)
        path = write_tiny_run_config(tmp_path / name, train={"max_steps": 4, "eval_every": 100, "save_every": 4,
                                                            "precision": "bf16"},
                                     model={"prompt": {"vector": "hidden_state"}})
        config = load_run_config(str(path))
        from harmonifuse.model import HarmoniFuse

        model = HarmoniFuse.build(config.model)
        train(config, progress=False, model=model)
        linears = [m for m in model.llm.model.modules() if isinstance(m, torch.nn.Linear)]
        runs[name] = (_final_weights(Path(config.train.output_dir)),
                      {m.weight.dtype for m in linears if not m.weight.requires_grad})
    (stored, stored_dtypes), (reference, reference_dtypes) = runs["stored"], runs["cast_per_call"]
    assert torch.bfloat16 in stored_dtypes and reference_dtypes == {torch.float32}
    assert stored.keys() == reference.keys()
    for key in stored:
        assert torch.equal(stored[key], reference[key]), key


def test_attention_kernel_comes_from_the_config(tmp_path):
    from harmonifuse.model import HarmoniFuse

    config = load_run_config(str(write_tiny_run_config(tmp_path)), ["model.llm.attention=eager"])
    assert HarmoniFuse.build(config.model).llm.model.config._attn_implementation == "eager"
    config = load_run_config(str(write_tiny_run_config(tmp_path)))
    assert HarmoniFuse.build(config.model).llm.model.config._attn_implementation == "sdpa"


def test_a_missing_built_in_corpus_is_built_with_the_configured_size_and_voices(tmp_path, monkeypatch):
    from harmonifuse.config.run import DataConfig
    from harmonifuse.data import synthetic
    from harmonifuse.training.loaders import ensure_corpus

    calls = []

    def fake_prepare(out, **options):
        calls.append((Path(out), options))
        for name in ("asr_train.jsonl", "ser_train.jsonl"):
            (Path(out) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(out) / name).write_text("")

    monkeypatch.setattr(synthetic, "prepare", fake_prepare)
    config = DataConfig(root=str(tmp_path / "wide"), synthetic_size="large", synthetic_voices="wide")
    assert ensure_corpus(config, progress=False) == tmp_path / "wide"
    assert calls == [(tmp_path / "wide", {"size": "large", "voices": "wide", "progress": False})]
    assert ensure_corpus(config, progress=False) == tmp_path / "wide" and len(calls) == 1  # present: kept

    missing = DataConfig(root=str(tmp_path / "none"), build_synthetic=False)
    with pytest.raises(FileNotFoundError, match=r"asr_train.jsonl.*harmonifuse prepare"):
        ensure_corpus(missing, progress=False)


def test_parameter_groups_give_each_part_its_rate_in_both_stages():
    from harmonifuse.config.run import OptimConfig
    from harmonifuse.training.optim import parameter_groups

    model = tiny_harmonifuse()
    optim = OptimConfig(lr=1e-3, lora_lr=5e-4)
    groups = {g["name"]: g for g in parameter_groups(model, optim)}
    assert list(groups) == ["harmonifuse", "lora"]  # the tiny encoder is frozen; earlier checkpoints resume
    ours = {id(p) for name, p in model.named_parameters() if p.requires_grad and not name.startswith("llm.")}
    assert {id(p) for p in groups["harmonifuse"]["params"]} == ours
    assert {id(p) for p in model.fusion.parameters()} <= ours
    assert groups["harmonifuse"]["lr"] == pytest.approx(1e-3) and groups["lora"]["lr"] == pytest.approx(5e-4)
    # the alignment stage passes its own rate for the HarmoniFuse parts
    align = {g["name"]: g for g in parameter_groups(model, optim, lr=5e-3)}
    assert align["harmonifuse"]["lr"] == pytest.approx(5e-3) and align["lora"]["lr"] == pytest.approx(5e-4)


def test_a_warm_start_begins_from_the_named_model_and_resume_still_wins(trained_run, tmp_path):
    root, _ = trained_run
    source = load_file(str(root / "run" / "best" / "trained.safetensors"))
    # rates so small that one step leaves every weight where the warm start put it
    tiny_rates = ["optim.lr=1e-12", "optim.lora_lr=1e-12", "optim.encoder_lr=1e-12", "optim.warmup_steps=0",
                  "align.max_steps=0", "train.max_steps=1", "train.save_every=1", "train.eval_every=1000"]
    config_path = write_tiny_run_config(tmp_path, train={"max_steps": 1})
    warm = load_run_config(config_path, [*tiny_rates, f"train.output_dir={tmp_path / 'warm'}",
                                         f"train.init_from={root / 'run' / 'best'}"])
    cold = load_run_config(config_path, [*tiny_rates, f"train.output_dir={tmp_path / 'cold'}"])
    train(warm, progress=False)
    train(cold, progress=False)
    warm_weights, cold_weights = _final_weights(tmp_path / "warm"), _final_weights(tmp_path / "cold")
    assert warm_weights.keys() == source.keys()
    for name in source:
        assert torch.allclose(warm_weights[name], source[name], atol=1e-6), name
    assert any(not torch.allclose(cold_weights[n], source[n], atol=1e-3) for n in source)
    # --resume takes the run's own checkpoint, not the warm start
    resumed = load_run_config(config_path, [*tiny_rates[:-3], "train.max_steps=2", "train.save_every=1",
                                            "train.eval_every=1000", f"train.output_dir={tmp_path / 'cold'}",
                                            f"train.init_from={root / 'run' / 'best'}"])
    train(resumed, resume=True, progress=False)
    for name in source:
        assert torch.allclose(_final_weights(tmp_path / "cold")[name], cold_weights[name], atol=1e-6), name
