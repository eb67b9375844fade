"""Score candidate models side by side on the dev subset a training run scores, and on the real ten.

    python scripts/score_candidates.py --out results/candidates harmonifuse-demo runs/a/best runs/soup

For choosing among models that no single run compared, such as a run's best and weight averages
of several runs (``harmonifuse average``): each model is scored on the same spread sample of dev
that the trainer scores (``--dev-limit`` per task, :func:`spread_sample`), with the score the
trainer keeps the best model by ((1 - WER) + UA) / 2, in float32 (the trainer's dev evaluation runs
under the run's precision, bf16 autocast on CPUs that have it, so its figures differ in the third
digit). The real recordings are scored through the answers and through the CTC head alone. One
JSON file per model in ``--out``; a model already scored there is skipped, so an interrupted
comparison continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders or the shipped model's name")
    parser.add_argument("--out", required=True, help="folder for one JSON file per model")
    parser.add_argument("--dev", default="data/synthetic-wide", help="folder holding asr_dev.jsonl and ser_dev.jsonl")
    parser.add_argument("--dev-limit", type=int, default=100, help="utterances per task (the recipes' data.dev_limit)")
    parser.add_argument("--real", default="data/real/pocketsphinx_real.jsonl", help="the real recordings' manifest")
    args = parser.parse_args(argv)

    import torch

    from harmonifuse.data.manifest import read_manifest
    from harmonifuse.evaluation.evaluate import evaluate, evaluate_ctc
    from harmonifuse.evaluation.metrics import dev_score
    from harmonifuse.model import HarmoniFuse
    from harmonifuse.training.loaders import spread_sample

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        path = Path(name)
        target = out / f"{path.parent.name if path.name == 'best' else path.name}.json"
        if target.exists():
            print(target.read_text().strip())
            continue
        model = HarmoniFuse.from_pretrained(name).eval()
        labels = model.config.tasks.emotion_labels
        dev = {task: spread_sample(read_manifest(Path(args.dev) / f"{task}_dev.jsonl", labels=labels), args.dev_limit)
               for task in ("asr", "ser")}
        real = {"asr": read_manifest(args.real, labels=labels)}
        with torch.inference_mode():
            on_dev = evaluate(model, dev, progress=False)["metrics"]
            on_real = evaluate(model, real, progress=False)["metrics"]
            ctc_real = evaluate_ctc(model, real, progress=False)["metrics"]
        scores = {"model": name, "dev_wer": on_dev["wer"], "dev_ua": on_dev["ua"],
                  "dev_score": dev_score(on_dev),
                  "real_wer": on_real["wer"], "real_ctc_wer": ctc_real["wer"]}
        target.write_text(json.dumps(scores) + "\n")
        print(json.dumps(scores), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
