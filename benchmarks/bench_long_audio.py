"""Long recordings: accuracy on a 3-minute recording, and memory and speed up to 2 hours.

    python benchmarks/bench_long_audio.py [--model DIR] [--hours 2] [--skip-long]

1. Accuracy: test-split clips joined with 1-2 s pauses (a low noise floor between them) into a
   recording of about 3 minutes. ``analyze`` must return every clip as a segment; the joined WER
   is set beside the WER of the same clips answered one by one, every segment boundary beside the
   true one, and the SRT output is parsed with the ``srt`` package.
2. Memory and speed: a 30-second and a long recording (``--hours``, default 2) built the same way
   but with one clip per minute (mostly quiet, as a meeting or lecture recording between
   speakers), each answered by ``harmonifuse analyze`` in its own process: peak resident memory
   while answering (ratio long / 30 s, goal <= 1.5; sampled every 50 ms after loading the model and
   answering one short clip) and audio seconds per second. The files are written block by
   block, never held whole in memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
RATE = 16000

CHILD = """
import json, os, sys, threading, time
from harmonifuse.model import HarmoniFuse

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

model = HarmoniFuse.from_pretrained(sys.argv[2] or None).eval()
model.analyze(sys.argv[3])  # warm up on a short clip: first-call allocations are not the recording's
loaded, peak, done = rss_mb(), [rss_mb()], threading.Event()

def watch():
    while not done.wait(0.05):
        peak[0] = max(peak[0], rss_mb())

watcher = threading.Thread(target=watch)
watcher.start()
start = time.time()
result = model.analyze(sys.argv[1])
done.set(); watcher.join()
print(json.dumps({"seconds": time.time() - start, "rss_before_mb": loaded, "peak_rss_mb": max(peak[0], rss_mb()),
                  "segments": len(result.get("segments", [])), "duration": result["duration"]}))
"""


def _clips(corpus: Path, count: int) -> list:
    from harmonifuse.data.manifest import read_manifest

    utterances = read_manifest(corpus / "asr_test.jsonl")
    return utterances[:: max(1, len(utterances) // count)][:count]


def write_recording(path: Path, clips, *, seconds: float | None = None, spacing: float | None = None,
                    seed: int = 0) -> list[tuple[float, float]]:
    """Write clips with pauses (1-2 s, or one clip per ``spacing`` seconds) over a -60 dBFS noise
    floor, block by block; returns each clip's true (start, end) in seconds."""
    from harmonifuse.audio import load_audio

    rng = np.random.default_rng(seed)
    truth, t = [], 0.0
    with sf.SoundFile(path, "w", samplerate=RATE, channels=1, subtype="PCM_16") as out:
        def pause(duration: float) -> None:
            nonlocal t
            n = int(duration * RATE)
            for start in range(0, n, RATE * 60):
                out.write((rng.standard_normal(min(RATE * 60, n - start)) * 1e-3).astype(np.float32))
            t += n / RATE

        k = 0
        while True:
            clip = clips[k % len(clips)]
            wave = load_audio(clip.audio)
            gap = rng.uniform(1.0, 2.0) if spacing is None else max(1.0, spacing - len(wave) / RATE)
            if seconds is not None and t + gap + len(wave) / RATE + 1.0 > seconds:
                break
            pause(gap)
            out.write(wave)
            truth.append((t, t + len(wave) / RATE))
            t += len(wave) / RATE
            k += 1
            if seconds is None and k == len(clips):
                break
        pause(1.0 if seconds is None else max(0.0, seconds - t))
    return truth


def accuracy(model_dir: str | None, corpus: Path, work: Path) -> dict:
    import srt

    from harmonifuse import formats
    from harmonifuse.evaluation.metrics import asr_metrics
    from harmonifuse.model import HarmoniFuse

    clips = _clips(corpus, 45)
    path = work / "three_minutes.wav"
    truth = write_recording(path, clips)
    model = HarmoniFuse.from_pretrained(model_dir).eval()
    start = time.time()
    result = model.analyze(str(path), tasks=("asr",), progress=True)
    seconds = time.time() - start
    one_by_one = model.analyze([c.audio for c in clips], tasks=("asr",))
    segments = result["segments"]
    matched = [min(segments, key=lambda s: abs(s["start"] - a) + abs(s["end"] - b)) for a, b in truth]
    errors = [max(abs(s["start"] - a), abs(s["end"] - b)) for s, (a, b) in zip(matched, truth)]
    within = float(np.mean([e <= 0.5 for e in errors]))
    cues = list(srt.parse(formats.to_srt(result)))
    return {"duration": result["duration"], "clips": len(clips), "segments": len(segments),
            "joined_wer": asr_metrics([" ".join(c.text for c in clips)], [result["transcript"]])["wer"],
            "per_clip_wer": asr_metrics([c.text for c in clips], [r["transcript"] for r in one_by_one])["wer"],
            "boundary_error_max": max(errors), "boundary_error_mean": float(np.mean(errors)),
            "boundaries_within_0.5s": within,
            "srt_cues": len(cues), "seconds": seconds}


def memory(model_dir: str | None, corpus: Path, work: Path, hours: float) -> dict:
    clips = _clips(corpus, 60)
    rows = {}
    for name, seconds in (("30 s", 30.0), (f"{hours:g} h", hours * 3600)):
        path = work / f"{name.replace(' ', '')}.wav"
        write_recording(path, clips, seconds=seconds, spacing=60.0 if seconds > 60 else 12.0)
        command = [sys.executable, "-c", CHILD, str(path), model_dir or "", clips[0].audio]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        rows[name]["audio_seconds_per_second"] = rows[name]["duration"] / rows[name]["seconds"]
        path.unlink()
    short, long = rows["30 s"], rows[f"{hours:g} h"]
    return {"rows": rows, "peak_rss_ratio": long["peak_rss_mb"] / short["peak_rss_mb"],
            "growth_ratio": (long["peak_rss_mb"] - long["rss_before_mb"]) / max(1.0, short["peak_rss_mb"] - short["rss_before_mb"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--corpus", default=str(ROOT / "data" / "synthetic"))
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--skip-long", action="store_true", help="only the 3-minute accuracy check")
    parser.add_argument("--out", default=str(ROOT / "results" / "long_audio.json"))
    args = parser.parse_args(argv)
    corpus = Path(args.corpus)
    if not (corpus / "asr_test.jsonl").is_file():
        raise SystemExit(f"no built-in corpus at {corpus}: run `harmonifuse prepare synthetic {corpus}` first")
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        report["accuracy"] = accuracy(args.model, corpus, Path(tmp))
        print(json.dumps(report["accuracy"], indent=1), flush=True)
        if not args.skip_long:
            report["memory"] = memory(args.model, corpus, Path(tmp), args.hours)
            print(json.dumps(report["memory"], indent=1), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
