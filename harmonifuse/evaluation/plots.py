"""PNG plots: confusion matrix, per-task layer weights and gates, training curves."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harmonifuse.atomic import atomic_write  # noqa: E402


def plot_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str = "") -> Path:
    matrix = np.asarray(confusion, dtype=float)
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title or "SER confusion (counts; colour = row share)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # never a half-drawn PNG
    plt.close(fig)
    return path


def plot_task_profiles(profiles: Mapping[str, Mapping[str, Sequence[float]]], path: Path, title: str = "") -> Path:
    """Left: layer weights per task (bars side by side); right: sorted per-channel gate per task."""
    tasks = list(profiles)
    has_gate = any(profiles[t].get("gate") for t in tasks)
    fig, axes = plt.subplots(1, 2 if has_gate else 1, figsize=(10 if has_gate else 5.5, 3.6), squeeze=False)
    ax = axes[0, 0]
    n = len(profiles[tasks[0]]["layer_weights"])
    width = 0.8 / len(tasks)
    for k, task in enumerate(tasks):
        ax.bar(np.arange(n) + k * width - 0.4 + width / 2, profiles[task]["layer_weights"], width, label=task)
    ax.axhline(1 / n, color="gray", lw=0.8, ls="--", label="uniform")
    ax.set_xticks(range(n), ["emb"] + [str(i) for i in range(1, n)])
    ax.set_xlabel("encoder hidden state")
    ax.set_ylabel("fusion weight")
    ax.legend()
    ax.set_title("layer weights per task")
    if has_gate:
        ax = axes[0, 1]
        for task in tasks:
            gate = profiles[task].get("gate")
            if gate:
                ax.plot(np.sort(np.asarray(gate))[::-1], label=task)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="identity")
        ax.set_xlabel("feature channel (sorted)")
        ax.set_ylabel("mean gate value")
        ax.legend()
        ax.set_title("component gate per task")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # never a half-drawn PNG
    plt.close(fig)
    return path


def plot_training_curves(log_file: Path, path: Path) -> Path | None:
    """Training losses and dev metrics against training minutes, from a run's log.jsonl.

    Minutes, not steps: they run on across the alignment stage and the main stage (each counts
    its own steps). The alignment stage's CTC loss and greedy-CTC dev WER are drawn apart.
    """
    if not Path(log_file).is_file():
        return None
    kinds: dict[str, list[dict]] = {}
    for line in Path(log_file).read_text().splitlines():
        record = json.loads(line)
        kinds.setdefault(record.get("kind", "train"), []).append(record)

    def x(record):
        return record.get("minutes", record["step"])

    x_label = "training minutes" if all("minutes" in r for rs in kinds.values() for r in rs) else "step"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    train = kinds.get("train", [])
    for key in sorted({k for r in train for k in r if k.startswith("loss_")}):
        axes[0].plot(*zip(*[(x(r), r[key]) for r in train if key in r]), label=key.removeprefix("loss_"))
    align = [r for r in kinds.get("align", []) if "loss_ctc" in r]
    if align:
        axes[0].plot(*zip(*[(x(r), r["loss_ctc"]) for r in align]), label="ctc (alignment stage)", color="grey")
    axes[0].set_yscale("log")
    axes[0].set_xlabel(x_label)
    axes[0].set_ylabel("training loss")
    axes[0].legend()
    series = [("dev", "wer", "dev WER", "C0", "-"), ("dev", "ua", "dev UA", "C1", "-"),
              ("align_dev", "wer", "dev WER, greedy CTC (alignment)", "C0", "--"),
              ("align_dev", "ua", "dev UA, CTC label scoring (alignment)", "C1", "--")]
    for kind, key, label, color, style in series:  # a metric keeps its colour across the two stages
        points = [(x(r), r[key]) for r in kinds.get(kind, []) if key in r]
        if points:
            axes[1].plot(*zip(*points), marker="o", label=label, color=color, linestyle=style)
    if align:
        for ax in axes:
            ax.axvline(x(align[-1]), color="grey", linestyle=":", linewidth=1)
    axes[1].set_xlabel(x_label)
    axes[1].set_ylim(0, 1.05)
    axes[1].legend()
    axes[1].set_title("dev metrics")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # never a half-drawn PNG
    plt.close(fig)
    return path
