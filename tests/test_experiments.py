"""The experiment runner end to end on tiny models: arms x seeds, table, plots, resume, bad specs."""
import json

import pytest
import yaml
from tiny import write_tiny_run_config

from harmonifuse.cli import main
from harmonifuse.config import ConfigError
from harmonifuse.experiments.runner import ExperimentInterrupted, ExperimentRunner
from harmonifuse.experiments.spec import arm_config, load_experiment


def write_spec(tmp_path, **changes):
    write_tiny_run_config(tmp_path, train={"max_steps": 4, "eval_every": 100, "save_every": 2})
    spec = {
        "name": "tinyexp", "base": "run.yaml", "overrides": ["data.dev={}"], "seeds": [0, 1],
        "runs_dir": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results"),
        "evaluation": {"split": "test", "limit": 4, "batch_size": 4,
                       "paraphrases": {"asr": "Write down what is said."}},
        "arms": [{"name": "naive", "label": "naive multi-task",
                  "overrides": ["model.fusion.mode=static", "model.gate.mode=none"]},
                 {"name": "single-ser", "label": "single-task SER",
                  "overrides": ["data.train={ser: ser_train.jsonl}"]}],
    }
    spec.update(changes)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_two_arms_two_seeds_table_plots_and_rerun_skips(tmp_path, capsys):
    path = write_spec(tmp_path)
    assert main(["experiment", str(path), "-q"]) == 0
    out_dir = tmp_path / "results" / "tinyexp"
    table = (out_dir / "table.md").read_text()
    assert "Runs finished: 4 of 4" in table and table in capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| arm")}
    naive, single = rows["naive multi-task"], rows["single-task SER"]
    assert naive[:2] == ["2/2", "4"] and single[:2] == ["2/2", "4"]
    assert "±" in naive[3] and "±" in naive[6]  # WER and UA, mean ± std over the two seeds
    assert single[3] == "–" and "±" in single[6]  # an SER-only model has no WER
    assert "| ASR label answers |" in table and "±" in naive[8] and single[8] == "–"  # task confusion
    assert "*naive multi-task, paraphrased prompts*" in rows and "±" in rows["*naive multi-task, paraphrased prompts*"][3]
    assert "*single-task SER, paraphrased prompts*" not in rows  # no SER paraphrase in this spec
    for png in ("metrics_per_arm.png", "layer_weights.png"):
        assert (out_dir / png).read_bytes()[:4] == b"\x89PNG"

    naive0 = json.loads((out_dir / "runs" / "naive" / "seed0.json").read_text())
    single0 = json.loads((out_dir / "runs" / "single-ser" / "seed0.json").read_text())
    assert naive0["evaluated"] == {"asr": 4, "ser": 4} and single0["evaluated"] == {"ser": 4}
    assert set(single0["profiles"]) == {"ser"}
    # static fusion: both tasks read the very same layer mixture; no gate reported without a gate
    assert naive0["profiles"]["asr"]["layer_weights"] == pytest.approx(naive0["profiles"]["ser"]["layer_weights"])
    assert "gate_mean" not in naive0["profiles"]["asr"] and "gate_mean" in single0["profiles"]["ser"]
    # what trained each run is recorded and shown: minutes and numerics depend on it
    assert naive0["precision"] == "float32" and naive0["hardware"].endswith(", 1 threads")
    assert f"Trained on: {naive0['hardware']}, float32 (seeds 0, 1)." in table
    seed1 = json.loads((out_dir / "runs" / "naive" / "seed1.json").read_text())
    assert seed1["profiles"]["asr"]["layer_weights"] != pytest.approx(naive0["profiles"]["asr"]["layer_weights"])
    run_dir = tmp_path / "runs" / "tinyexp" / "naive" / "seed0"
    assert (run_dir / "best" / "trained.safetensors").is_file() and not (run_dir / "checkpoints").exists()

    # a rerun trains nothing and leaves the results alone
    spec, base = load_experiment(path)
    calls = []
    before = (out_dir / "runs" / "naive" / "seed0.json").stat().st_mtime_ns
    ExperimentRunner(spec, base, progress=False, train_fn=lambda *a, **k: calls.append(a)).run()
    assert calls == [] and (out_dir / "runs" / "naive" / "seed0.json").stat().st_mtime_ns == before


def test_a_ctc_scored_experiment_compares_front_ends_trained_by_the_alignment_stage_alone(tmp_path):
    from harmonifuse.evaluation.evaluate import evaluate_ctc
    from harmonifuse.experiments.runner import evaluation_utterances
    from harmonifuse.model import HarmoniFuse

    paraphrases = {"asr": "Write down what is said.", "ser": "Which feeling is this?"}
    path = write_spec(
        tmp_path, seeds=[0],
        overrides=["data.dev={}", "train.max_steps=0", "align.max_steps=6", "align.batch_size=4",
                   "model.ctc.loss_weight=0.3", "model.ctc.tasks=[asr, ser]"],
        evaluation={"split": "test", "limit": 4, "batch_size": 4, "scorer": "ctc", "paraphrases": paraphrases},
        arms=[{"name": "harmonifuse"},
              {"name": "mixed", "overrides": ["data.schedule=mixed"]},  # batches of both tasks at once
              {"name": "single-ser", "overrides": ["data.train={ser: ser_train.jsonl}",
                                                   "model.ctc.tasks=[ser]"]}])
    assert main(["experiment", str(path), "-q"]) == 0
    out_dir = tmp_path / "results" / "tinyexp"
    table = (out_dir / "table.md").read_text()
    assert "through the projector's embedding-CTC head, without the LLM" in table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| arm")}
    assert all(rows[arm][1] == "6 + 0" for arm in ("harmonifuse", "mixed", "single-ser"))  # alignment steps only
    run = json.loads((out_dir / "runs" / "harmonifuse" / "seed0.json").read_text())
    assert {"wer", "cer", "label_answers", "wa", "ua", "macro_f1"} <= set(run["metrics"])
    assert {"wer", "ua"} <= set(run["paraphrase_metrics"])
    single = json.loads((out_dir / "runs" / "single-ser" / "seed0.json").read_text())
    assert "wer" not in single["metrics"] and "ua" in single["metrics"]

    # the paraphrase row is the CTC scoring of the saved front end under the paraphrased prompts
    spec, base = load_experiment(path)
    config = arm_config(spec, base, spec.arms[0], 0)
    model = HarmoniFuse.from_pretrained(run["model"]).eval()
    seen = []
    embed = model.speech_embeddings
    model.speech_embeddings = lambda h, n, tasks, prompts, **kw: seen.append(set(prompts)) or embed(h, n, tasks,
                                                                                                  prompts, **kw)
    again = evaluate_ctc(model, evaluation_utterances(config, spec.evaluation), batch_size=4, cache=None,
                         prompts=paraphrases, progress=False)["metrics"]
    assert {p for s in seen for p in s} == set(paraphrases.values())
    assert {k: again[k] for k in ("wer", "cer", "ua")} == pytest.approx(
        {k: run["paraphrase_metrics"][k] for k in ("wer", "cer", "ua")})


def test_runs_from_different_machines_are_listed_apart(tmp_path):
    from harmonifuse.experiments.tables import _hardware_lines, table_markdown

    cpu = {"hardware": "CPU X, AVX2, 2 threads", "precision": "float32"}
    run = {"steps": 4, "eval_minutes": 0.1, "metrics": {"ua": 0.5}}
    runs = {"naive": [{**run, "seed": 0, "train_minutes": 1.0},
                      {**run, "seed": 1, "train_minutes": 3.0, **cpu}],
            "single-ser": [{**run, "seed": 0, "train_minutes": 2.0, **cpu},
                           {**run, "seed": 1, "train_minutes": 4.0, **cpu}]}
    assert _hardware_lines(runs) == [
        "Trained on: CPU X, AVX2, 2 threads, float32 (seeds 0, 1); not recorded (seeds 0)."]
    assert _hardware_lines({"naive": []}) == []
    spec, _ = load_experiment(write_spec(tmp_path))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table_markdown(spec, runs).splitlines() if line.startswith(("| naive", "| single"))}
    assert rows["naive multi-task"][2] == "1.0-3.0"  # two machines: the range, not a mean of neither
    assert rows["single-task SER"][2] == "3.0"
    assert rows["naive multi-task"][1] == "4" and rows["single-task SER"][1] == "4"
    # runs with an alignment stage show its steps before the main steps
    runs["naive"] = [{**r, "align_steps": 250} for r in runs["naive"]]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table_markdown(spec, runs).splitlines() if line.startswith("| naive")}
    assert rows["naive multi-task"][1] == "250 + 4"


def test_interrupted_run_writes_no_result_and_resumes_from_its_checkpoint(tmp_path):
    path = write_spec(tmp_path, seeds=[0])
    spec, base = load_experiment(path)
    seen = []

    def stopped(config, resume, progress):
        seen.append((config.train.output_dir, config.train.seed, resume))
        return {"stop_reason": "signal 15", "steps": 2, "minutes": 0.1}

    runner = ExperimentRunner(spec, base, progress=False, train_fn=stopped)
    with pytest.raises(ExperimentInterrupted, match="naive seed 0 stopped .signal 15. at step 2"):
        runner.run()
    assert seen == [(str(tmp_path / "runs" / "tinyexp" / "naive" / "seed0"), 0, True)]
    assert not (tmp_path / "results" / "tinyexp" / "runs").exists()


def test_arm_configs_and_bad_specs(tmp_path):
    path = write_spec(tmp_path)
    spec, base = load_experiment(path)
    single = arm_config(spec, base, spec.arms[1], seed=7)
    assert single.data.train == {"ser": "ser_train.jsonl"} and single.data.dev == {}
    assert single.train.seed == 7 and single.train.output_dir.endswith("tinyexp/single-ser/seed7")
    assert single.train.max_steps == 4  # from the base config

    bad = write_spec(tmp_path, arms=[{"name": "a b"}])
    with pytest.raises(ConfigError, match=r"'arms\[0\].name'.*names a folder"):
        load_experiment(bad)
    bad = write_spec(tmp_path, arms=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ConfigError, match="repeated names"):
        load_experiment(bad)
    bad = write_spec(tmp_path, base="missing.yaml")
    with pytest.raises(ConfigError, match="missing.yaml not found"):
        load_experiment(bad)
    bad = write_spec(tmp_path, arms=[{"name": "x", "overrides": ["model.gate.mode=sometimes"]}])
    spec, base = load_experiment(bad)
    with pytest.raises(ConfigError, match="arm 'x'.*'model.gate.mode'"):
        arm_config(spec, base, spec.arms[0], 0)
    with pytest.raises(SystemExit, match=r"unknown arm\(s\) \['nope'\]"):
        main(["experiment", str(path), "--arms", "nope", "--report-only"])


@pytest.mark.parametrize("name", ["quick", "main", "aligned"])
def test_shipped_experiments_resolve_every_arm(name):
    from pathlib import Path

    spec, base = load_experiment(Path(__file__).parents[1] / "configs" / "experiments" / f"{name}.yaml")
    assert len(spec.seeds) >= 3
    configs = {arm.name: arm_config(spec, base, arm, 0) for arm in spec.arms}
    assert configs["harmonifuse"].model.fusion.mode == "prompt" and configs["harmonifuse"].model.gate.mode == "content"
    assert configs["naive"].model.fusion.mode == "static" and configs["naive"].model.gate.mode == "none"
    assert all(c.data.dev == {} and c.train.max_steps == configs["naive"].train.max_steps for c in configs.values())
    # each keeps the recipe its results were measured with: run D's (quick, main), run F's (aligned)
    assert all(c.align.max_steps == (250 if name == "aligned" else 0) for c in configs.values())
    assert all(c.model.projector.match_embedding_norm == (name == "aligned") for c in configs.values())
    assert all(c.model.feature_masking.time_masks == (2 if name == "aligned" else 0) for c in configs.values())
    # the default-size corpus and ASR-only CTC, as when their runs were measured
    assert all(c.data.root == "data/synthetic" and c.data.synthetic_size == "default"
               and c.data.synthetic_voices == "standard" for c in configs.values())
    assert all(c.model.ctc.tasks == ["asr"] for c in configs.values())
    assert all(c.optim.lora_lr == 5.0e-4 for c in configs.values())
    if name == "main":
        assert set(configs["single-asr"].data.train) == {"asr"} and set(configs["single-ser"].data.train) == {"ser"}
        assert configs["mixed-batches"].data.schedule == "mixed"
        assert configs["task-fusion"].model.fusion.mode == "task"
        assert configs["harmonifuse-10"].data.fraction == {"asr": 0.1}


def test_the_shipped_recipe_experiment_trains_the_frozen_recipe_the_shipped_model_started_from():
    from pathlib import Path

    from harmonifuse.config import load_config
    from harmonifuse.config.run import RunConfig

    root = Path(__file__).parents[1] / "configs"
    spec, base = load_experiment(root / "experiments" / "shipped.yaml")
    assert len(spec.seeds) >= 3 and spec.keep_checkpoints and spec.evaluation.limit == 0
    for seed in spec.seeds:
        out = f"train.output_dir=runs/experiments/shipped/harmonifuse/seed{seed}"
        shipped = load_config(RunConfig, root / "recipes" / "wide-voices.yaml", [f"train.seed={seed}", out])
        arms = {arm.name: arm_config(spec, base, arm, seed) for arm in spec.arms}
        assert arms["harmonifuse"] == shipped
        naive = arms["naive"]
        assert (naive.model.fusion.mode, naive.model.gate.mode, naive.model.tasks.train_prompts) == ("static", "none", {})
        assert shipped.model.tasks.train_prompts  # so the naive arm's one prompt per task is a real difference
        # nothing else differs: the same data, budget, encoder training and seed
        assert (naive.data, naive.train.max_steps, naive.align, naive.optim, naive.model.encoder) == (
            shipped.data, shipped.train.max_steps, shipped.align, shipped.optim, shipped.model.encoder)


def test_the_frontend_experiment_trains_every_arm_by_the_alignment_stage_alone():
    from pathlib import Path

    from harmonifuse.config import load_config
    from harmonifuse.config.run import RunConfig

    root = Path(__file__).parents[1] / "configs"
    spec, base = load_experiment(root / "experiments" / "frontend.yaml")
    assert len(spec.seeds) >= 3 and spec.evaluation.scorer == "ctc" and spec.evaluation.paraphrases
    configs = {arm.name: arm_config(spec, base, arm, 0) for arm in spec.arms}
    assert {"single-asr", "single-ser", "naive", "harmonifuse", "no-gate", "static-fusion", "task-fusion",
            "mixed-batches", "harmonifuse-10", "naive-25"} <= set(configs)
    for name, c in configs.items():
        assert (c.train.max_steps, c.align.max_minutes, c.model.encoder.trainable) == (0, 0, False), name
        assert c.align.max_steps == configs["harmonifuse"].align.max_steps > 0, name
        # the alignment stage trains on exactly the arm's tasks
        assert sorted(c.model.ctc.tasks) == sorted(c.data.train), name
    # the HarmoniFuse arm is demo.yaml's model and data; only the shared stage budget differs
    shipped = load_config(RunConfig, root / "recipes" / "wide-voices.yaml", ["model.encoder.trainable=false"])
    assert configs["harmonifuse"].model == shipped.model and configs["harmonifuse"].data.train == shipped.data.train
    assert configs["naive"].model.fusion.mode == "static" and configs["naive"].model.gate.mode == "none"
    assert configs["task-fusion"].model.fusion.mode == "task" and configs["mixed-batches"].data.schedule == "mixed"
    assert configs["harmonifuse-10"].data.fraction == {"asr": 0.1} and configs["naive-25"].data.fraction == {"asr": 0.25}
