"""What an experiment is: arms (config overrides) x seeds on one base run config, one budget, one evaluation.

An experiment file (``configs/experiments/*.yaml``)::

    name: quick                       # results go to results/quick/
    base: ../demo.yaml                # run config every arm starts from (relative to this file)
    overrides: [train.max_steps=60]   # the shared budget, applied to every arm
    seeds: [0, 1, 2]
    evaluation: {split: test, limit: 50, paraphrases: {asr: "Write down what is said."}}
    arms:
      - {name: naive, label: "naive multi-task", overrides: [model.fusion.mode=static, model.gate.mode=none]}
      - {name: harmonifuse}
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from harmonifuse.config import ConfigError, load_config
from harmonifuse.config.loading import _check
from harmonifuse.config.run import RunConfig
from harmonifuse.tasks import TASK_NAMES

ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class ArmSpec:
    name: str
    """Folder-safe identifier (letters, digits, ``_ . -``)."""
    label: str = ""
    """Row name in the table (default: the name)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted ``key=value`` overrides on top of the experiment's, e.g. ``model.gate.mode=none``."""
    group: str = ""
    """Arms of one group are plotted together (e.g. the limited-data series)."""

    def validate(self, prefix: str) -> None:
        _check(bool(ARM_NAME.match(self.name)), f"{prefix}.name",
               f"{self.name!r} must be letters, digits, '_', '.' or '-' (it names a folder)")

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass
class EvaluationSpec:
    split: Literal["dev", "test"] = "test"
    limit: int = 0
    """Utterances per task, a fixed spread-out subset (0: the whole split)."""
    batch_size: int = 8
    paraphrases: dict[str, str] = field(default_factory=dict)
    """Task prompts never seen in training; each arm is scored with them too (prompt generalisation)."""
    scorer: Literal["llm", "ctc"] = "llm"
    """``llm``: the LLM answers (transcripts decoded, labels scored). ``ctc``: the front end alone
    (encoder, fusion, gate, projector) through its embedding-CTC head: greedy transcripts and
    closed-set label scoring, no LLM pass; for arms trained by the alignment stage alone."""

    def validate(self, prefix: str) -> None:
        _check(self.limit >= 0, f"{prefix}.limit", "must be >= 0 (0: the whole split)")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        _check(set(self.paraphrases) <= set(TASK_NAMES), f"{prefix}.paraphrases",
               f"maps task names ({', '.join(TASK_NAMES)}) to prompts")


@dataclass
class ExperimentSpec:
    name: str = ""
    base: str = "configs/demo.yaml"
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[ArmSpec] = field(default_factory=list)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    runs_dir: str = "runs/experiments"
    """Training folders (checkpoints, logs), one per arm and seed."""
    results_dir: str = "results"
    keep_checkpoints: bool = False
    """Keep each finished run's resumable checkpoints (its final model in ``best/`` is always kept)."""
    description: str = ""

    def validate(self, prefix: str) -> None:
        _check(bool(ARM_NAME.match(self.name or "")), f"{prefix}.name", "is required: letters, digits, '_ . -'")
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), f"{prefix}.seeds",
               "needs at least one seed, without repeats")
        _check(len(self.arms) >= 1, f"{prefix}.arms", "needs at least one arm")
        names = [arm.name for arm in self.arms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        _check(not duplicates, f"{prefix}.arms", f"has repeated names {duplicates}")


def load_experiment(path: str | Path) -> tuple[ExperimentSpec, Path]:
    """The spec and its base run config's path (resolved against the spec's folder, then the cwd)."""
    path = Path(path)
    spec = load_config(ExperimentSpec, path)
    base = Path(spec.base)
    if not base.is_absolute():
        beside = path.parent / base
        base = beside if beside.is_file() else base
    if not base.is_file():
        raise ConfigError(f"config field 'base' of {path}: run config {spec.base} not found "
                          f"(looked beside the experiment file and in {Path.cwd()})")
    return spec, base


def run_result_path(results_dir: Path, arm: str, seed: int) -> Path:
    """Where a scored run of ``arm`` and ``seed`` is kept; its presence marks the run finished."""
    return Path(results_dir) / "runs" / arm / f"seed{seed}.json"


def arm_config(spec: ExperimentSpec, base: Path, arm: ArmSpec, seed: int) -> RunConfig:
    """The run config of one arm and seed; its output folder is ``<runs_dir>/<name>/<arm>/seed<seed>``."""
    output_dir = Path(spec.runs_dir) / spec.name / arm.name / f"seed{seed}"
    overrides = [*spec.overrides, *arm.overrides, f"train.seed={seed}", f"train.output_dir={output_dir}"]
    try:
        return load_config(RunConfig, base, overrides)
    except ConfigError as error:
        raise ConfigError(f"arm {arm.name!r}: {error}") from error

