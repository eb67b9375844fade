"""The main job (``make demo``): the shipped model on real recordings and on the built-in test split.

1. builds the built-in synthetic corpus into ``data/synthetic`` if it is missing;
2. runs ``analyze`` on the real LibriVox recordings of Debian's pocketsphinx-testdata and on a few
   test-split clips (unseen voices, unseen sentences);
3. evaluates the model on a fixed spread-out subset of the test split (100 utterances per task;
   ``--limit 0`` for all of it) and writes ``results/demo/`` (metrics, summary, plots).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .cli import DEMO_MODEL, REPO_ROOT, default_model, load_model

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"model folder (default: {DEMO_MODEL.relative_to(REPO_ROOT)})")
    parser.add_argument("--corpus", default=str(REPO_ROOT / "data" / "synthetic"))
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "demo"))
    parser.add_argument("--limit", type=int, default=100,
                        help="evaluate on a fixed spread-out subset of N utterances per task, so the demo stays "
                             "within 5 minutes on 2 CPU cores without bf16 units (0: the whole split)")
    args = parser.parse_args(argv)
    start = time.time()

    from .data.manifest import read_manifest
    from .evaluation.report import SCALARS, markdown_table, run_evaluation

    corpus = Path(args.corpus)
    if not (corpus / "asr_test.jsonl").is_file():
        from .data.synthetic import prepare

        print(f"== building the built-in synthetic corpus in {corpus} (once, a few minutes)")
        prepare(corpus)

    model_dir = args.model or default_model()
    model = load_model(model_dir)
    model.eval()

    print("\n== real recordings (LibriVox, pocketsphinx-testdata)")
    real = sorted(LIBRIVOX.glob("*.wav")) if LIBRIVOX.is_dir() else []
    if not real:
        print("   (not installed: apt-get install pocketsphinx-testdata)")
    for path, result in zip(real, model.analyze([str(p) for p in real]) if real else []):
        print(f"{path.name}\n  transcript: {result['transcript']}\n  emotion:    {result['emotion']}")
    reference = LIBRIVOX / "transcription"
    if reference.is_file():
        print("  (reference transcripts: " + str(reference) + ")")

    print("\n== test-split clips (unseen voices and sentences; emotion is synthetic, prosody by rule)")
    asr_test = read_manifest(corpus / "asr_test.jsonl")
    ser_test = read_manifest(corpus / "ser_test.jsonl")
    picks = asr_test[:2] + [ser_test[i] for i in range(0, len(ser_test), max(1, len(ser_test) // 4))][:4]
    for utt, result in zip(picks, model.analyze([u.audio for u in picks])):
        truth = f"text: {utt.text}" if utt.text else f"emotion: {utt.emotion}"
        print(f"{Path(utt.audio).name}  [{truth}]\n  transcript: {result['transcript']}\n"
              f"  emotion:    {result['emotion']}  ({json.dumps(result['emotion_probs'])})")

    manifests = [corpus / "asr_test.jsonl", corpus / "ser_test.jsonl"]
    if args.limit:
        from .data.manifest import write_manifest
        from .training.data import spread_sample

        print(f"\n== evaluation on the test split ({args.limit} utterances per task, a fixed spread-out subset;"
              " --limit 0 for all)")
        limited = Path(args.out) / "limited"
        limited.mkdir(parents=True, exist_ok=True)
        for m in list(manifests):
            write_manifest(limited / m.name, spread_sample(read_manifest(m), args.limit))
        manifests = [limited / m.name for m in manifests]
    else:
        print("\n== evaluation on the test split")
    log = Path(model_dir) / "log.jsonl" if model_dir else None
    summary = run_evaluation(model, manifests, Path(args.out), batch_size=8,
                             log_file=log if log and log.is_file() else None)
    print("\n| metric | value |\n|---|---|")
    for key in SCALARS:
        if key in summary:
            print(f"| {key} | {summary[key]:.4f} |")
    if "per_speaker" in summary:
        print("\n" + markdown_table(summary["per_speaker"], "Per test voice", "speaker"))
    print(f"\nreport and plots: {Path(args.out) / 'summary.md'}   ({(time.time() - start) / 60:.1f} min)")
    if model_dir is None:
        print("note: the model was UNTRAINED (no models/harmonifuse-demo); train one with "
              "`harmonifuse train configs/demo.yaml`", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
