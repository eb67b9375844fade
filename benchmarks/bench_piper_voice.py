"""Benchmark: the neural voice (Piper en_US-joe-medium) reading corpus sentences; real-time factor.

Reads ``--sentences`` training-pool sentences of the built-in corpus with the 12 speakers of the
"neural" voice set (cycling through them, neutral prosody) exactly as the corpus renders them
(a fresh seeded single-threaded ONNX Runtime session per utterance, 22.05 kHz -> 16 kHz with soxr),
and also with one reused session, which is what Piper costs without the per-utterance seeding
that makes the corpus reproducible. Then it times the augmentation transforms on the same audio.
Real-time factor = processing seconds / audio seconds (below 1 is faster than real time).

    .venv/bin/python benchmarks/bench_piper_voice.py              # ~10 s on one core
    .venv/bin/python benchmarks/bench_piper_voice.py --sentences 20 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harmonifuse.data import augmentation as aug  # noqa: E402
from harmonifuse.data import synthetic  # noqa: E402
from harmonifuse.data.sentences import load_sentences  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    synthetic.piper_model_path()  # fails early, with the install command, if piper is missing
    pool = synthetic._split_pools(load_sentences(), 0)["train"]
    sentences = [pool[i].spoken for i in range(args.sentences)]
    voices = synthetic.VOICE_SETS["neural"]["train"]
    piper_voices = [v for v in voices if v.engine == "piper"]

    synthetic.synthesise(sentences[0], piper_voices[0])  # loads the model once (not timed)
    audio, start = [], time.perf_counter()
    cpu0 = time.process_time()
    for i, text in enumerate(sentences):
        audio.append(synthetic.synthesise(text, piper_voices[i % len(piper_voices)], seed=i))
    corpus_seconds, corpus_cpu = time.perf_counter() - start, time.process_time() - cpu0
    audio_seconds = sum(a.size for a in audio) / synthetic.SAMPLE_RATE

    from piper import SynthesisConfig

    piper, _ = synthetic._PIPER_LOADED["en_US-joe-medium"]  # its session is the last one made
    start, raw_seconds = time.perf_counter(), 0.0
    for text in sentences:
        chunks = [c.audio_float_array for c in piper.synthesize(text, syn_config=SynthesisConfig())]
        raw_seconds += sum(c.size for c in chunks) / piper.config.sample_rate
    reused_seconds = time.perf_counter() - start

    rng = np.random.default_rng(0)
    transforms = [aug.SpeedPerturb(factors=(1.1,)), aug.Reverb(), aug.AddNoise(kinds=("pink",)), aug.BandLimit(),
                  aug.CodecRoundTrip(codecs=("vorbis",)), aug.CodecRoundTrip(codecs=("opus",)),
                  aug.CodecRoundTrip(codecs=("mp3",)), aug.Gain()]
    augment_rtf = {}
    for transform in transforms:
        start = time.perf_counter()
        for a in audio:
            transform(a.astype(np.float32), rng)
        label = transform.name if transform.name != "codec" else f"codec-{transform.codecs[0]}"
        augment_rtf[label] = (time.perf_counter() - start) / audio_seconds

    result = {
        "sentences": len(sentences), "audio_seconds": round(audio_seconds, 2),
        "corpus_path_seconds": round(corpus_seconds, 2), "corpus_path_rtf": round(corpus_seconds / audio_seconds, 3),
        "corpus_path_cpu_rtf": round(corpus_cpu / audio_seconds, 3),
        "reused_session_seconds": round(reused_seconds, 2),
        "reused_session_rtf": round(reused_seconds / raw_seconds, 3),
        "augment_rtf": {k: round(v, 4) for k, v in augment_rtf.items()},
        "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"Piper en_US-joe-medium, {len(sentences)} sentences, {audio_seconds:.1f} s of audio "
          f"(load average {result['load_average'][0]} on {os.cpu_count()} cores)")
    print(f"  corpus path (fresh seeded 1-thread session + soxr): {corpus_seconds:.2f} s, "
          f"RTF {result['corpus_path_rtf']} ({1 / result['corpus_path_rtf']:.1f}x real time)")
    print(f"  one reused session:                                 {reused_seconds:.2f} s, "
          f"RTF {result['reused_session_rtf']} ({1 / result['reused_session_rtf']:.1f}x real time)")
    print("  augmentation RTF per transform: " + ", ".join(f"{k} {v:.4f}" for k, v in augment_rtf.items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
