"""``train.parallel: fsdp`` (FSDP2, ``fully_shard``; gloo on the CPU here): the switch, what is sharded,
the same losses as DDP, checkpoints that resume under fsdp, ddp and on one process, dev evaluation
and the best-model export on a sharded model, and ranks that never run a different number of
forward passes (every forward of a sharded model is a collective)."""
import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import ENV, TORCHRUN
from tiny import tiny_harmonifuse, write_tiny_run_config

from harmonifuse.config import ConfigError, from_dict
from harmonifuse.config.run import TrainConfig
from harmonifuse.training.sharding import (DDPParallel, FSDPParallel, Parallel, _by_index, _by_name, decoder_layers,
                                           fsdp_plan, make_parallel)

CPU = torch.device("cpu")
try:  # FSDP2; probed on torch 2.13 (CPU build): trains, gathers and reshards on gloo
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    FSDP2 = True
except ImportError:
    FSDP2 = False
needs_fsdp2 = pytest.mark.skipif(not FSDP2, reason="this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
# the alignment stage (LoRA out of the graph, rank-0-only CTC scoring before) and the CTC in the main stage
# (the root unit's learned blank) both run under the sharded model
SETTINGS = ["model.ctc.loss_weight=0.3", "model.ctc.learned_blank=true", "align.max_steps=2",
            "align.eval_every=2", "align.batch_size=2"]


# -- one process: the switch, the plan, the checkpoint layout -----------------------------------------


def test_the_switch_defaults_to_ddp_and_names_the_field_when_wrong():
    assert TrainConfig().parallel == "ddp"
    assert from_dict(TrainConfig, {"parallel": "fsdp"}, "train").parallel == "fsdp"
    for bad in ("zero3", "FSDP", "", 1):
        with pytest.raises(ConfigError, match=r"config field 'train.parallel': .* is not one of \['ddp', 'fsdp'\]"):
            from_dict(TrainConfig, {"parallel": bad}, "train")
    with pytest.raises(ValueError, match=r"train.parallel must be one of ddp, fsdp, got 'zero3'"):
        make_parallel("zero3", 2, CPU, unused_parameters=False)


def test_a_learned_ctc_scale_is_refused_under_fsdp_by_its_field():
    """FSDP2 shards every parameter along a dimension; the learned CTC scale is a scalar."""
    from harmonifuse.config.run import RunConfig

    from_dict(RunConfig, {"train": {"parallel": "ddp"}, "model": {"ctc": {"learn_scale": True}}})
    with pytest.raises(ConfigError, match=r"'model.ctc.learn_scale': is true and train.parallel is fsdp"):
        from_dict(RunConfig, {"train": {"parallel": "fsdp"}, "model": {"ctc": {"learn_scale": True}}})
    model = tiny_harmonifuse(ctc={"learn_scale": True})
    with pytest.raises(ValueError, match=r"cannot shard a scalar parameter, and ctc.log_scale is one that trains"):
        fsdp_plan(model)
    with pytest.raises(ValueError, match=r"ctc.log_scale"):  # before any process group is needed
        FSDPParallel(CPU).wrap(model)


def test_one_process_needs_no_wrapper_and_several_get_the_named_strategy():
    assert type(make_parallel("fsdp", 1, CPU, unused_parameters=False)) is Parallel
    assert type(make_parallel("ddp", 1, CPU, unused_parameters=False)) is Parallel
    assert isinstance(make_parallel("ddp", 2, CPU, unused_parameters=True), DDPParallel)
    fsdp = make_parallel("fsdp", 2, CPU, unused_parameters=True)
    assert isinstance(fsdp, FSDPParallel) and fsdp.evaluates_on_every_rank
    model = tiny_harmonifuse()
    assert Parallel().wrap(model) is model and not Parallel().evaluates_on_every_rank


def test_fsdp_shards_each_llm_decoder_layer_then_the_root_and_keeps_a_frozen_encoder_whole():
    model = tiny_harmonifuse()
    plan = fsdp_plan(model)
    assert plan["units"] == ["llm.model.base_model.model.model.layers.0",
                             "llm.model.base_model.model.model.layers.1", ""]  # "": the root, everything else
    assert plan["replicated"] == [f"encoder.{n}" for n, _ in model.encoder.named_parameters()]
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in plan["replicated"])
    # each layer holds its LoRA adapters: they are sharded with it
    layer = dict(model.named_modules())[plan["units"][0]]
    assert any("lora_A" in n for n, _ in layer.named_parameters())
    # a trainable encoder has gradients to reduce: sharded with the root, not replicated
    for p in model.encoder.parameters():
        p.requires_grad_(True)
    assert fsdp_plan(model)["replicated"] == []


def test_an_llm_whose_decoder_layers_cannot_be_found_is_refused_by_name(monkeypatch):
    model = tiny_harmonifuse()
    base = model.llm.model.get_base_model()
    monkeypatch.setattr(base, "_no_split_modules", None)
    with pytest.raises(ValueError, match=r"train.parallel fsdp: cannot find the decoder layers of LlamaForCausalLM.*"
                                         r"train.parallel: ddp"):
        decoder_layers(model)


def test_prompt_vectors_computed_ahead_refuse_a_new_prompt_by_the_fields_to_change():
    """Under fsdp the trainer computes every prompt's vector before sharding and fixes the set (a
    hidden_state vector computed later would be an LLM forward on one rank alone)."""
    model = tiny_harmonifuse(prompt={"vector": "hidden_state"})
    encoder = model.prompt_encoder
    encoder(["transcribe the audio"])
    encoder.fixed = "computed ahead from model.tasks.prompts and model.tasks.train_prompts"
    assert encoder(["transcribe the audio"]).shape == (1, model.llm.hidden_size)
    with pytest.raises(ValueError, match=r"no prompt vector for \['write it down'\]: computed ahead from "
                                         r"model.tasks.prompts and model.tasks.train_prompts; add the phrasing"):
        encoder(["transcribe the audio", "write it down"])


def test_optimizer_state_by_name_and_by_position_convert_both_ways():
    """Checkpoints keep torch's own layout (by position) under every strategy; DCP's (by name) is converted."""
    model = tiny_harmonifuse()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"name": "lora", "params": [p for n, p in trained if n.startswith("llm.")]},
              {"name": "harmonifuse", "params": [p for n, p in trained if not n.startswith("llm.")]}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    for _, p in trained:
        p.grad = torch.ones_like(p)
    optimizer.step()
    own = optimizer.state_dict()
    by_name = _by_name(own, optimizer, model)
    first = next(n for n, _ in trained if n.startswith("llm."))
    assert by_name["param_groups"][0]["params"][0] == first and first in by_name["state"]
    back = _by_index(by_name, optimizer, model)
    assert back["param_groups"] == own["param_groups"]
    assert back["state"].keys() == own["state"].keys()
    for i, values in own["state"].items():
        assert all(torch.equal(values[k], back["state"][i][k]) for k in values)
    own["param_groups"][0]["params"].pop()
    with pytest.raises(ValueError, match=r"optimiser group 'lora' has \d+ parameters, this model's \d+"):
        _by_name(own, optimizer, model)


# -- two processes (gloo): fsdp against ddp, resume ----------------------------------------------------


def _torchrun(world: int, config: Path, *args: str) -> list[dict]:
    command = [*TORCHRUN, str(world), "-m", "harmonifuse.cli", "train", str(config), *SETTINGS, *args, "-q"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return _summaries(result.stdout)


def _summaries(stdout: str) -> list[dict]:
    """The summary each rank prints; two ranks printing at once may share a line."""
    found, decoder = [], json.JSONDecoder()
    for start in (i for i in range(len(stdout)) if stdout.startswith('{"steps"', i)):
        found.append(decoder.raw_decode(stdout, start)[0])
    return found


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _checkpoint(run: Path, step: int) -> tuple[dict, dict]:
    folder = run / "checkpoints" / f"step_{step:07d}"
    return load_file(str(folder / "trained.safetensors")), torch.load(folder / "state.pt", weights_only=True)


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.allclose(a[name], b[name], atol=atol, rtol=1e-4), (name, float((a[name] - b[name]).abs().max()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 2 alignment + 6 main steps on 2 processes under ddp and under fsdp (dev scored every 3)."""
    root = tmp_path_factory.mktemp("fsdp")
    config = write_tiny_run_config(root, train={"max_steps": 6, "eval_every": 3, "save_every": 3},
                                   data={"batch_size": 2})
    summaries = {kind: _torchrun(2, config, f"train.parallel={kind}", f"train.output_dir={root / kind}")
                 for kind in ("ddp", "fsdp")}
    return root, config, summaries


@pytest.mark.multiprocess
@needs_fsdp2
def test_fsdp_gives_ddps_losses_dev_scores_checkpoints_and_best_model(runs):
    root, _, summaries = runs
    best = summaries["ddp"][0]["best_step"]
    assert best in (3, 6)
    for kind in ("ddp", "fsdp"):  # every rank knows the best step (rank 0's verdict, broadcast)
        assert [(s["steps"], s["align_steps"], s["best_step"]) for s in summaries[kind]] == [(6, 2, best)] * 2, kind
    ddp, fsdp = _records(root / "ddp"), _records(root / "fsdp")
    assert [(r["kind"], r["step"]) for r in ddp] == [(r["kind"], r["step"]) for r in fsdp]  # rank 0 alone logs
    assert [r["kind"] for r in fsdp].count("align_dev") == 1 and [r["kind"] for r in fsdp].count("dev") == 2
    for a, b in zip(ddp, fsdp):
        for key in ("loss_ctc", "loss_asr", "loss_ser", "wer", "cer", "ua", "score"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["kind"], a["step"], key)
        if "grad_norm" in a:  # a sum of squares over every trained tensor: the summation order shows more
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (a["kind"], a["step"])
    # full tensors in the checkpoints, the optimiser's state in torch's own layout: the same files as ddp's
    for step in (5, 8):  # main steps 3 and 6 (the alignment stage's 2 before them)
        (a, a_state), (b, b_state) = _checkpoint(root / "ddp", step), _checkpoint(root / "fsdp", step)
        _assert_close(a, b, atol=2e-5)  # as one process and ddp agree (test_training.py)
        for stage in ("optimizer", "align"):
            a_opt = a_state[stage] if stage == "optimizer" else a_state["align"]["optimizer"]
            b_opt = b_state[stage] if stage == "optimizer" else b_state["align"]["optimizer"]
            assert a_opt["param_groups"] == b_opt["param_groups"]
            assert a_opt["state"].keys() == b_opt["state"].keys()
            for i, values in a_opt["state"].items():
                _assert_close(values, b_opt["state"][i], atol=1e-5)
    # the best model was exported from the sharded model, whole
    _assert_close(load_file(str(root / "ddp" / "best" / "trained.safetensors")),
                  load_file(str(root / "fsdp" / "best" / "trained.safetensors")), atol=2e-5)
    assert (root / "fsdp" / "best" / "config.yaml").is_file()


@pytest.mark.multiprocess
@needs_fsdp2
def test_checkpoints_resume_across_fsdp_ddp_and_one_process(runs):
    from harmonifuse.training.run import load_run_config, train

    root, config, _ = runs
    part = root / "part"
    _torchrun(2, config, "train.parallel=fsdp", f"train.output_dir={part}", "train.max_steps=3")
    # under fsdp: exactly the uninterrupted run
    shutil.copytree(part, root / "again_fsdp")
    _torchrun(2, config, "train.parallel=fsdp", f"train.output_dir={root / 'again_fsdp'}", "--resume")
    final, _ = _checkpoint(root / "fsdp", 8)
    resumed, _ = _checkpoint(root / "again_fsdp", 8)
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)
    # under ddp: the ddp run, up to the float rounding the two strategies differ by
    shutil.copytree(part, root / "again_ddp")
    _torchrun(2, config, "train.parallel=ddp", f"train.output_dir={root / 'again_ddp'}", "--resume")
    _assert_close(_checkpoint(root / "ddp", 8)[0], _checkpoint(root / "again_ddp", 8)[0], atol=2e-5)
    assert [r["step"] for r in _records(root / "again_ddp") if r["kind"] == "train"] == list(range(1, 7))
    # and a ddp checkpoint (main step 3 of the ddp run) under fsdp: the fsdp run, up to that rounding
    shutil.copytree(root / "ddp", root / "from_ddp")
    shutil.rmtree(root / "from_ddp" / "checkpoints" / "step_0000008")
    _torchrun(2, config, "train.parallel=fsdp", f"train.output_dir={root / 'from_ddp'}", "--resume")
    _assert_close(final, _checkpoint(root / "from_ddp", 8)[0], atol=2e-5)
    # on one process (no process group), one step on: weights and optimiser state load into a plain model
    shutil.copytree(part, root / "one")
    overrides = SETTINGS + [f"train.output_dir={root / 'one'}", "train.max_steps=4",
                                                      "data.batch_size=4", "train.parallel=fsdp"]
    summary = train(load_run_config(config, overrides), resume=True, progress=False)
    assert summary["steps"] == 4 and summary["stop_reason"] == "max_steps"
    assert [r["step"] for r in _records(root / "one") if r["kind"] == "train"] == [1, 2, 3, 4]


@pytest.mark.multiprocess
@needs_fsdp2
def test_bf16_frozen_weights_with_float32_adapters_and_a_tuned_encoder_shard_as_on_gpus(tmp_path):
    """What a GPU run does (model.llm.frozen_dtype bfloat16, bf16 autocast, no feature cache), here on
    gloo, with a trained encoder (sharded with the root): units mixing bf16 frozen weights with float32
    adapters, gathered in their own dtypes; the same losses as ddp."""
    config = write_tiny_run_config(tmp_path, train={"max_steps": 3, "eval_every": 3, "save_every": 3},
                                   data={"batch_size": 2, "feature_cache": "off"})
    for kind in ("ddp", "fsdp"):
        _torchrun(2, config, f"train.parallel={kind}", f"train.output_dir={tmp_path / kind}",
                  "model.llm.frozen_dtype=bfloat16", "train.precision=bf16", "model.encoder.trainable=true")
    ddp, fsdp = _records(tmp_path / "ddp"), _records(tmp_path / "fsdp")
    losses = [[r.get("loss_ctc"), r.get("loss_asr"), r.get("loss_ser")] for r in ddp if r["kind"] != "align_dev"]
    assert sum(v is not None for row in losses for v in row) >= 5  # 2 alignment steps, 3 main ones
    assert losses == [[r.get("loss_ctc"), r.get("loss_asr"), r.get("loss_ser")] for r in fsdp
                      if r["kind"] != "align_dev"]  # bf16 gathers are exact: the same bits
    a, b = _checkpoint(tmp_path / "ddp", 5)[0], _checkpoint(tmp_path / "fsdp", 5)[0]
    assert all(t.dtype == torch.float32 for t in b.values())  # the trained parts stay float32
    assert any(name.startswith("encoder.") for name in b)
    _assert_close(a, b, atol=2e-5)


# -- every rank runs as many forward passes -------------------------------------------------------------


PHRASINGS = {"asr": ["write down what is said", "hello world transcribe", "what is said here", "write the words",
                     "transcribe what you hear"],
             "ser": ["which feeling is in this voice", "what emotion does the speaker express", "the emotion please",
                     "say the feeling", "which emotion answer with one word"]}


@pytest.mark.multiprocess
@needs_fsdp2
def test_hidden_state_prompt_vectors_with_several_phrasings_under_fsdp(tmp_path):
    """model.prompt.vector hidden_state computes a prompt's vector with a forward pass of the LLM the
    first time the prompt appears; ranks draw new phrasings at different steps, so under fsdp one rank
    ran extra gathers the other never matched (a hang). Every vector is now computed before sharding.
    The draws are logged: at some step the ranks did meet different numbers of new phrasings."""
    config = write_tiny_run_config(tmp_path, train={"max_steps": 4, "eval_every": 4, "save_every": 4,
                                                    "collective_timeout_minutes": 1.0, "parallel": "fsdp"},
                                   data={"batch_size": 2},
                                   model={"prompt": {"vector": "hidden_state"}, "tasks": {"train_prompts": PHRASINGS}})
    draws = tmp_path / "draws.jsonl"
    program = tmp_path / "logged_draws.py"
    program.write_text(textwrap.dedent(f"""
        import json, os, sys
        from harmonifuse.data.prompt_choice import PromptChoice
        rank, choose = int(os.environ["RANK"]), PromptChoice.choose
        def logged(self, tasks, ids, *, stage, step):
            chosen = choose(self, tasks, ids, stage=stage, step=step)
            with open({str(draws)!r}, "a") as log:
                log.write(json.dumps([rank, step, chosen]) + "\\n")
            return chosen
        PromptChoice.choose = logged
        from harmonifuse.cli import main
        sys.exit(main(["train", {str(config)!r}, "-q"]))
    """))
    result = subprocess.run([*TORCHRUN, "2", str(program)], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [s["steps"] for s in _summaries(result.stdout)] == [4, 4]
    assert [r["kind"] for r in _records(tmp_path / "run")].count("dev") == 1
    seen: dict[int, set] = {0: set(), 1: set()}
    new: dict[int, list[int]] = {0: [], 1: []}  # per rank, per step: phrasings met for the first time
    for rank, step, chosen in sorted(map(json.loads, draws.read_text().splitlines()), key=lambda d: (d[1], d[0])):
        new[rank].append(len(set(chosen) - seen[rank]))
        seen[rank] |= set(chosen)
    assert new[0] != new[1], new  # what made one rank run forward passes the other did not


@pytest.mark.multiprocess
@needs_fsdp2
def test_ranks_whose_searches_end_at_different_steps_decode_in_lock_step_under_fsdp(tmp_path):
    """Under fsdp every rank decodes the same dev utterances, each step a forward pass that gathers the
    decoder layers; numeric differences between ranks (kernels, another kind of GPU) can end one rank's
    search sooner, and its next forward then met the other's gathers. Here rank 1's searches stop after
    one token: it runs idle forward passes until rank 0 is done, and the run ends normally."""
    config = write_tiny_run_config(tmp_path, train={"max_steps": 1, "eval_every": 1, "save_every": 1,
                                                    "collective_timeout_minutes": 1.0, "parallel": "fsdp"},
                                   data={"batch_size": 2})
    idle = tmp_path / "idle.txt"
    program = tmp_path / "rank_1_stops_early.py"
    program.write_text(textwrap.dedent(f"""
        import os, sys
        import harmonifuse.modules.llm as llm
        rank = int(os.environ["RANK"])
        search, idle_forward = llm.beam_search, llm.SpeechLLM._idle_forward
        def search_on_this_rank(*args, **kwargs):
            if rank == 1:
                kwargs["max_new_tokens"] = 1
            return search(*args, **kwargs)
        def counted(self):
            with open({str(idle)!r}, "a") as log:
                log.write(f"{{rank}}\\n")
            return idle_forward(self)
        llm.beam_search, llm.SpeechLLM._idle_forward = search_on_this_rank, counted
        from harmonifuse.cli import main
        sys.exit(main(["train", {str(config)!r}, "-q"]))
    """))
    result = subprocess.run([*TORCHRUN, "2", str(program)], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [s["steps"] for s in _summaries(result.stdout)] == [1, 1]
    waited = idle.read_text().split()
    assert waited and set(waited) == {"1"}  # rank 1 alone waited, in forward passes
    [dev] = [r for r in _records(tmp_path / "run") if r["kind"] == "dev"]
    assert 0 <= dev["wer"]  # rank 0's scoring (its full searches) was logged
