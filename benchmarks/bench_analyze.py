"""Benchmark: ``analyze`` (both tasks, one encoder pass) vs ``transcribe`` + ``recognize_emotion``.

Runs both ways side by side on the same clips with the shipped model (or --model), prints the
wall time of each, their ratio (goal >= 1.8x) and the real-time factor of ``analyze``.

    .venv/bin/python benchmarks/bench_analyze.py [--model DIR] [--clips 8] [--batch 8] [--bf16]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from harmonifuse.inference.loading import load_model
from harmonifuse.pretrained import resolve_model
from harmonifuse.data.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="the LLM in bf16 (see bench_inference.py)")
    args = parser.parse_args()
    model = load_model(resolve_model(args.model), bf16=args.bf16).eval()
    utts = [u for u in read_manifest(REPO / "data" / "synthetic" / "asr_test.jsonl") if 3 <= u.duration <= 10]
    paths = [u.audio for u in utts[: args.clips]]
    seconds = sum(u.duration for u in utts[: args.clips])
    batches = [paths[i:i + args.batch] for i in range(0, len(paths), args.batch)]

    def both():
        for b in batches:
            model.analyze(b)

    def separate():
        for b in batches:
            model.transcribe(b)
            model.recognize_emotion(b)

    with torch.no_grad():
        model.analyze(batches[0][:1])  # warm-up
        start = time.perf_counter(); both(); t_both = time.perf_counter() - start
        start = time.perf_counter(); separate(); t_sep = time.perf_counter() - start
    print(f"{len(paths)} clips, {seconds:.1f} s of audio, batch {args.batch}, bf16 {args.bf16}")
    print(f"analyze (one encoder pass): {t_both:.2f} s   RTFx {seconds / t_both:.1f}")
    print(f"transcribe + recognize_emotion: {t_sep:.2f} s")
    print(f"ratio: {t_sep / t_both:.2f}x")


if __name__ == "__main__":
    main()
