"""``harmonifuse plan``: parameter counts from configs on the meta device (local folders and the
published sizes of known hub ids), the memory estimate's parts, the verdict and the CLI."""
import pytest
import torch

from harmonifuse.config import load_config
from harmonifuse.config.run import RunConfig
from harmonifuse.plan import KNOWN_MODELS, PlanError, base_config, format_plan, make_plan

PAPER = "configs/recipes/paper-wavlm-large.yaml"


@pytest.mark.parametrize("source, published", [
    ("microsoft/wavlm-large", 315.45e6), ("meta-llama/Llama-3.2-1B-Instruct", 1.236e9),
    ("meta-llama/Llama-3.2-3B-Instruct", 3.213e9), ("meta-llama/Llama-3.1-8B-Instruct", 8.030e9),
    ("Qwen/Qwen2.5-1.5B-Instruct", 1.544e9), ("Qwen/Qwen2.5-7B-Instruct", 7.616e9)])
def test_known_hub_ids_count_their_published_parameters(source, published, tmp_path, monkeypatch):
    from transformers import AutoModel, AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)  # no folder of that name here
    config, origin = base_config(source)
    assert "published sizes" in origin
    with torch.device("meta"):
        model = (AutoModel if "wavlm" in source else AutoModelForCausalLM).from_config(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(published, rel=2e-3)


def test_an_unknown_source_is_named_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PlanError, match=r"'someone/unknown-7b'.*local model folder"):
        base_config("someone/unknown-7b")
    assert "microsoft/wavlm-large" in KNOWN_MODELS


def test_local_model_folders_give_the_exact_parameter_counts_of_the_built_model(tmp_path):
    """The tiny encoder and LLM saved as folders: the plan's totals equal the real HarmoniFuse's."""
    from tiny import write_tiny_run_config

    from harmonifuse.model import HarmoniFuse

    config = load_config(RunConfig, write_tiny_run_config(tmp_path))
    plan = make_plan(config, gpus=1, gpu_memory_gb=2.0)
    assert all("config.json" in where for where in plan.sources.values())
    model = HarmoniFuse.build(config.model)
    assert plan.params_total == sum(p.numel() for p in model.parameters())
    assert plan.params_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0.4 <= plan.seconds <= 0.6 and plan.seconds_from == "longest training utterance"
    assert plan.fits is True
    assert "fits in 2 GB per GPU" in format_plan(plan)


def test_the_paper_recipe_plans_offline_and_the_memory_switches_lower_the_estimate():
    base = load_config(RunConfig, PAPER)
    plan = make_plan(base, gpus=8, gpu_memory_gb=80)
    assert 7.9e9 < plan.params_total < 8.0e9 and 20e6 < plan.params_trainable < 50e6
    weights = {line.name: line.bytes for line in plan.per_gpu}
    assert weights["LLM weights (frozen)"] == pytest.approx(2 * 7.616e9, rel=2e-3)  # bf16 on GPUs
    assert plan.fits
    whole = make_plan(load_config(RunConfig, PAPER, ["model.ctc.vocab_chunk=0"]), gpus=8)
    kept = make_plan(load_config(RunConfig, PAPER, ["train.gradient_checkpointing=false"]), gpus=8)
    trained = make_plan(load_config(RunConfig, PAPER, ["model.encoder.trainable=true"]), gpus=8)
    assert plan.activations < whole.activations and plan.activations < kept.activations
    assert trained.params_trainable > plan.params_trainable + 300e6
    cached = make_plan(load_config(RunConfig, PAPER, ["data.feature_cache=/shared/features"]), gpus=8)
    assert cached.feature_cache is not None and "2.56 MB per audio second" in cached.feature_cache.note
    auto = make_plan(load_config(RunConfig, PAPER, ["data.feature_cache=auto"]), gpus=8)
    assert auto.feature_cache is None  # "auto" caches on a CPU only


def test_plan_command_prints_the_figures_and_exits_4_when_it_does_not_fit(capsys):
    from harmonifuse.cli import main

    assert main(["plan", PAPER, "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    for text in ("parameters: 7.964 B total", "LLM weights (frozen)", "activations, main stage", "fits in 80 GB"):
        assert text in out
    assert main(["plan", PAPER, "--gpus", "1", "--gpu-memory", "12"]) == 4
    assert "does NOT fit in 12 GB" in capsys.readouterr().out


def test_a_cpu_process_counts_itself_and_the_weights_as_the_trainer_stores_them(tmp_path):
    """--gpus 0: float32 weights without autocast; under bf16 autocast the frozen Linear layers are
    stored in bf16 (the embedding table stays float32), as Trainer._setup_precision does."""
    from tiny import write_tiny_run_config

    path = write_tiny_run_config(tmp_path)
    plain = make_plan(load_config(RunConfig, path, ["train.precision=fp32"]), gpus=0)
    autocast = make_plan(load_config(RunConfig, path, ["train.precision=bf16"]), gpus=0)
    lines = {line.name: line.bytes for line in plain.per_gpu}
    assert lines["process (Python, torch, transformers)"] > 100e6  # this process: torch and transformers loaded
    from transformers import AutoModelForCausalLM

    llm_config, _ = base_config(load_config(RunConfig, path).model.llm.source)
    with torch.device("meta"):
        n_llm = sum(p.numel() for p in AutoModelForCausalLM.from_config(llm_config).parameters())
    embedding = llm_config.vocab_size * llm_config.hidden_size  # tied: the output head is the same table
    assert lines["LLM weights (frozen)"] == 4 * n_llm
    stored = {line.name: line.bytes for line in autocast.per_gpu}["LLM weights (frozen)"]
    assert stored == 4 * embedding + 2 * (n_llm - embedding)
    with pytest.raises(PlanError, match="--gpus must be >= 0"):
        make_plan(load_config(RunConfig, path), gpus=-1)


def test_fsdp_divides_the_llm_and_the_trained_state_by_the_gpus_and_adds_what_it_gathers():
    ddp = make_plan(load_config(RunConfig, PAPER), gpus=8, gpu_memory_gb=80)
    fsdp = make_plan(load_config(RunConfig, PAPER, ["train.parallel=fsdp"]), gpus=8, gpu_memory_gb=80)
    a, b = ({line.name: line.bytes for line in plan.per_gpu} for plan in (ddp, fsdp))
    llm = a["LLM weights (frozen)"]
    assert b["LLM weights (frozen, FSDP shard)"] == pytest.approx(llm / 8)
    # Qwen2.5-7B's root unit: two untied 152064 x 3584 tables (bf16) and the float32 HarmoniFuse parts
    # (most of what is trained); and two of its 28 layers
    layer = (7.616e9 - 2 * 152064 * 3584) / 28
    assert b["gathered by FSDP during a step"] == pytest.approx(2 * (2 * 152064 * 3584 + 2 * layer)
                                                                + 4 * fsdp.params_trainable, rel=0.02)
    assert b["encoder weights (frozen)"] == a["encoder weights (frozen)"]  # a replica on every GPU
    assert b["trained parameters, gradients, AdamW"] == pytest.approx(16 * fsdp.params_trainable / 8)
    assert fsdp.activations == ddp.activations and fsdp.total < ddp.total - 9e9
    # one GPU: nothing to shard over
    one = make_plan(load_config(RunConfig, PAPER, ["train.parallel=fsdp"]), gpus=1)
    assert "LLM weights (frozen)" in {line.name for line in one.per_gpu}


def test_the_plan_reports_host_memory_per_process_and_per_node():
    """Eight ranks of a node each load their models through host memory: the frozen encoder (built on
    the host, then moved) and, no longer, the whole frozen LLM (it loads straight onto each GPU)."""
    from harmonifuse.plan import GPUS_PER_NODE, format_plan

    plan = make_plan(load_config(RunConfig, PAPER), gpus=16, gpu_memory_gb=80)
    host = {line.name: line.bytes for line in plan.host}
    assert host["LLM weights"] == 0
    assert host["encoder weights, while loading"] == pytest.approx(4 * 315.5e6, rel=0.01)  # WavLM Large, float32
    assert host["data-loader workers"] == 8 * 0.5 * 1024 ** 3  # the recipe's train.num_workers: 8
    assert plan.processes_per_node == GPUS_PER_NODE == 8
    out = format_plan(plan)
    assert "host memory per process" in out and "host memory per node (8 processes)" in out
    assert make_plan(load_config(RunConfig, PAPER), gpus=0).host == []  # a CPU process: its figure is host memory
