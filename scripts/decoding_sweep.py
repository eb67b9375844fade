"""Joint CTC/LLM decoding: WER for each CTC weight on dev, test, a paraphrased prompt and real speech.

    python scripts/decoding_sweep.py [--model DIR] [--weights 0,0.3,0.5,0.7] [--beam 4]

Every piece (split x setting) is stored in OUT/sweep.json as it finishes, so an interrupted sweep
continues where it stopped; OUT/table.md and OUT/wer_by_ctc_weight.png are redrawn at the end.
Each number equals ``harmonifuse evaluate --model DIR --manifest M --set decoding.beam_size=B
--set decoding.ctc_weight=W`` on the same utterances.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARAPHRASE = "Write down what is said."


def _splits(args) -> dict[str, tuple[list, str | None]]:
    from harmonifuse.data.manifest import read_manifest
    from harmonifuse.training.loaders import spread_sample

    corpus = Path(args.corpus)
    test = read_manifest(corpus / "asr_test.jsonl")
    test = spread_sample(test, args.test_limit) if args.test_limit else test
    splits = {"dev": (spread_sample(read_manifest(corpus / "asr_dev.jsonl"), args.dev_limit), None),
              "test": (test, None),
              "test, paraphrased prompt": (spread_sample(test, args.paraphrase_limit), PARAPHRASE)}
    if Path(args.real).is_file():
        splits["real (10 recordings)"] = (read_manifest(args.real), None)
    return splits


def _per_utterance_wer(predictions: list[dict]) -> list[float]:
    from harmonifuse.evaluation.metrics import asr_metrics

    return [asr_metrics([p["reference"]], [p["hypothesis"]])["wer"] for p in predictions]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--corpus", default=str(ROOT / "data" / "synthetic"))
    parser.add_argument("--real", default=str(ROOT / "data" / "real" / "pocketsphinx_real.jsonl"))
    parser.add_argument("--out", default=str(ROOT / "results" / "decoding"))
    parser.add_argument("--weights", default="0,0.3,0.5,0.7")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--dev-limit", type=int, default=100)
    parser.add_argument("--test-limit", type=int, default=0, help="0: the whole test split")
    parser.add_argument("--paraphrase-limit", type=int, default=100)
    parser.add_argument("--only", help="comma separated split names to run")
    args = parser.parse_args(argv)

    from scipy.stats import spearmanr

    from harmonifuse.atomic import atomic_write_text
    from harmonifuse.inference.loading import load_model
    from harmonifuse.pretrained import resolve_model
    from harmonifuse.config import to_yaml
    from harmonifuse.evaluation.evaluate import evaluate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "sweep.json"
    done = json.loads(store.read_text()) if store.is_file() else {}
    model = load_model(resolve_model(args.model))
    model.eval()
    atomic_write_text(out / "model_config.yaml", "# each row of sweep.json overrides model.decoding (beam_size, ctc_weight)\n"
                      + to_yaml(model.config))
    settings = [("greedy", 1, 0.0)] + [(f"beam {args.beam}, w={w}", args.beam, float(w))
                                       for w in args.weights.split(",")]
    splits = _splits(args)
    if args.only:
        splits = {k: v for k, v in splits.items() if k.split(",")[0].split(" ")[0] in args.only.split(",")}
    for split, (utterances, prompt) in splits.items():
        for name, beam, weight in settings:
            key = f"{split} | {name}"
            if key in done:
                continue
            model.config.decoding.beam_size, model.config.decoding.ctc_weight = beam, weight
            start = time.time()
            result = evaluate(model, {"asr": utterances}, prompts={"asr": prompt} if prompt else None)
            metrics, predictions = result["metrics"], result["predictions"]["asr"]
            rho = spearmanr([p["confidence"] for p in predictions], _per_utterance_wer(predictions)).statistic
            done[key] = {"split": split, "setting": name, "beam_size": beam, "ctc_weight": weight,
                         "wer": metrics["wer"], "cer": metrics["cer"], "n": len(utterances),
                         "confidence": metrics["asr_confidence"], "spearman_confidence_wer": float(rho),
                         "seconds": round(time.time() - start, 1),
                         "examples": [{k: p[k] for k in ("reference", "hypothesis", "confidence")}
                                      for p in predictions[:5]]}
            atomic_write_text(store, json.dumps(done, indent=1))
            print(f"{key}: WER {metrics['wer']:.3f}  CER {metrics['cer']:.3f}  confidence {metrics['asr_confidence']:.3f}"
                  f"  rho {rho:.2f}  ({done[key]['seconds']} s)", flush=True)
    _report(done, out)
    return 0


def _report(done: dict, out: Path) -> None:
    import matplotlib

    from harmonifuse.atomic import atomic_write, atomic_write_text

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(v["split"] for v in done.values()))
    settings = list(dict.fromkeys(v["setting"] for v in done.values()))
    lines = ["| setting | " + " | ".join(f"{s} (n={next(v['n'] for v in done.values() if v['split'] == s)})"
                                          for s in splits) + " |", "|---|" + "---|" * len(splits)]
    for setting in settings:
        cells = []
        for split in splits:
            v = done.get(f"{split} | {setting}")
            cells.append(f"{v['wer']:.3f} (conf. {v['confidence']:.2f}, ρ {v['spearman_confidence_wer']:.2f})"
                         if v else "")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    atomic_write_text(out / "table.md", "WER (mean transcript confidence, Spearman ρ of confidence against the "
                                  "utterance's WER)\n\n" + "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split in splits:
        points = sorted((v["ctc_weight"], v["wer"]) for v in done.values()
                        if v["split"] == split and v["beam_size"] > 1)
        greedy = done.get(f"{split} | greedy")
        line, = ax.plot(*zip(*points), marker="o", label=split) if points else (None,)
        if greedy and line is not None:
            ax.axhline(greedy["wer"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("CTC weight w (beam search); dotted: greedy LLM decoding")
    ax.set_ylabel("WER")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out / "wer_by_ctc_weight.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    print((out / "table.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
