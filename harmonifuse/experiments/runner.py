"""``harmonifuse experiment FILE``: train every arm x seed (resumably), score it, then table and plot.

Resumable across sessions at two levels: a scored run leaves ``results/<name>/runs/<arm>/seed<k>.json``
and is never run again; an interrupted training continues from its newest checkpoint. Every arm
reads the same feature cache (it is keyed by the encoder, not by the arm).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from harmonifuse.atomic import atomic_write_text
from harmonifuse.config import to_yaml
from harmonifuse.config.run import RunConfig
from harmonifuse.data.manifest import Utterance
from harmonifuse.evaluation.evaluate import evaluate, evaluate_ctc, hidden_states_for
from harmonifuse.experiments.spec import ArmSpec, EvaluationSpec, ExperimentSpec, arm_config, run_result_path
from harmonifuse.experiments.tables import write_report
from harmonifuse.training.hardware import choose_precision
from harmonifuse.training.loaders import feature_cache_for, read_split, spread_sample

log = logging.getLogger(__name__)
FINISHED = ("max_steps", "max_minutes", "early_stop")
# evaluation.scorer -> evaluate(model, {task: utterances}, batch_size=, cache=, prompts=, progress=)
SCORERS = {"llm": evaluate, "ctc": evaluate_ctc}


class ExperimentInterrupted(RuntimeError):
    """A run was stopped by a signal; its checkpoint is saved and the experiment resumes from it."""


def evaluation_utterances(config: RunConfig, evaluation: EvaluationSpec) -> dict[str, list[Utterance]]:
    """The arm's tasks (those it trains on) from the chosen split, each cut to ``evaluation.limit``."""
    split = config.data.test if evaluation.split == "test" else config.data.dev
    tasks = {task: split[task] for task in config.data.train if task in split}
    missing = sorted(set(config.data.train) - set(tasks))
    if missing:
        raise FileNotFoundError(f"data.{evaluation.split} has no manifest for task(s) {missing}")
    utterances = read_split(Path(config.data.root), tasks, config.model.tasks.emotion_labels)
    for task, path in tasks.items():
        if not utterances.get(task):
            raise FileNotFoundError(f"{Path(config.data.root) / path}: no {task} utterances to evaluate on")
    if evaluation.limit:
        utterances = {task: spread_sample(utts, evaluation.limit) for task, utts in utterances.items()}
    return utterances


def score_run(config: RunConfig, model_dir: Path, evaluation: EvaluationSpec, *, progress: bool = True) -> dict:
    """Metrics with the training prompts and with the paraphrases (by ``evaluation.scorer``), and
    what each task reads."""
    from harmonifuse.model import HarmoniFuse

    model = HarmoniFuse.from_pretrained(model_dir)
    model.eval()
    utterances = evaluation_utterances(config, evaluation)
    cache = feature_cache_for(model.encoder, config.data)
    if cache is not None:
        cache.build([u for utts in utterances.values() for u in utts], progress=progress, on_error="fail")
    dtype = choose_precision(config.train.precision, model.llm.device)
    autocast = torch.autocast(model.llm.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    if dtype is not None:  # as in training: identical under autocast, without per-call weight casts
        model.llm.store_frozen_linears_in(dtype)
    tasks = list(utterances)
    result: dict = {}
    score = SCORERS[evaluation.scorer]
    with autocast, torch.no_grad():
        result["metrics"] = score(model, utterances, batch_size=evaluation.batch_size, cache=cache,
                                  progress=progress)["metrics"]
        paraphrases = {t: p for t, p in evaluation.paraphrases.items() if t in tasks}
        if paraphrases:
            result["paraphrases"] = paraphrases
            result["paraphrase_metrics"] = score(model, {t: utterances[t] for t in paraphrases},
                                                 batch_size=evaluation.batch_size, cache=cache,
                                                 prompts=paraphrases, progress=progress)["metrics"]
        sample = next(iter(utterances.values()))[:evaluation.batch_size]
        hidden, lengths = hidden_states_for(model, sample, cache)
        profiles = model.task_profiles(hidden, lengths)
    result["profiles"] = {t: {"layer_weights": p["layer_weights"],
                              **({"gate_mean": sum(p["gate"]) / len(p["gate"])} if p.get("gate") else {})}
                          for t, p in profiles.items() if t in tasks}
    result["evaluated"] = {t: len(u) for t, u in utterances.items()}
    return result


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2))


class ExperimentRunner:
    """Runs the arms of ``spec`` over its seeds; ``train_fn`` is injectable (tests, other engines)."""

    def __init__(self, spec: ExperimentSpec, base: Path, *, source: str = "", progress: bool = True,
                 train_fn: Callable[..., dict] | None = None) -> None:
        from harmonifuse.training.run import train

        self.spec, self.base, self.source, self.progress = spec, Path(base), source, progress
        self.train_fn = train_fn or train
        self.results_dir = Path(spec.results_dir) / spec.name

    def result_path(self, arm: ArmSpec, seed: int) -> Path:
        return run_result_path(self.results_dir, arm.name, seed)

    def write_resolved_configs(self) -> list[Path]:
        """Beside each finished run's result (``seed<k>.json``), the complete config it resolves to
        (``seed<k>.yaml``): what reruns it, whatever later happens to the recipes."""
        written = []
        for arm, seed in self.select():
            result = self.result_path(arm, seed)
            target = result.with_suffix(".yaml")
            if result.is_file() and not target.is_file():
                config = arm_config(self.spec, self.base, arm, seed)
                atomic_write_text(target, to_yaml(config))
                written.append(target)
        return written

    def select(self, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None):
        known = {arm.name: arm for arm in self.spec.arms}
        unknown = sorted(set(arms or ()) - set(known))
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; the experiment has {list(known)}")
        chosen = [known[name] for name in arms] if arms else list(self.spec.arms)
        return [(arm, seed) for arm in chosen for seed in (seeds or self.spec.seeds)]

    def run(self, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> Path:
        """Run what is not finished yet, rewriting the table after every run; returns table.md."""
        todo = self.select(arms, seeds)
        pending = [(arm, seed) for arm, seed in todo if not self.result_path(arm, seed).is_file()]
        if len(pending) < len(todo):
            log.warning("%d of %d runs already finished; skipping them", len(todo) - len(pending), len(todo))
        for arm, seed in tqdm(pending, desc=f"experiment {self.spec.name}", unit="run", disable=not self.progress):
            tqdm.write(f"== {arm.title} (seed {seed})")
            _write_json(self.result_path(arm, seed), self.run_one(arm, seed))
            self.write_resolved_configs()
            self.report()
        return self.report()

    def report(self) -> Path:
        return write_report(self.spec, self.results_dir, self.source)

    def run_one(self, arm: ArmSpec, seed: int) -> dict:
        began = time.perf_counter()
        config = arm_config(self.spec, self.base, arm, seed)
        output_dir = Path(config.train.output_dir)
        summary_file = output_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        if summary.get("stop_reason") not in FINISHED or not (output_dir / "best" / "config.yaml").is_file():
            summary = self.train_fn(config, resume=True, progress=self.progress)
            if summary["stop_reason"] not in FINISHED:
                raise ExperimentInterrupted(f"{arm.name} seed {seed} stopped ({summary['stop_reason']}) at step "
                                            f"{summary['steps']}; run the experiment again to continue")
        start = time.perf_counter()
        scored = score_run(config, output_dir / "best", self.spec.evaluation, progress=self.progress)
        if not self.spec.keep_checkpoints:
            shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
        return {"arm": arm.name, "label": arm.title, "seed": seed, "steps": summary["steps"],
                "align_steps": summary.get("align_steps", 0),
                "train_minutes": summary["minutes"], "eval_minutes": (time.perf_counter() - start) / 60,
                "wall_minutes": (time.perf_counter() - began) / 60,
                "precision": summary.get("precision"), "hardware": summary.get("hardware"),
                "model": str(output_dir / "best"), **scored}
