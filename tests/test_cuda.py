"""The GPU check: ``python -m pytest -m cuda tests`` on a machine with CUDA (skipped, with the reason,
without one). Tiny seeded models (tests/tiny.py), nothing downloaded, a few minutes on one GPU.

Each part prints one line saying what passed:

- training in bf16 autocast (float32 with a message on a GPU without native bf16), no feature cache
  (the frozen encoder runs in the forward pass), gradient checkpointing, the embedding-CTC over the
  vocabulary in blocks, an alignment stage, dev scoring with the joint CTC/LLM beam search;
- resume of that run from its middle checkpoint;
- ``harmonifuse analyze --device cuda`` against ``--device cpu`` on the same weights (beam search
  with CTC, float32 without TF32 on both sides: the same answers);
- training under ddp and under fsdp on a one-rank nccl group (the wrapping, the gathers, the
  lock-step decoding and the checkpoints of a multi-GPU run, on one GPU).

Written without a GPU at hand (this repository's machines have none): on a failure, the part's line
is missing and pytest's report says where.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(TESTS)}


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"needs a CUDA GPU: this torch ({torch.__version__}) is a CPU-only build"
    return "needs a CUDA GPU: none is visible (nvidia-smi, CUDA_VISIBLE_DEVICES)"


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=_why_no_cuda())]
GPU = torch.device("cuda", 0)
# the tiny model's vocabulary has 300 tokens: blocks of 37 exercise the chunked CTC (loss, posteriors, decoding)
GPU_RUN = {
    "model": {"projector": {"stack": 2, "hidden_size": 24},
              "ctc": {"loss_weight": 0.3, "learned_blank": True, "vocab_chunk": 37},
              "decoding": {"beam_size": 3, "ctc_weight": 0.5}},
    "data": {"batch_size": 2, "feature_cache": "auto"},  # auto: no cache on CUDA, the encoder runs in the forward
    "align": {"max_steps": 2, "eval_every": 2, "batch_size": 2},
    "train": {"max_steps": 4, "eval_every": 4, "save_every": 2, "precision": "auto", "gradient_checkpointing": True,
              "device": "cuda", "threads": 0},
}


def report(capsys, line: str) -> None:
    """One line on the terminal (past pytest's capture): what a part checked and found."""
    with capsys.disabled():
        print(f"\ncuda: {line}", flush=True)


def native_bf16() -> bool:
    return torch.cuda.get_device_capability(GPU) >= (8, 0)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def trained(run: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / "trained.safetensors"))


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """The tiny run trained once on the GPU (2 alignment + 4 main steps): (root, config path, summary, seconds)."""
    from tiny import write_tiny_run_config

    from harmonifuse.training.run import load_run_config, train

    root = tmp_path_factory.mktemp("cuda")
    path = write_tiny_run_config(root, **GPU_RUN)
    start = time.perf_counter()
    summary = train(load_run_config(str(path)), progress=False)
    return root, path, summary, time.perf_counter() - start


def test_training_on_the_gpu_bf16_no_cache_checkpointing_chunked_ctc_alignment_and_beam_search(gpu_run, capsys):
    root, _, summary, seconds = gpu_run
    assert summary["device"] == "cuda:0" and summary["hardware"].startswith("cuda: ")
    expected = "bf16 autocast" if native_bf16() else "float32"  # pre-Ampere: emulated bf16 is refused
    assert summary["precision"] == expected
    assert (summary["steps"], summary["align_steps"], summary["stop_reason"]) == (4, 2, "max_steps")
    log = records(root / "run")
    losses = [r[k] for r in log for k in ("loss_ctc", "loss_asr", "loss_ser") if k in r]
    assert len(losses) >= 6 and all(torch.isfinite(torch.tensor(losses)))
    kinds = [r["kind"] for r in log]
    assert kinds.count("align_dev") == 1 and kinds.count("dev") == 1
    dev = next(r for r in log if r["kind"] == "dev")
    assert 0 <= dev["wer"] and 0 <= dev["ua"] <= 1  # scored with the joint CTC/LLM beam search (beam 3)
    assert not list((root / "features").glob("**/*.npy"))  # auto: nothing cached on CUDA
    assert (root / "run" / "best" / "trained.safetensors").is_file()
    report(capsys, f"training passed on {torch.cuda.get_device_name(GPU)}: {expected}, no feature cache, gradient "
                   f"checkpointing, CTC in blocks of 37, 2 alignment + 4 main steps, dev beam search with CTC "
                   f"(WER {dev['wer']:.2f}, UA {dev['ua']:.2f}); {seconds:.0f} s, peak "
                   f"{torch.cuda.max_memory_allocated(GPU) / 2**20:.0f} MiB")


def test_a_gpu_run_resumes_from_its_middle_checkpoint(gpu_run, capsys):
    from harmonifuse.training.run import load_run_config, train

    root, path, _, _ = gpu_run
    part = root / "part"
    shutil.copytree(root / "run", part)
    for late in sorted((part / "checkpoints").glob("step_*"))[1:]:  # keep main step 2 (total step 4) only
        shutil.rmtree(late)
    shutil.rmtree(part / "best", ignore_errors=True)
    [kept] = [p.name for p in (part / "checkpoints").glob("step_*")]
    assert kept == "step_0000004"
    summary = train(load_run_config(str(path), [f"train.output_dir={part}"]), resume=True, progress=False)
    assert summary["steps"] == 4
    assert [r["step"] for r in records(part) if r["kind"] == "train"] == [1, 2, 3, 4]
    a, b = trained(root / "run", 6), trained(part, 6)
    worst = max(float((a[k] - b[k]).norm() / (a[k].norm() + 1e-12)) for k in a)
    assert worst < 1e-2, worst  # GPU kernels may sum in another order between two runs
    report(capsys, f"resume passed: steps 3-4 again from the checkpoint of step 2, trained weights within "
                   f"{worst:.1e} (relative) of the uninterrupted run")


def test_analyze_on_the_gpu_answers_as_on_the_cpu_with_the_same_weights(gpu_run, capsys, tmp_path):
    root, _, _, _ = gpu_run
    model = tmp_path / "model"
    shutil.copytree(root / "run" / "best", model)
    config = yaml.safe_load((model / "config.yaml").read_text())
    config["llm"]["frozen_dtype"] = "float32"  # the same arithmetic on both sides (auto: bf16 on the GPU)
    config["decoding"] = {**config.get("decoding", {}), "beam_size": 3, "ctc_weight": 0.5}
    (model / "config.yaml").write_text(yaml.safe_dump(config))
    files = sorted(str(p) for p in (root / "corpus" / "audio").glob("*.wav"))[:6]
    answers = {}
    for device in ("cuda", "cpu"):
        env = {**ENV, "NVIDIA_TF32_OVERRIDE": "0"}  # float32 matmuls in float32 (TF32 is on for training)
        result = subprocess.run([sys.executable, "-m", "harmonifuse.cli", "analyze", "--model", str(model),
                                 "--device", device, "--json", "-q", *files], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        answers[device] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(answers["cuda"]) == len(answers["cpu"]) == len(files)
    for gpu, cpu in zip(answers["cuda"], answers["cpu"]):
        assert gpu["transcript"] == cpu["transcript"]
        assert gpu["emotion"] == cpu["emotion"]
        for label, p in cpu["emotion_probs"].items():
            assert gpu["emotion_probs"][label] == pytest.approx(p, abs=1e-3)
    report(capsys, f"analyze passed: --device cuda and --device cpu gave the same transcripts (beam 3 with CTC) "
                   f"and emotions for {len(files)} files")


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_ddp_and_fsdp_train_on_a_one_rank_nccl_group(gpu_run, capsys, tmp_path, kind):
    """The strategies of a multi-GPU run, wrapping the model on a group of one rank."""
    import torch.distributed as dist

    from harmonifuse.model import HarmoniFuse
    from harmonifuse.training.loaders import build_run_data
    from harmonifuse.training.run import load_run_config
    from harmonifuse.training.sharding import DDPParallel, FSDPParallel
    from harmonifuse.training.trainer import Trainer

    _, path, _, _ = gpu_run
    config = load_run_config(str(path), [f"train.output_dir={tmp_path / kind}", f"train.parallel={kind}"])
    torch.cuda.set_device(GPU)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, device_id=GPU)
    try:
        torch.manual_seed(0)
        model = HarmoniFuse.build(config.model, GPU).to(GPU)
        data = build_run_data(config.data, model.encoder, config.model.tasks.emotion_labels, seed=0, progress=False)
        parallel = DDPParallel(GPU, unused_parameters=True) if kind == "ddp" else FSDPParallel(GPU)
        trainer = Trainer(config, model, data, progress=False, parallel=parallel)
        try:
            summary = trainer.fit()
        finally:
            trainer.logger.close()
    finally:
        dist.destroy_process_group()
    assert (summary["steps"], summary["align_steps"]) == (4, 2)
    log = records(tmp_path / kind)
    assert [r["kind"] for r in log].count("dev") == 1
    state = trained(tmp_path / kind, 6)
    assert state and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    report(capsys, f"{kind} passed on a one-rank nccl group: 2 alignment + 4 main steps, dev scored "
                   f"(WER {next(r for r in log if r['kind'] == 'dev')['wer']:.2f}), full checkpoints written")
