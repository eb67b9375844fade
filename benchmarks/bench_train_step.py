"""Benchmark: one training step of the default model, cached features vs the naive pipeline; bf16 vs fp32.

Each variant runs in its own process (so its peak memory is its own) on the same 8-utterance ASR
batches of the built-in corpus, with the model of configs/demo.yaml and a real AdamW step:

- cached:       float16 hidden states memory-mapped from the feature cache (what `train` does);
- naive-trim:   audio loaded and Whisper run padded to 30 s every step, output cut to the real length;
- naive-30s:    the same, and all 1,500 frames of the 30 s window go on to the projector and LLM
                (the usual naive pipeline: Whisper's fixed window end to end);
- cached-bf16-sdpa / -castpercall: the cached step with transformers' SDPA attention instead of
                eager, or with the frozen weights cast to bf16 by autocast at every call instead
                of stored in bf16 (the two speed-ups `train` uses, measured one at a time).

It prints the median step time of each, the ratios (goal: cached >= 10x faster than naive), bf16
vs float32, the cached bf16 step's distance from the FLOP limit (4 x parameters on the trainable
path x tokens / the bf16 matmul rate measured here, the backward pass needing activation
gradients only through the frozen weights) and the peak resident memory of each process.

    .venv/bin/python benchmarks/bench_train_step.py [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (features, precision, extra config overrides, frozen weights stored in bf16)
    "cached-bf16": ("cached", "bf16", [], True),  # what `train configs/demo.yaml` does
    "cached-bf16-sdpa": ("cached", "bf16", ["model.llm.attention=sdpa"], True),
    "cached-bf16-castpercall": ("cached", "bf16", [], False),
    "cached-fp32": ("cached", "fp32", [], False),
    "naive-trim-bf16": ("naive-trim", "bf16", [], True),
    "naive-30s-bf16": ("naive-30s", "bf16", [], True),
}


def matmul_tflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(n, n).to(dtype)
    a @ a
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12


def worker(variant: str, steps: int, batch_size: int) -> dict:
    import numpy as np

    from harmonifuse.audio import SAMPLE_RATE
    from harmonifuse.data.batch import collate
    from harmonifuse.data.dataset import SpeechTaskDataset
    from harmonifuse.data.manifest import read_manifest
    from harmonifuse.model import HarmoniFuse
    from harmonifuse.training.data import feature_cache_for
    from harmonifuse.training.run import load_run_config
    from harmonifuse.training.trainer import parameter_groups

    features, precision, overrides, store_bf16 = VARIANTS[variant]
    overrides = overrides + (["model.encoder.pad_to_30s=true"] if features != "cached" else [])
    config = load_run_config(str(REPO / "configs" / "demo.yaml"), overrides)
    torch.manual_seed(0)
    model = HarmoniFuse.build(config.model).train()
    if store_bf16:  # as the trainer does under bf16 autocast
        model.llm.store_frozen_linears_in(torch.bfloat16)
    utterances = read_manifest(REPO / "data" / "synthetic" / "asr_train.jsonl")
    pick = np.random.default_rng(0).choice(len(utterances), size=(steps + 2) * batch_size, replace=False)
    utterances = [utterances[i] for i in pick]
    cache = feature_cache_for(model.encoder, config.data) if features == "cached" else None
    dataset = SpeechTaskDataset(utterances, "asr", cache=cache)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.optim))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times, tokens, seen = [], [], []
    # the LLM's input positions per step (speech + prompt + answer, all rows), for the FLOP count
    model.llm.register_forward_pre_hook(lambda module, args: seen.append(int(args[0].attention_mask.sum())))
    for step in range(steps + 2):
        start = time.perf_counter()
        batch = collate([dataset[i] for i in range(step * batch_size, (step + 1) * batch_size)], "asr")
        if features == "naive-30s":  # the padding is treated as audio: the whole window goes on
            window = 30 * SAMPLE_RATE
            batch.waveforms = torch.nn.functional.pad(batch.waveforms, (0, window - batch.waveforms.shape[1]))
            batch.wave_lengths = torch.full_like(batch.wave_lengths, window)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = model(batch)
        out.loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if step >= 2:  # the first steps allocate and warm up
            times.append(elapsed)
            tokens.append(seen[-1])
    llm_params = sum(p.numel() for p in {id(p): p for p in model.llm.parameters()}.values())
    head_params = sum(p.numel() for n, p in model.named_parameters()
                      if p.requires_grad and not n.startswith("llm."))
    return {"variant": variant, "step_s": statistics.median(times), "tokens": statistics.median(tokens),
            "path_params": llm_params + head_params, "bf16_tflops": matmul_tflops(torch.bfloat16),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch)))
        return
    results = {}
    for variant in args.variants.split(","):
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--worker", variant, "--steps", str(args.steps),
                               "--batch", str(args.batch)], capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nTraining step, batch {args.batch} ASR utterances, median of {args.steps} steps:")
    print(f"{'variant':<26}{'step s':>9}{'LLM tokens':>12}{'peak RSS GB':>13}")
    for name, r in results.items():
        print(f"{name:<26}{r['step_s']:>9.3f}{r['tokens']:>12.0f}{r['peak_rss_gb']:>13.2f}")
    base = results.get("cached-bf16")
    if base:
        for name in ("naive-trim-bf16", "naive-30s-bf16", "cached-fp32", "cached-bf16-sdpa",
                     "cached-bf16-castpercall"):
            if name in results:
                print(f"{name} / cached-bf16: {results[name]['step_s'] / base['step_s']:.2f}x")
        flops = 4 * base["path_params"] * base["tokens"]
        limit = flops / (base["bf16_tflops"] * 1e12)
        print(f"FLOP limit of the cached bf16 step: 4 x {base['path_params'] / 1e6:.1f} M parameters x "
              f"{base['tokens']:.0f} tokens = {flops / 1e12:.2f} TFLOP at {base['bf16_tflops']:.2f} TFLOP/s "
              f"(bf16 2048^2 matmul) = {limit:.3f} s; measured {base['step_s']:.3f} s = "
              f"{base['step_s'] / limit:.1f}x the limit ({100 * limit / base['step_s']:.0f} % utilisation)")


if __name__ == "__main__":
    main()
