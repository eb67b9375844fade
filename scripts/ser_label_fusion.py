"""Emotion from both heads: the LLM's label scores joined with the projector's CTC label scores.

    python scripts/ser_label_fusion.py [--model M] [--corpus data/synthetic] [--out results/calibration]

The hybrid decoding that restrains the LLM's transcripts with the CTC head, asked of SER: each
label's score is (1 - w) log p_LLM(label) + w log p_CTC(label) (``HarmoniFuse.ctc_classify_hidden``),
for w from 0 (the shipped answer) to 1 (the CTC head alone), with the temperature refitted on dev
for each w. Writes ser_label_fusion.json; the label scores are kept in label_scores.pt (LLM, shared
with scripts/calibration_shift.py) and ctc_label_scores.pt, so a rerun with the same weights
scores nothing again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WEIGHTS = [round(0.1 * i, 1) for i in range(11)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--corpus", default="data/synthetic")
    parser.add_argument("--out", default="results/calibration")
    args = parser.parse_args(argv)

    import torch
    from sklearn.metrics import recall_score

    from harmonifuse.data.manifest import read_manifest
    from score_store import ScoreStore  # scripts/score_store.py

    from harmonifuse.evaluation.calibration import calibration_report, fit_temperature, label_scores
    from harmonifuse.evaluation.evaluate import map_batches
    from harmonifuse.model import HarmoniFuse

    model = HarmoniFuse.from_pretrained(args.model).eval()
    labels = list(model.config.tasks.emotion_labels)
    prompt = model.config.tasks.prompts["ser"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def ctc_scores(hidden, lengths):
        return [torch.tensor([p[label] for label in labels]).log()
                for p in model.ctc_classify_hidden(hidden, lengths, prompt)]

    # kept for these weights only; the LLM's are shared with scripts/calibration_shift.py
    stores = {"llm": ScoreStore(out / "label_scores.pt", model), "ctc": ScoreStore(out / "ctc_label_scores.pt", model)}
    scores = {head: store.scores for head, store in stores.items()}
    targets = {}
    for split in ("dev", "test"):
        utterances = read_manifest(Path(args.corpus) / f"ser_{split}.jsonl", labels=labels)
        targets[split] = torch.tensor([labels.index(u.emotion) for u in utterances])
        scorers = {"llm": lambda: label_scores(model, utterances),
                   "ctc": lambda: torch.stack(map_batches(model, utterances, ctc_scores, desc="CTC labels"))}
        for head, score in scorers.items():
            if split not in scores[head] or len(scores[head][split]) != len(utterances):
                scores[head][split] = score()
                stores[head].save()  # a killed run keeps what it scored

    log_probs = {head: {s: scores[head][s].float().log_softmax(-1) for s in targets} for head in scores}
    rows = []
    for w in WEIGHTS:
        joint = {s: (1 - w) * log_probs["llm"][s] + w * log_probs["ctc"][s] for s in targets}
        t = fit_temperature(joint["dev"], targets["dev"])
        row = {"ctc_weight": w, "temperature": round(t, 3)}
        for s in targets:
            row[f"{s}_ua"] = round(float(recall_score(targets[s], joint[s].argmax(-1), average="macro")), 4)
            row[f"{s}_ece"] = round(calibration_report(joint[s], targets[s], t)["ece"], 4)
        rows.append(row)
        print(json.dumps(row))
    chosen = max(rows, key=lambda r: (r["dev_ua"], -r["dev_ece"], -r["ctc_weight"]))
    report = {"chosen_on_dev": chosen["ctc_weight"], "rows": rows, "model": args.model or "shipped"}
    (out / "ser_label_fusion.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"chosen on dev (UA, then ECE): w = {chosen['ctc_weight']}: test UA {chosen['test_ua']}, "
          f"ECE {chosen['test_ece']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
