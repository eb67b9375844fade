"""Benchmark: one training pass over cached encoder features vs recomputing the encoder.

With a frozen encoder every epoch recomputes the same hidden states. This script times one pass
over a synthetic training set both ways, through the real data path (sampler -> dataset ->
collate), and prints the ratio (goal: >= 10x):

- recompute: load + resample the audio, pad, run the encoder (inference mode) every batch;
- cached:    memory-map the float16 hidden states of every layer, pad into float32.

The one-off cost of building the cache is printed too. Encoders: the real Whisper tiny.en
(``build_encoder("whisper-tiny.en")``, the default) or, if its model package is missing, a
WavLM Base-size model built from a transformers config (random weights: only compute matters).
WavLM Base recomputes at ~1-4 s per batch on 2 CPU cores, so give it fewer utterances:

    .venv/bin/python benchmarks/bench_feature_cache.py                      # ~30 s
    .venv/bin/python benchmarks/bench_feature_cache.py --encoders wavlm-base --utterances 48
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harmonifuse.data.batch import collate  # noqa: E402
from harmonifuse.data.dataset import MultiTaskLoader, SpeechTaskDataset  # noqa: E402
from harmonifuse.data.feature_cache import FeatureCache  # noqa: E402
from harmonifuse.data.manifest import Utterance  # noqa: E402
from harmonifuse.data.sampler import BatchInterleavedSampler  # noqa: E402
from harmonifuse.modules.encoders.base import SpeechEncoder  # noqa: E402


def whisper_tiny() -> SpeechEncoder:
    from harmonifuse.modules.encoders import build_encoder

    return build_encoder("whisper-tiny.en")


def wavlm_base() -> SpeechEncoder:
    from transformers import WavLMConfig

    from harmonifuse.modules.encoders.ssl import SSLSpeechEncoder

    torch.manual_seed(0)
    return SSLSpeechEncoder.from_config(WavLMConfig(), name="wavlm-base-random")  # 12 x 768, 94M params


ENCODERS: dict[str, Callable[[], SpeechEncoder]] = {"whisper-tiny.en": whisper_tiny, "wavlm-base": wavlm_base}


def make_corpus(folder: Path, n: int, seed: int = 0) -> list[Utterance]:
    """n utterances of 1-6 s: a harmonic 'voice' with moving pitch plus noise, 16-bit 22.05 kHz
    WAV (so loading includes a resample, as with real corpora)."""
    rng = np.random.default_rng(seed)
    rate = 22_050
    utterances = []
    for i in range(n):
        seconds = float(rng.uniform(1.0, 6.0))
        t = np.arange(int(seconds * rate)) / rate
        f0 = 120 + 40 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t)
        phase = 2 * np.pi * np.cumsum(f0) / rate
        wave = sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.2 + 0.02 * rng.standard_normal(t.shape)
        path = folder / f"utt{i:04d}.wav"
        sf.write(path, wave.astype(np.float32), rate, subtype="PCM_16")
        utterances.append(Utterance(id=f"utt{i:04d}", audio=str(path), duration=seconds, corpus="bench",
                                    speaker="s0", text="synthetic"))
    return utterances


def recompute_pass(encoder: SpeechEncoder, dataset: SpeechTaskDataset, sampler: BatchInterleavedSampler) -> int:
    frames = 0
    with torch.inference_mode():
        for plan in sampler:
            batch = collate([dataset[i] for i in plan.indices], task=plan.task)
            out = encoder(batch.waveforms, batch.wave_lengths)  # (L+1, B, T, D)
            frames += int(out.lengths.sum())
    return frames


def cached_pass(loader: MultiTaskLoader) -> int:
    return sum(int(batch.frame_lengths.sum()) for batch in loader)


def bench(name: str, utterances: list[Utterance], batch_size: int, workdir: Path) -> dict[str, float]:
    print(f"\n== {name}: {len(utterances)} utterances, batch size {batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    start = time.perf_counter()
    encoder = ENCODERS[name]()
    print(f"encoder: {encoder.identity}  L+1={encoder.num_hidden_states} D={encoder.hidden_size} "
          f"({sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M params, built in "
          f"{time.perf_counter() - start:.1f} s)")
    audio_seconds = sum(u.duration for u in utterances)

    cache = FeatureCache(encoder, workdir / "cache")
    start = time.perf_counter()
    cache.build(utterances, batch_size=batch_size, progress=False)
    build = time.perf_counter() - start
    size = sum(f.stat().st_size for f in cache.folder.rglob("*.npy"))

    plain = SpeechTaskDataset(utterances, "asr")
    cached = SpeechTaskDataset(utterances, "asr", cache=cache)
    sampler = BatchInterleavedSampler({"asr": plain.durations}, batch_size=batch_size, seed=0)
    loader = MultiTaskLoader({"asr": cached}, sampler)

    cached_pass(loader)  # warm the page cache, as every epoch after the first would find it
    start = time.perf_counter()
    frames_cached = cached_pass(loader)
    t_cached = time.perf_counter() - start
    start = time.perf_counter()
    frames_recomputed = recompute_pass(encoder, plain, sampler)
    t_recompute = time.perf_counter() - start
    assert frames_cached == frames_recomputed, (frames_cached, frames_recomputed)

    ratio = t_recompute / t_cached
    print(f"audio {audio_seconds / 60:.1f} min in {len(sampler)} batches; cache {size / 2**20:.0f} MiB float16, "
          f"built once in {build:.1f} s")
    print(f"recompute pass: {t_recompute:7.2f} s  ({1e3 * t_recompute / len(sampler):7.1f} ms/batch)")
    print(f"cached pass:    {t_cached:7.2f} s  ({1e3 * t_cached / len(sampler):7.1f} ms/batch)")
    print(f"speed-up:       {ratio:7.1f}x  (goal >= 10x: {'met' if ratio >= 10 else 'NOT met'})")
    return {"recompute_s": t_recompute, "cached_s": t_cached, "ratio": ratio, "build_s": build}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["auto"], choices=["auto", *ENCODERS],
                        help="auto: whisper-tiny.en, else wavlm-base")
    parser.add_argument("--utterances", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="keep audio and caches here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        workdir = args.workdir or Path(tmp)
        (workdir / "audio").mkdir(parents=True, exist_ok=True)
        utterances = make_corpus(workdir / "audio", args.utterances)
        for name in args.encoders:
            candidates = list(ENCODERS) if name == "auto" else [name]
            for candidate in candidates:
                try:
                    bench(candidate, utterances, args.batch_size, workdir)
                    break
                except Exception as error:  # e.g. Whisper's model package not installed
                    print(f"\n== {candidate}: unavailable ({type(error).__name__}: {error})")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
