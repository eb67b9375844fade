"""``harmonifuse evaluate``: metrics, a markdown summary and plots for one model on manifests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from harmonifuse.atomic import atomic_write_text
from harmonifuse.config import to_yaml
from harmonifuse.data.manifest import read_manifest
from harmonifuse.evaluation.evaluate import evaluate, hidden_states_for, nonspeech_metrics
from harmonifuse.evaluation.metrics import mean_std
from harmonifuse.evaluation.plots import plot_confusion, plot_task_profiles, plot_training_curves
from harmonifuse.tasks import TASK_NAMES

SCALARS = ("wer", "cer", "wer_raw", "label_answers", "asr_confidence", "asr_flagged_no_speech", "wa", "ua",
           "macro_f1", "ser_confidence", "ser_ece", "ser_flagged_no_speech", "nonspeech_detected")


def split_by_task(utterances) -> dict[str, list]:
    """ASR utterances (with text) and SER utterances (with emotion) of one manifest."""
    return {task: [u for u in utterances if u.has_task(task)] for task in TASK_NAMES
            if any(u.has_task(task) for u in utterances)}


def markdown_table(rows: dict[str, dict], title: str, first_column: str = "manifest") -> str:
    columns = [c for c in SCALARS + ("n_asr", "n_ser") if any(c in r for r in rows.values())]
    lines = [f"## {title}", "", f"| {first_column} | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, metrics in rows.items():
        cells = []
        for c in columns:
            value = metrics.get(c)
            cells.append("" if value is None else str(value) if isinstance(value, (str, int)) else f"{value:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_evaluation(model, manifests: Sequence[Path], out_dir: Path | None = None, *, batch_size: int = 8,
                   folds: bool = False, cache=None, log_file: Path | None = None, progress: bool = True,
                   prompts: dict[str, str] | None = None, nonspeech: bool | dict = False) -> dict:
    """Evaluate each manifest (or their union); with ``folds``, also mean and std over manifests;
    with ``nonspeech``, also the built-in non-speech clips (``nonspeech_detected``): True scores
    them, a dict is their :func:`nonspeech_metrics` already computed (the demo shows them first)."""
    labels = model.config.tasks.emotion_labels
    loaded = {Path(m).name: read_manifest(m, labels=labels) for m in manifests}
    groups = loaded if folds or len(loaded) == 1 else {"all": [u for us in loaded.values() for u in us]}
    per_group, predictions = {}, {}
    for name, utterances in groups.items():
        result = evaluate(model, split_by_task(utterances), batch_size=batch_size, cache=cache, progress=progress,
                          prompts=prompts)
        per_group[name], predictions[name] = result["metrics"], result["predictions"]
    summary: dict = {"per_manifest": per_group} if len(per_group) > 1 else dict(next(iter(per_group.values())))
    if len(per_group) > 1:
        for key in SCALARS:
            values = [m[key] for m in per_group.values() if key in m]
            if values:
                summary[key], summary[f"{key}_std"] = mean_std(values)
    if nonspeech:
        clips = nonspeech if isinstance(nonspeech, dict) else nonspeech_metrics(model)
        summary["nonspeech_detected"], summary["n_nonspeech"] = clips["nonspeech_detected"], clips["n_nonspeech"]
        predictions["nonspeech"] = clips["clips"]
        if len(per_group) == 1:
            per_group[next(iter(per_group))]["nonspeech_detected"] = clips["nonspeech_detected"]
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2))
        # the evaluated model's complete config (decoding, detector, calibration): what produced these figures
        atomic_write_text(out_dir / "model_config.yaml", to_yaml(model.config))
        atomic_write_text(out_dir / "predictions.json", json.dumps(predictions, indent=2))
        rows = dict(per_group)
        if len(per_group) > 1:
            rows["mean ± std"] = {k: f"{summary[k]:.4f} ± {summary[k + '_std']:.4f}" for k in SCALARS if k in summary}
        text = markdown_table(rows, "HarmoniFuse evaluation")
        for name, metrics in per_group.items():
            if "per_speaker" in metrics:
                title = "Per speaker" + (f" ({name})" if len(per_group) > 1 else "")
                text += "\n" + markdown_table(metrics["per_speaker"], title, "speaker")
        plots = []
        first = next(iter(per_group.values()))
        if "confusion" in first:
            merged = [[sum(m["confusion"][i][j] for m in per_group.values() if "confusion" in m)
                       for j in range(len(labels))] for i in range(len(labels))]
            plots.append(plot_confusion(merged, labels, out_dir / "confusion.png"))
        any_utts = [u for us in loaded.values() for u in us][:batch_size]
        hidden, lengths = hidden_states_for(model, any_utts, cache)
        profiles = model.task_profiles(hidden, lengths, prompts)  # what the evaluated prompts read
        atomic_write_text(out_dir / "task_profiles.json", json.dumps(profiles))
        plots.append(plot_task_profiles(profiles, out_dir / "layer_weights_and_gates.png"))
        if log_file is not None:
            curve = plot_training_curves(log_file, out_dir / "training_curves.png")
            if curve:
                plots.append(curve)
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
        atomic_write_text(out_dir / "summary.md", text)
    return summary
