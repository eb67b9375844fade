"""Task schedules for :class:`~harmonifuse.data.sampler.BatchInterleavedSampler`.

A schedule answers two questions and nothing else:

1. :meth:`Schedule.streams` -- which tasks share a batch stream. The interleaved schedules give
   every task its own stream (so every batch holds one task); :class:`Mixed` pools all tasks in
   one stream named ``"mixed"`` (the naive multi-task ablation).
2. :meth:`Schedule.order` -- an endless sequence of stream names: which stream supplies the next
   batch.

The sampler owns batching, shuffling, epochs, sharding and resume, so a new schedule is a small
class here, registered in :data:`SCHEDULES` so configs can name it.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Schedule",
    "RoundRobin",
    "Ratio",
    "Temperature",
    "Mixed",
    "SCHEDULES",
    "build_schedule",
]

MIXED = "mixed"


class Schedule(ABC):
    """Decides which stream supplies each batch. Must be deterministic given ``rng``."""

    def streams(self, tasks: Sequence[str]) -> dict[str, list[str]]:
        """Stream name -> the tasks it draws from. Default: one stream per task."""
        return {task: [task] for task in tasks}

    @abstractmethod
    def order(self, sizes: Mapping[str, int], rng: np.random.Generator) -> Iterator[str]:
        """Endless stream names. ``sizes``: utterances per stream, in stream order."""

    def __repr__(self) -> str:  # part of the sampler's resume fingerprint
        fields = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()))
        return f"{type(self).__name__}({fields})"


class Ratio(Schedule):
    """Deterministic weighted interleaving: ``{"asr": 2, "ser": 1}`` gives 2 ASR batches per SER batch.

    Uses smooth weighted round-robin, so within every window of ``sum(weights)`` steps each stream
    appears exactly ``weight`` times and the picks are spread out (a, s, a, a, s, a, ...) rather
    than bunched.
    """

    def __init__(self, weights: Mapping[str, int]) -> None:
        if not weights or any(int(w) != w or w < 1 for w in weights.values()):
            raise ValueError(f"ratio weights must be positive integers, got {dict(weights)!r}")
        self.weights = {name: int(w) for name, w in weights.items()}

    def order(self, sizes: Mapping[str, int], rng: np.random.Generator) -> Iterator[str]:
        missing = [name for name in sizes if name not in self.weights]
        if missing:
            raise ValueError(f"no ratio weight for task(s) {missing}; weights: {self.weights}")
        names = list(sizes)
        weights = [self.weights[name] for name in names]
        total = sum(weights)
        current = [0] * len(names)
        while True:
            for i, w in enumerate(weights):
                current[i] += w
            best = max(range(len(names)), key=current.__getitem__)  # ties -> first stream
            current[best] -= total
            yield names[best]


class RoundRobin(Schedule):
    """Tasks alternate one batch each, in the order the tasks were given (the paper's scheme)."""

    def order(self, sizes: Mapping[str, int], rng: np.random.Generator) -> Iterator[str]:
        return Ratio({name: 1 for name in sizes}).order(sizes, rng)


class Temperature(Schedule):
    """Each batch's stream is drawn at random with ``p ∝ n ** (1 / T)`` (n = utterances).

    ``T = 1`` samples in proportion to data size, ``T -> inf`` uniformly; seeded by the sampler.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def probabilities(self, sizes: Mapping[str, int]) -> dict[str, float]:
        # In log space: n ** (1/T) overflows for small T.
        logits = np.log(np.asarray([sizes[n] for n in sizes], dtype=np.float64)) / self.temperature
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return dict(zip(sizes, p.tolist()))

    def order(self, sizes: Mapping[str, int], rng: np.random.Generator) -> Iterator[str]:
        names = list(sizes)
        p = np.asarray(list(self.probabilities(sizes).values()))
        while True:  # draw in chunks: one rng call per step would dominate planning time
            for i in rng.choice(len(names), size=1024, p=p):
                yield names[i]


class Mixed(Schedule):
    """All tasks share one stream: batches mix tasks (ablation); the batch task is ``"mixed"``."""

    def streams(self, tasks: Sequence[str]) -> dict[str, list[str]]:
        return {MIXED: list(tasks)}

    def order(self, sizes: Mapping[str, int], rng: np.random.Generator) -> Iterator[str]:
        while True:
            yield MIXED


SCHEDULES: dict[str, type[Schedule]] = {
    "round_robin": RoundRobin,
    "ratio": Ratio,
    "temperature": Temperature,
    "mixed": Mixed,
}


def build_schedule(spec: Schedule | str | Mapping[str, Any] | None) -> Schedule:
    """A schedule from a config value.

    Accepts a :class:`Schedule`, ``None`` (round-robin), a name (``"mixed"``) or a mapping with a
    ``name`` and the class's arguments (``{"name": "ratio", "weights": {"asr": 2, "ser": 1}}``,
    ``{"name": "temperature", "temperature": 2.0}``).
    """
    if isinstance(spec, Schedule):
        return spec
    if spec is None:
        return RoundRobin()
    if isinstance(spec, str):
        spec = {"name": spec}
    options = dict(spec)
    name = options.pop("name", None)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](**options)
