"""Benchmark: latency, throughput and memory of ``analyze`` (ASR + SER) with the shipped model.

Every variant runs in its own process (its peak memory is its own) on the same test-split clips of
3-10 s, and reports:

- wall time of ``analyze`` over all clips, its real-time factor (RTFx = audio seconds / wall
  seconds; goal >= 10) and clips per second;
- the per-token cost of KV-cached greedy decoding: (time of 33 new tokens - time of 1) / 32, at
  the variant's batch size (one decoding step advances every stream in the batch);
- peak resident memory.

Variants: float32 vs bf16 autocast vs bf16 LLM weights, batch 1 (single-clip latency) vs batch 8
(throughput), transformers' static KV cache with torch.compile, and batches of 8 clips in manifest
order vs batches of similar duration as ``harmonifuse analyze`` forms them (``-sorted``).

    .venv/bin/python benchmarks/bench_inference.py [--clips 16] [--variants fp32-b1,bf16w-b8]
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
VARIANTS = {  # name: (precision, batch size, KV cache, batches of similar duration)
    "fp32-b1": ("fp32", 1, "dynamic", False),
    "bf16-b1": ("bf16-autocast", 1, "dynamic", False),
    "bf16w-b1": ("bf16-weights", 1, "dynamic", False),
    "fp32-b8": ("fp32", 8, "dynamic", False),
    "bf16-b8": ("bf16-autocast", 8, "dynamic", False),
    "bf16w-b8": ("bf16-weights", 8, "dynamic", False),
    "bf16w-b8-sorted": ("bf16-weights", 8, "dynamic", True),
    "bf16w-b1-static-compile": ("bf16-weights", 1, "static-compile", False),
    "bf16w-b8-static-compile": ("bf16-weights", 8, "static-compile", False),
}


def worker(variant: str, clips: int) -> dict:
    import contextlib

    from harmonifuse.inference.loading import load_model
    from harmonifuse.pretrained import resolve_model
    from harmonifuse.inference.batching import duration_batches
    from harmonifuse.data.manifest import read_manifest

    precision, batch_size, kv_cache, by_duration = VARIANTS[variant]
    model = load_model(resolve_model(None)).eval()
    if precision == "bf16-weights":
        model.llm.model.to(torch.bfloat16)
    if kv_cache == "static-compile":
        from transformers import CompileConfig

        compile_config = CompileConfig(mode="default", dynamic=True)
        compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless asked
        model.llm.generate_options = {"cache_implementation": "static", "compile_config": compile_config}
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast"
                else contextlib.nullcontext())
    utterances = [u for u in read_manifest(REPO / "data" / "synthetic" / "asr_test.jsonl") if 3 <= u.duration <= 10]
    utterances = utterances[:clips]
    audio_seconds = sum(u.duration for u in utterances)
    if by_duration:
        plan = [batch for window in duration_batches([u.duration for u in utterances], batch_size) for batch in window]
    else:
        plan = [list(range(i, min(i + batch_size, len(utterances)))) for i in range(0, len(utterances), batch_size)]
    batches = [[utterances[i].audio for i in batch] for batch in plan]
    with autocast, torch.no_grad():
        start = time.perf_counter()
        model.analyze(batches[0])  # warm-up (and compilation, for the compiled variant)
        warmup = time.perf_counter() - start
        latencies = []
        start = time.perf_counter()
        for batch in batches:
            t0 = time.perf_counter()
            model.analyze(batch)
            latencies.append(time.perf_counter() - t0)
        total = time.perf_counter() - start
        # per-token decoding cost on the first batch's speech
        encoded = model.encode(*model.load_waveforms(batches[0]))
        speech = model.speech_embeddings(encoded.hidden_states, encoded.lengths, ["asr"] * len(batches[0]))
        prompts = model.prompts_for(["asr"] * len(batches[0]))
        inputs = model.llm.build_inputs(speech.embeddings, speech.lengths, prompts, left_pad=True)

        def decode(n: int) -> float:
            t0 = time.perf_counter()
            model.llm.model.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                     max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=model.llm.pad_token_id, **model.llm.generate_options)
            return time.perf_counter() - t0

        decode(33)
        one = statistics.median(decode(1) for _ in range(3))
        many = statistics.median(decode(33) for _ in range(3))
    return {"variant": variant, "batch": batch_size, "clips": len(utterances), "audio_s": audio_seconds,
            "total_s": total, "rtfx": audio_seconds / total, "clips_per_s": len(utterances) / total,
            "latency_s": statistics.median(latencies), "warmup_s": warmup, "ms_per_token": (many - one) / 32 * 1e3,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.clips)))
        return
    results = {}
    for variant in args.variants.split(","):
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--worker", variant, "--clips", str(args.clips)],
                              capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            print(f"{variant} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    if not results:
        sys.exit("every variant failed")
    first = next(iter(results.values()))
    print(f"\nanalyze (ASR + SER) on {first['clips']} test clips of 3-10 s ({first['audio_s']:.1f} s of audio):")
    print(f"{'variant':<26}{'wall s':>8}{'RTFx':>7}{'clips/s':>9}{'latency s':>11}{'ms/token':>10}"
          f"{'warm-up s':>11}{'peak GB':>9}")
    for name, r in results.items():
        print(f"{name:<26}{r['total_s']:>8.2f}{r['rtfx']:>7.1f}{r['clips_per_s']:>9.2f}{r['latency_s']:>11.2f}"
              f"{r['ms_per_token']:>10.1f}{r['warmup_s']:>11.1f}{r['peak_rss_gb']:>9.2f}")
    for a, b in (("fp32-b8", "bf16-b8"), ("fp32-b8", "bf16w-b8"), ("fp32-b1", "bf16w-b1"), ("bf16w-b1", "bf16w-b8"),
                 ("bf16w-b8", "bf16w-b8-sorted"),
                 ("bf16w-b1", "bf16w-b1-static-compile"), ("bf16w-b8", "bf16w-b8-static-compile")):
        if a in results and b in results:
            print(f"{b} vs {a}: {results[a]['total_s'] / results[b]['total_s']:.2f}x wall time, "
                  f"{results[a]['ms_per_token'] / results[b]['ms_per_token']:.2f}x per token")


if __name__ == "__main__":
    main()
