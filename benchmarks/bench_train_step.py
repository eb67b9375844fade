"""Benchmark: one training step of the default model, cached features vs the naive pipeline; bf16 vs fp32.

Each variant runs in its own process (so its peak memory is its own) on the same 8-utterance ASR
batches of the built-in corpus, with the model of configs/demo.yaml and a real AdamW step:

- cached:       float16 hidden states memory-mapped from the feature cache (what `train` does
                with a frozen encoder, `model.encoder.trainable=false`);
- finetune:     audio loaded and Whisper run at the real length every step, its weights trained
                too (what `train configs/demo.yaml` does since run S);
- naive-trim:   audio loaded and Whisper run padded to 30 s every step, output cut to the real length;
- naive-30s:    the same, and all 1,500 frames of the 30 s window go on to the projector and LLM
                (the usual naive pipeline: Whisper's fixed window end to end);
- cached-bf16-sdpa / -castpercall / -fulllogits: the cached step with transformers' SDPA
                attention instead of eager, with the frozen weights cast to bf16 by autocast at
                every call instead of stored in bf16, or with the vocabulary projection at every
                position instead of only where an answer token is predicted (the speed-ups
                `train` uses, measured one at a time);
- align-bf16 / align-fp32: a step of the alignment stage (CTC alone, no LLM pass) on
                `align.batch_size` (16) cached utterances, compared per utterance with the cached step;
                align-finetune-bf16: the same with the encoder run and trained.

It prints the median step time of each, the ratios (goal: cached >= 10x faster than naive), bf16
vs float32, the cached step's distance from the FLOP limit (4 x parameters on the trainable
path x tokens / the matmul rate measured here in the step's precision, the backward pass needing
activation gradients only through the frozen weights; the vocabulary projection counted at the
positions that compute it) and the peak resident memory of each process.

On a CPU without bf16 matrix units (no AMX or AVX512-BF16) bf16 matmuls are emulated and very
slow: run the float32 variants there, e.g. `--variants cached-fp32,cached-fp32-fulllogits,naive-trim-fp32`.

    .venv/bin/python benchmarks/bench_train_step.py [--steps 5] [--variants a,b]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parents[1]


class Variant(NamedTuple):
    features: str  # cached | naive-trim | naive-30s | finetune
    precision: str  # bf16 (autocast) | fp32
    overrides: list[str] = []
    store_bf16: bool = False  # frozen weights stored in bf16, as the trainer does under bf16 autocast
    full_logits: bool = False  # the vocabulary projection at every position (the textbook loss)
    align: bool = False  # a step of the alignment stage (CTC alone) on align.batch_size utterances


FEATURE_OVERRIDES = {  # how each feature path sets up the encoder of configs/demo.yaml
    "cached": ["model.encoder.trainable=false"],
    "finetune": ["model.encoder.trainable=true"],
    "naive-trim": ["model.encoder.trainable=false", "model.encoder.pad_to_30s=true"],
    "naive-30s": ["model.encoder.trainable=false", "model.encoder.pad_to_30s=true"],
}
VARIANTS = {
    "cached-bf16": Variant("cached", "bf16", store_bf16=True),  # `train` with a frozen encoder, bf16 units
    "cached-bf16-sdpa": Variant("cached", "bf16", ["model.llm.attention=sdpa"], store_bf16=True),
    "cached-bf16-castpercall": Variant("cached", "bf16"),
    "cached-bf16-fulllogits": Variant("cached", "bf16", store_bf16=True, full_logits=True),
    "cached-fp32": Variant("cached", "fp32"),  # what `train` does without bf16 matrix units
    "cached-fp32-fulllogits": Variant("cached", "fp32", full_logits=True),
    "naive-trim-bf16": Variant("naive-trim", "bf16", store_bf16=True),
    "naive-30s-bf16": Variant("naive-30s", "bf16", store_bf16=True),
    "naive-trim-fp32": Variant("naive-trim", "fp32"),
    "naive-30s-fp32": Variant("naive-30s", "fp32"),
    "align-bf16": Variant("cached", "bf16", store_bf16=True, align=True),
    "align-fp32": Variant("cached", "fp32", align=True),
    "finetune-bf16": Variant("finetune", "bf16", store_bf16=True),  # `train configs/demo.yaml`, bf16 units
    "finetune-fp32": Variant("finetune", "fp32"),
    "align-finetune-bf16": Variant("finetune", "bf16", store_bf16=True, align=True),
}
DEFAULT_VARIANTS = ("cached-bf16", "cached-bf16-sdpa", "cached-bf16-castpercall", "cached-bf16-fulllogits",
                    "cached-fp32", "naive-trim-bf16", "naive-30s-bf16", "align-bf16")


def full_logits_loss(llm, inputs):
    """SpeechLLM.forward as first written: (B, T, V) logits, the loss masked to the answer tokens."""
    from harmonifuse.modules.llm import IGNORE_INDEX

    logits = llm.model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                       position_ids=inputs.position_ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             inputs.labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


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
    from harmonifuse.modules.llm import answer_positions
    from harmonifuse.training.loaders import feature_cache_for
    from harmonifuse.training.optim import parameter_groups
    from harmonifuse.training.run import load_run_config

    features, precision, overrides, store_bf16, full_logits, align = VARIANTS[variant]
    overrides = overrides + FEATURE_OVERRIDES[features]
    config = load_run_config(str(REPO / "configs" / "demo.yaml"), overrides)
    if align:
        batch_size = config.align.batch_size
    torch.manual_seed(0)
    model = HarmoniFuse.build(config.model).train()
    if store_bf16:  # as the trainer does under bf16 autocast
        model.llm.store_frozen_linears_in(torch.bfloat16)
    if full_logits:
        model.llm.forward = types.MethodType(full_logits_loss, model.llm)
    utterances = read_manifest(REPO / "data" / "synthetic" / "asr_train.jsonl")
    pick = np.random.default_rng(0).choice(len(utterances), size=(steps + 2) * batch_size, replace=False)
    utterances = [utterances[i] for i in pick]
    cache = feature_cache_for(model.encoder, config.data) if features == "cached" else None
    dataset = SpeechTaskDataset(utterances, "asr", cache=cache)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.optim))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times, tokens, projected, seen = [], [], [], []

    def count(module, args):  # LLM input positions and vocabulary-projected positions, for the FLOP count
        inputs = args[0]
        B, T = inputs.labels.shape
        kept = B * (T - 1) if full_logits else B * len(answer_positions(inputs.labels))
        seen.append((int(inputs.attention_mask.sum()), kept))

    model.llm.register_forward_pre_hook(count)
    for step in range(steps + 2):
        start = time.perf_counter()
        batch = collate([dataset[i] for i in range(step * batch_size, (step + 1) * batch_size)], "asr")
        if features == "naive-30s":  # the padding is treated as audio: the whole window goes on
            window = 30 * SAMPLE_RATE
            batch.waveforms = torch.nn.functional.pad(batch.waveforms, (0, window - batch.waveforms.shape[1]))
            batch.wave_lengths = torch.full_like(batch.wave_lengths, window)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = model.alignment_loss(batch) if align else model(batch)
        out.loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if step >= 2:  # the first steps allocate and warm up
            times.append(elapsed)
            tokens.append(seen[-1][0] if seen else 0)  # no LLM pass in an alignment step
            projected.append(seen[-1][1] if seen else 0)
    llm_params = sum(p.numel() for p in {id(p): p for p in model.llm.parameters()}.values())
    vocab_params = model.llm.model.get_output_embeddings().weight.numel()  # tied: counted once above
    head_params = sum(p.numel() for n, p in model.named_parameters()
                      if p.requires_grad and not n.startswith("llm."))
    step_flops = 4 * ((llm_params - vocab_params + head_params) * statistics.median(tokens)
                      + vocab_params * statistics.median(projected))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return {"variant": variant, "step_s": statistics.median(times), "tokens": statistics.median(tokens),
            "projected": statistics.median(projected), "step_flops": step_flops,
            "matmul_tflops": matmul_tflops(dtype), "precision": precision, "batch": batch_size, "align": align,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"any of {', '.join(VARIANTS)}")
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
    print(f"{'variant':<26}{'step s':>9}{'LLM tokens':>12}{'vocab-projected':>17}{'peak RSS GB':>13}")
    for name, r in results.items():
        print(f"{name:<26}{r['step_s']:>9.3f}{r['tokens']:>12.0f}{r['projected']:>17.0f}{r['peak_rss_gb']:>13.2f}")
    for precision in ("bf16", "fp32"):  # every variant against the cached step of its precision
        base_name = f"cached-{precision}"
        base = results.get(base_name)
        if not base:
            continue
        for name, r in results.items():
            if name != base_name and r["precision"] == precision and not r["align"]:
                print(f"{name} / {base_name}: {r['step_s'] / base['step_s']:.2f}x")
            elif r["align"] and r["precision"] == precision:
                per_utt, base_per_utt = r["step_s"] / r["batch"], base["step_s"] / base["batch"]
                print(f"{name} ({r['batch']} utt.) / {base_name} ({base['batch']} utt.): "
                      f"{r['step_s'] / base['step_s']:.2f}x per step, {per_utt / base_per_utt:.2f}x per utterance")
        limit = base["step_flops"] / (base["matmul_tflops"] * 1e12)
        print(f"FLOP limit of the {base_name} step: {base['step_flops'] / 1e12:.3f} TFLOP at "
              f"{base['matmul_tflops']:.3f} TFLOP/s ({precision} 2048^2 matmul) = {limit:.3f} s; measured "
              f"{base['step_s']:.3f} s = {base['step_s'] / limit:.1f}x the limit "
              f"({100 * limit / base['step_s']:.0f} % utilisation)")
    if "align-bf16" in results and "align-finetune-bf16" in results:
        print(f"align-finetune-bf16 / align-bf16: "
              f"{results['align-finetune-bf16']['step_s'] / results['align-bf16']['step_s']:.2f}x")
    if "cached-bf16" in results and "cached-fp32" in results:
        print(f"cached-fp32 / cached-bf16: {results['cached-fp32']['step_s'] / results['cached-bf16']['step_s']:.2f}x")


if __name__ == "__main__":
    main()
