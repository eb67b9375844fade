"""Which clips should the emotion temperature be fitted on: clean dev, perturbed dev, or both?

Temperature scaling fitted on clean dev stays too sure on the test split, whose voices are unseen
and harder. Post-hoc calibration under domain drift (Tomani et al., CVPR 2021) fits it on copies
of dev passed through graded perturbations (harmonifuse.evaluation.calibration.DRIFT). This script
scores the model's emotion labels on dev, on each perturbed copy of dev and on test, then

- chooses the fitting set on dev alone: each dev voice in turn is held out, the temperature is
  fitted on the other voices' clips (clean, perturbed or both) and the held-out voice's clean
  ECE is measured; the set with the lowest mean held-out ECE wins;
- reports the test ECE of a temperature fitted on all of dev for each set (test is looked at last).

    python scripts/calibration_shift.py [--model harmonifuse-demo] [--out results/calibration]

Writes calibration_shift.json and the label scores (label_scores.pt, reused by a rerun) to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from harmonifuse.data.manifest import read_manifest
from score_store import ScoreStore

from harmonifuse.evaluation.calibration import (DRIFT, calibration_report, drifted, fit_temperature, label_scores,
                                                load_clips)
from harmonifuse.evaluation.metrics import ser_metrics
from harmonifuse.model import HarmoniFuse

ROOT = Path(__file__).resolve().parents[1]
FIT_SETS = {"dev": ["dev"], "drift": list(DRIFT), "dev+drift": ["dev", *DRIFT]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="harmonifuse-demo")
    parser.add_argument("--corpus", default=str(ROOT / "data" / "synthetic"))
    parser.add_argument("--out", default=str(ROOT / "results" / "calibration"))
    args = parser.parse_args(argv)
    model = HarmoniFuse.from_pretrained(args.model)  # a folder or the shipped model's name
    labels = model.config.tasks.emotion_labels
    corpus, out = Path(args.corpus), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = read_manifest(corpus / "ser_dev.jsonl", labels=labels)
    test = read_manifest(corpus / "ser_test.jsonl", labels=labels)
    store = ScoreStore(out / "label_scores.pt", model)  # kept for these weights only
    scores = store.scores
    waves = None  # dev's audio, read once for every perturbation
    for name in ["dev", *DRIFT, "test"]:
        if name not in scores:
            if name in DRIFT and waves is None:
                waves = load_clips(dev)
            utts = test if name == "test" else dev if name == "dev" else drifted(dev, name, waves=waves)
            scores[name] = label_scores(model, utts)
            store.save()
    dev_targets = torch.tensor([labels.index(u.emotion) for u in dev])
    test_targets = torch.tensor([labels.index(u.emotion) for u in test])
    voices = sorted({u.speaker for u in dev})
    speaker = [u.speaker for u in dev]

    def fit(parts: list[str], keep: torch.Tensor) -> float:
        return fit_temperature(torch.cat([scores[p][keep] for p in parts]),
                               dev_targets[keep].repeat(len(parts)))

    selection = {}
    for fit_name, parts in FIT_SETS.items():
        held_out = {}
        for voice in voices:
            keep = torch.tensor([s != voice for s in speaker])
            t = fit(parts, keep)
            held_out[voice] = calibration_report(scores["dev"][~keep], dev_targets[~keep], t)["ece"]
        selection[fit_name] = {"held_out_voice_ece": held_out,
                               "mean": sum(held_out.values()) / len(held_out)}
    chosen = min(selection, key=lambda k: selection[k]["mean"])
    everything = torch.ones(len(dev), dtype=torch.bool)
    on_test = {}
    for fit_name, parts in {**FIT_SETS, "test (oracle)": None}.items():
        t = fit_temperature(scores["test"], test_targets) if parts is None else fit(parts, everything)
        on_test[fit_name] = {"temperature": round(t, 4), **calibration_report(scores["test"], test_targets, t)}
    sets = {}
    for name, s in scores.items():
        targets = test_targets if name == "test" else dev_targets
        predicted = [labels[i] for i in s.argmax(-1).tolist()]
        sets[name] = {"n": len(targets), "accuracy": float((s.argmax(-1) == targets).float().mean()),
                      "ua": ser_metrics([labels[i] for i in targets.tolist()], predicted, labels)["ua"]}
    summary = {"model": args.model, "sets": sets, "selection_on_dev": selection, "chosen": chosen,
               "test": on_test}
    (out / "calibration_shift.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, row in sets.items():
        print(f"{name:12s} n={row['n']:4d} accuracy {row['accuracy']:.3f}")
    print("fitting set   held-out dev voice ECE (mean)   T on all dev   test ECE")
    for fit_name in FIT_SETS:
        print(f"{fit_name:12s}  {selection[fit_name]['mean']:.3f}{' (chosen)' if fit_name == chosen else '':>20s}"
              f"   {on_test[fit_name]['temperature']:.3f}         {on_test[fit_name]['ece']:.3f}")
    print(f"test (oracle)                                  {on_test['test (oracle)']['temperature']:.3f}"
          f"         {on_test['test (oracle)']['ece']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
