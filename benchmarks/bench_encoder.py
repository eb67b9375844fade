"""Benchmark: Whisper tiny.en encoder on the real input length vs padded to 30 s (goal >= 5x).

Both modes run side by side in one process on the same 3-5 s clips (the built-in corpus's test
split if present, else synthetic tones), batch 1 and batch 8, and the ratio is printed.

    .venv/bin/python benchmarks/bench_encoder.py
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from harmonifuse.audio import load_audio
from harmonifuse.data.batch import pad_waveforms
from harmonifuse.modules.encoders import build_encoder

REPO = Path(__file__).resolve().parents[1]


def clips(n: int) -> list[np.ndarray]:
    manifest = REPO / "data" / "synthetic" / "asr_test.jsonl"
    if manifest.is_file():
        from harmonifuse.data.manifest import read_manifest

        chosen = [u for u in read_manifest(manifest) if 3.0 <= u.duration <= 5.0][:n]
        if len(chosen) == n:
            return [load_audio(u.audio) for u in chosen]
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(rng.uniform(3, 5) * 16000))).astype(np.float32) for _ in range(n)]


def timed(encoder, batches, repeats: int) -> float:
    with torch.inference_mode():
        encoder(*batches[0])  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            for waves, lengths in batches:
                encoder(waves, lengths)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    audio = clips(args.clips)
    seconds = sum(len(a) for a in audio) / 16000
    varlen, padded = build_encoder("whisper-tiny.en"), build_encoder("whisper-tiny.en", pad_to_30s=True)
    print(f"{len(audio)} clips, {seconds:.1f} s of audio, torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'real length (s)':>16} {'padded 30 s (s)':>16} {'ratio':>7}")
    for batch_size in (1, 8):
        batches = []
        for i in range(0, len(audio), batch_size):
            batches.append(pad_waveforms(audio[i:i + batch_size]))
        t_var, t_pad = timed(varlen, batches, args.repeats), timed(padded, batches, args.repeats)
        print(f"{batch_size:>5} {t_var:>16.3f} {t_pad:>16.3f} {t_pad / t_var:>6.1f}x")


if __name__ == "__main__":
    main()
