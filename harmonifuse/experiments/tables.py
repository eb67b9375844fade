"""An experiment's table (mean ± std over seeds) and plots, from its per-run result files."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harmonifuse.atomic import atomic_write, atomic_write_text  # noqa: E402
from harmonifuse.evaluation.metrics import mean_std  # noqa: E402
from harmonifuse.experiments.spec import ExperimentSpec, run_result_path  # noqa: E402

METRICS = (("wer", "WER"), ("cer", "CER"), ("wa", "WA"), ("ua", "UA"), ("macro_f1", "macro-F1"),
           ("label_answers", "ASR label answers"))


def load_results(spec: ExperimentSpec, results_dir: Path) -> dict[str, list[dict]]:
    """Arm name -> its finished runs (seed order), for the arms of ``spec`` only."""
    paths = {arm.name: [run_result_path(results_dir, arm.name, seed) for seed in spec.seeds] for arm in spec.arms}
    return {arm: [json.loads(p.read_text()) for p in arm_paths if p.is_file()] for arm, arm_paths in paths.items()}


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f}" if len(values) > 1 else f"{mean:.3f}"


def _setup(run: dict) -> str:
    """The machine and precision that trained a run: minutes and numerics depend on both."""
    return f"{run['hardware']}, {run['precision']}" if run.get("hardware") else "not recorded"


def _hardware_lines(results: dict[str, list[dict]]) -> list[str]:
    seeds_by_setup: dict[str, set[int]] = {}
    for runs in results.values():
        for r in runs:
            seeds_by_setup.setdefault(_setup(r), set()).add(r["seed"])
    if not seeds_by_setup:
        return []
    return ["Trained on: " + "; ".join(f"{setup} (seeds {', '.join(map(str, sorted(seeds)))})"
                                      for setup, seeds in sorted(seeds_by_setup.items())) + "."]


def table_markdown(spec: ExperimentSpec, results: dict[str, list[dict]], source: str = "") -> str:
    done = sum(len(r) for r in results.values())
    total = len(spec.arms) * len(spec.seeds)
    minutes = sum(r["train_minutes"] + r["eval_minutes"] for runs in results.values() for r in runs)
    wall = sum(r.get("wall_minutes", 0.0) for runs in results.values() for r in runs)
    ev = spec.evaluation
    lines = [f"# Experiment `{spec.name}`", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    lines += [
        f"Runs finished: {done} of {total} ({len(spec.arms)} arms x seeds {spec.seeds}); "
        f"{minutes:.1f} minutes of training and scoring in all"
        + (f", {wall:.1f} minutes of wall time with model loading and resumed work." if wall else "."),
        *_hardware_lines(results),
        f"Shared budget and settings: `{' '.join(spec.overrides) or '(base config)'}` on `{spec.base}`.",
        f"Scored on the {ev.split} split"
        + (f" ({ev.limit} utterances per task, a fixed spread-out subset)" if ev.limit else "")
        + (" through the projector's embedding-CTC head, without the LLM (greedy transcripts; "
           "label words scored by their CTC likelihood)" if ev.scorer == "ctc" else "")
        + "; mean ± sample std over seeds. WER/CER: lower is better; WA/UA/macro-F1: higher is better; "
        "ASR label answers (ASR answers that begin with an emotion label, i.e. task confusion): lower is better. "
        "Rows marked *paraphrased prompts* score the same models with task prompts never seen in training"
        + (": " + "; ".join(f"{t.upper()}: \"{p}\"" for t, p in ev.paraphrases.items()) if ev.paraphrases else "")
        + ".",
        "",
        "| arm | seeds | steps | train min | " + " | ".join(name for _, name in METRICS) + " |",
        "|---|---|---|---|" + "---|" * len(METRICS),
    ]
    for arm in spec.arms:
        runs = results.get(arm.name, [])
        if not runs:
            lines.append(f"| {arm.title} | 0/{len(spec.seeds)} | | | " + " | ".join("" for _ in METRICS) + " |")
            continue
        # "250 + 200": alignment-stage steps + main steps, for runs that had an alignment stage
        steps = sorted({f"{r['align_steps']} + {r['steps']}" if r.get("align_steps") else str(r["steps"])
                        for r in runs})
        minutes = [r["train_minutes"] for r in runs]
        # a mean over different machines describes none of them: show the range instead
        mixed = len({_setup(r) for r in runs}) > 1
        train_min = f"{min(minutes):.1f}-{max(minutes):.1f}" if mixed else f"{np.mean(minutes):.1f}"
        cells = [_cell([r["metrics"][k] for r in runs if k in r["metrics"]]) for k, _ in METRICS]
        lines.append(f"| {arm.title} | {len(runs)}/{len(spec.seeds)} | {'/'.join(steps)} | "
                     f"{train_min} | " + " | ".join(cells) + " |")
        if any("paraphrase_metrics" in r for r in runs):
            cells = [_cell([r["paraphrase_metrics"][k] for r in runs if k in r.get("paraphrase_metrics", {})])
                     for k, _ in METRICS]
            lines.append(f"| *{arm.title}, paraphrased prompts* | | | | " + " | ".join(cells) + " |")
    lines += ["", "![metric per arm](metrics_per_arm.png)", "", "![layer weights](layer_weights.png)", "",
              f"Regenerate: `harmonifuse experiment {source or '<experiment file>'}` (finished runs are kept; "
              f"`--report-only` redraws this page from {spec.results_dir}/{spec.name}/runs/).", ""]
    return "\n".join(lines)


def plot_metrics(spec: ExperimentSpec, results: dict[str, list[dict]], path: Path) -> Path:
    """WER and UA per arm: bar = mean over seeds, dots = seeds, hatched = paraphrased prompts.

    One row per arm with results, shared by both panels and named once, on the left (an arm
    without a task's metric leaves its row empty in that panel)."""
    panels = [("wer", "WER (lower is better)"), ("ua", "SER UA (higher is better)")]
    arms = [arm for arm in spec.arms if results.get(arm.name)]
    fig, axes = plt.subplots(1, 2, sharey=True, figsize=(12, max(3.5, 0.42 * len(arms) + 1.5)))
    for ax, (key, title) in zip(axes, panels):
        for y, arm in enumerate(arms):
            runs = results[arm.name]
            values = [r["metrics"][key] for r in runs if key in r["metrics"]]
            para = [r["paraphrase_metrics"][key] for r in runs if key in r.get("paraphrase_metrics", {})]
            if not values:
                continue
            ax.barh(y - 0.2, np.mean(values), height=0.38, color="tab:blue", alpha=0.8,
                    label="training prompts")
            ax.plot(values, [y - 0.2] * len(values), "k.", ms=6)
            if para:
                ax.barh(y + 0.2, np.mean(para), height=0.38, color="tab:orange", alpha=0.6, hatch="//",
                        label="paraphrased prompts")
                ax.plot(para, [y + 0.2] * len(para), "k.", ms=6)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    if arms:
        axes[0].set_yticks(range(len(arms)), [arm.title for arm in arms])
        axes[0].invert_yaxis()  # sharey: both panels list the arms top-down in the spec's order
    # every bar carries its label; one legend entry per label, for both panels, below them
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=9)
    fig.suptitle(f"{spec.name}: mean over seeds (bars) and each seed (dots)")
    fig.tight_layout(rect=(0, 0.07 if handles else 0, 1, 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # never a half-drawn PNG
    plt.close(fig)
    return path


def plot_layer_weights(spec: ExperimentSpec, results: dict[str, list[dict]], path: Path) -> Path:
    """One panel per arm: the encoder-layer weights ASR and SER use (mean over seeds), side by side."""
    arms = [arm for arm in spec.arms if results.get(arm.name)]
    cols = min(4, max(1, len(arms)))
    rows = max(1, -(-len(arms) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(arms):]:
        ax.axis("off")
    colours = {"asr": "tab:blue", "ser": "tab:red"}
    for ax, arm in zip(axes.flat, arms):
        runs = results[arm.name]
        tasks = [t for t in ("asr", "ser") if all(t in r["profiles"] for r in runs)]
        width = 0.8 / max(1, len(tasks))
        for k, task in enumerate(tasks):
            weights = np.mean([r["profiles"][task]["layer_weights"] for r in runs], axis=0)
            x = np.arange(len(weights))
            ax.bar(x + k * width - 0.4 + width / 2, weights, width, color=colours[task], label=task.upper())
            ax.set_xticks(x, ["emb"] + [str(i) for i in range(1, len(weights))], fontsize=7)
        if tasks:
            ax.axhline(1 / len(weights), color="gray", lw=0.8, ls="--")
        gates = [f"{t.upper()} {np.mean([r['profiles'][t]['gate_mean'] for r in runs]):.2f}" for t in tasks
                 if all("gate_mean" in r["profiles"][t] for r in runs)]
        ax.set_title(arm.title + (f"\ngate mean: {', '.join(gates)}" if gates else ""), fontsize=8)
        ax.legend(fontsize=7)
    fig.supxlabel("encoder hidden state")
    fig.supylabel("fusion weight")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # never a half-drawn PNG
    plt.close(fig)
    return path


def write_report(spec: ExperimentSpec, results_dir: Path, source: str = "") -> Path:
    """table.md, metrics_per_arm.png and layer_weights.png in ``results_dir``; returns table.md."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    results = load_results(spec, results_dir)
    plot_metrics(spec, results, results_dir / "metrics_per_arm.png")
    plot_layer_weights(spec, results, results_dir / "layer_weights.png")
    # several runners may share one experiment
    return atomic_write_text(results_dir / "table.md", table_markdown(spec, results, source))
