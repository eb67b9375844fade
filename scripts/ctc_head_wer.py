"""WER of the projector's CTC head alone (greedy, no LLM pass) of models on manifests: how well the
front end reads the audio, cheap enough to run on every split.

    python scripts/ctc_head_wer.py --model harmonifuse-demo --model runs/real-speech-align/best \
        data/real-speech/real_asr_test.jsonl data/real-speech/real_asr_dev.jsonl \
        data/real/pocketsphinx_real.jsonl data/synthetic-wide/asr_test.jsonl

Prints one JSON line per model and manifest.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifests", nargs="+")
    parser.add_argument("--model", action="append", required=True, help="model folder or name (repeatable)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    from harmonifuse.data.manifest import read_manifest
    from harmonifuse.evaluation.evaluate import ctc_asr_metrics
    from harmonifuse.model import HarmoniFuse

    for name in args.model:
        model = HarmoniFuse.from_pretrained(name).eval()
        for manifest in args.manifests:
            utterances = [u for u in read_manifest(manifest) if u.text]
            metrics = ctc_asr_metrics(model, utterances, batch_size=args.batch_size, progress=False)
            print(json.dumps({"model": name, "manifest": manifest, "n": len(utterances),
                              "wer": round(metrics["wer"], 4), "cer": round(metrics["cer"], 4)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
