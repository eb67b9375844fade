"""Batch-interleaved multi-task sampler: every batch holds one task, tasks alternate.

:class:`BatchInterleavedSampler` takes the durations of each task's utterances and yields
:class:`BatchPlan` objects (a task name and ``(task, index)`` pairs into that task's dataset).
Which task supplies each batch is an injected :class:`~harmonifuse.data.schedules.Schedule`
(round-robin by default, ratio r:1, temperature sampling, or ``Mixed`` for the mixed-batch
ablation, whose batches are tagged ``"mixed"``).

Batching. Each stream (one task, or all tasks for ``Mixed``) is shuffled, cut into pools of
``pool_size`` utterances, each pool is sorted by duration and cut into batches of at most
``batch_size`` utterances and/or ``max_duration`` *padded* seconds (``B * max duration``, which is
what memory pays for); finally the batch order is shuffled. Similar lengths share a batch, which
cuts padding, while pools keep the randomness (lhotse's "dynamic bucketing" idea, simplified).
``pool_size=None`` disables sorting (random batches).

Epochs. An epoch ends at the step where the *last* stream finishes its first full pass over its
data. A stream that finishes earlier restarts with a fresh shuffle (its next pass), so in an
epoch every utterance of every task is seen at least once, and within each pass exactly once.
With round-robin the epoch length is therefore set by the largest task (about ``n_streams *
max(batches per pass)`` steps); the smaller task is revisited, as batch-interleaved training
with unequal corpora needs.

Distributed. Batches are planned *globally* (``batch_size * world_size`` utterances, or
``max_duration`` per rank) from the seed alone, so every rank computes the same plan, takes the
same task at the same step and runs the same number of steps; rank ``r`` takes the strided shard
``batch[r::world_size]`` (strided, so every rank gets a similar spread of lengths). A global
batch with fewer utterances than ranks is padded by repeating its own utterances, the only
case in which an utterance repeats within a pass.

Determinism and resume. The plan of an epoch is a pure function of (seed, epoch, data, config),
so :meth:`state_dict` is just ``(epoch, step)`` plus a fingerprint of the config; a new sampler
that loads it yields exactly the batches the interrupted one would have yielded next.

Limited data. ``limit`` (max utterances) and ``fraction`` select a fixed random subset per task,
seeded by ``subset_seed`` (not ``seed``, so runs with different training seeds see the same
data). Subsets are nested: the 10 % subset is contained in the 20 % one.
"""
from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harmonifuse.data.schedules import Schedule, build_schedule

__all__ = ["BatchPlan", "BatchInterleavedSampler"]

_ORDER_STREAM = 0x5EED  # rng namespace for the schedule's draws, apart from every stream id


@dataclass
class BatchPlan:
    """One batch for this rank: ``task`` ("asr", "ser", or "mixed") and ``(task, index)`` items,
    where ``index`` points into that task's dataset (the full dataset, not the subset)."""

    task: str
    items: list[tuple[str, int]] = field(default_factory=list)

    @property
    def indices(self) -> list[int]:
        return [index for _, index in self.items]

    @property
    def tasks(self) -> list[str]:
        return [task for task, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class _Stream:
    """The utterances one stream draws from: parallel arrays over its items."""

    name: str
    tasks: list[str]            # task names, indexed by task_of
    task_of: np.ndarray         # (N,) int
    index_of: np.ndarray        # (N,) int64, index into the task's dataset
    durations: np.ndarray       # (N,) float64 seconds
    rng_id: int                 # stable per name (crc32), so adding a task does not reseed others

    def __len__(self) -> int:
        return len(self.index_of)


def _per_task(option: Any, tasks: Sequence[str], name: str) -> dict[str, Any]:
    """A scalar applies to every task; a mapping names tasks (others get None)."""
    if isinstance(option, Mapping):
        unknown = set(option) - set(tasks)
        if unknown:
            raise ValueError(f"{name} names unknown task(s) {sorted(unknown)}; tasks: {list(tasks)}")
        return {task: option.get(task) for task in tasks}
    return {task: option for task in tasks}


def _default_rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return 0, 1


class BatchInterleavedSampler:
    """Yields one :class:`BatchPlan` per training step; see the module docstring for semantics.

    Args:
        durations: task -> duration in seconds of each utterance of that task's dataset
            (e.g. ``{"asr": [1.2, 3.4], "ser": [2.0]}``). Task order matters for round-robin.
        batch_size: max utterances per batch *per rank*.
        max_duration: max padded seconds (``B * longest``) per batch per rank. At least one of
            ``batch_size`` and ``max_duration`` is required; with both, both hold. An utterance
            longer than ``max_duration`` gets a batch of its own.
        schedule: a :class:`Schedule`, or a config value for
            :func:`~harmonifuse.data.schedules.build_schedule`; default round-robin.
        shuffle: shuffle utterances and batch order (False: dataset order, for evaluation).
        seed: seeds shuffling and temperature draws (with the epoch).
        pool_size: utterances per duration-sorting pool; None disables sorting.
        rank, world_size: this process's shard; default from ``torch.distributed`` if initialised.
        limit: max utterances per task (int, or ``{task: int}``).
        fraction: fraction of each task's utterances (float in (0, 1], or ``{task: float}``).
        subset_seed: seeds the ``limit``/``fraction`` subset.
    """

    def __init__(
        self,
        durations: Mapping[str, Sequence[float]],
        *,
        batch_size: int | None = None,
        max_duration: float | None = None,
        schedule: Schedule | str | Mapping[str, Any] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        pool_size: int | None = 2000,
        rank: int | None = None,
        world_size: int | None = None,
        limit: int | Mapping[str, int] | None = None,
        fraction: float | Mapping[str, float] | None = None,
        subset_seed: int = 0,
    ) -> None:
        if batch_size is None and max_duration is None:
            raise ValueError("give batch_size and/or max_duration")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_duration is not None and not max_duration > 0:
            raise ValueError(f"max_duration must be > 0, got {max_duration}")
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"pool_size must be >= 1 or None, got {pool_size}")
        if not durations:
            raise ValueError("no tasks given")
        if rank is None or world_size is None:
            default_rank, default_world = _default_rank_world()
            rank = default_rank if rank is None else rank
            world_size = default_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")

        self.batch_size = batch_size
        self.max_duration = max_duration
        self.schedule = build_schedule(schedule)
        self.shuffle = shuffle
        self.seed = seed
        self.pool_size = pool_size
        self.rank = rank
        self.world_size = world_size
        self.subset_seed = subset_seed
        self.tasks = list(durations)

        all_durations = {task: np.asarray(durations[task], dtype=np.float64) for task in self.tasks}
        for task, d in all_durations.items():
            if d.ndim != 1 or not (np.isfinite(d).all() and (d >= 0).all()):
                raise ValueError(f"durations of {task!r} must be a flat list of finite seconds >= 0")
        self.dataset_sizes = {task: len(d) for task, d in all_durations.items()}
        limits = _per_task(limit, self.tasks, "limit")
        fractions = _per_task(fraction, self.tasks, "fraction")
        self._subsets = {task: self._select(task, len(all_durations[task]), limits[task], fractions[task])
                         for task in self.tasks}
        self._streams = self._build_streams(all_durations)
        self._data_digest = self._digest(all_durations)

        self.epoch = 0
        self._step = 0          # batches handed out in the current epoch
        self._resume_step = 0   # where the next __iter__ starts (set by load_state_dict)
        self._plan_cache: tuple[int, list[tuple[str, np.ndarray]]] | None = None

    # ------------------------------------------------------------------ construction helpers
    def _select(self, task: str, n: int, limit: int | None, fraction: float | None) -> np.ndarray:
        """The sorted dataset indices this sampler uses for ``task`` (all, or a seeded subset)."""
        if n == 0:
            raise ValueError(f"task {task!r} has no utterances")
        if limit is None and fraction is None:
            return np.arange(n)
        keep = n
        if fraction is not None:
            if not 0 < fraction <= 1:
                raise ValueError(f"fraction for {task!r} must be in (0, 1], got {fraction}")
            keep = max(1, round(n * fraction))
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit for {task!r} must be >= 1, got {limit}")
            keep = min(keep, int(limit))
        # Prefixes of one permutation: smaller subsets are nested in larger ones.
        permutation = np.random.default_rng([self.subset_seed, zlib.crc32(task.encode())]).permutation(n)
        return np.sort(permutation[:keep])

    def _build_streams(self, all_durations: Mapping[str, np.ndarray]) -> dict[str, _Stream]:
        streams = {}
        for name, tasks in self.schedule.streams(self.tasks).items():
            subsets = [self._subsets[task] for task in tasks]
            streams[name] = _Stream(
                name=name,
                tasks=list(tasks),
                task_of=np.concatenate([np.full(len(s), i) for i, s in enumerate(subsets)]),
                index_of=np.concatenate(subsets).astype(np.int64),
                durations=np.concatenate([all_durations[t][s] for t, s in zip(tasks, subsets)]),
                rng_id=zlib.crc32(name.encode()),
            )
        return streams

    @staticmethod
    def _digest(all_durations: Mapping[str, np.ndarray]) -> str:
        h = hashlib.sha256()
        for task, d in all_durations.items():
            h.update(task.encode() + b"\0" + d.tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ public API
    def subset(self, task: str) -> list[int]:
        """The dataset indices of ``task`` this sampler draws from (after limit/fraction)."""
        return self._subsets[task].tolist()

    @property
    def stream_names(self) -> list[str]:
        """Batch task tags this sampler yields (the tasks, or ``["mixed"]``)."""
        return list(self._streams)

    @property
    def resume_step(self) -> int:
        """The step the next ``__iter__`` starts from (0, or where a loaded state left off)."""
        return self._resume_step

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan the next ``__iter__`` yields (call before every epoch)."""
        if epoch != self.epoch:
            self._resume_step = 0
        self.epoch = epoch
        self._step = 0 if self._resume_step == 0 else self._step

    def __len__(self) -> int:
        """Steps (batches per rank) in the current epoch."""
        return len(self._epoch_plan())

    def __iter__(self) -> Iterator[BatchPlan]:
        plan = self._epoch_plan()
        start, self._resume_step = self._resume_step, 0
        self._step = start
        for step in range(start, len(plan)):
            self._step = step + 1  # counted before yielding: state_dict() inside the loop body
            yield self._shard(*plan[step])  # then says "this batch was consumed"

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "step", "config"}``: step = batches yielded so far in this epoch.

        Identical on every rank (rank is not part of it), so rank 0's copy restores all ranks.
        """
        return {"epoch": self.epoch, "step": self._step, "config": self._config()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next ``__iter__`` yields the rest of epoch ``state["epoch"]`` from ``step``.

        Raises:
            ValueError: the state was saved with different data or settings (seed, batch size,
                world size, schedule, ...), which would make the remaining batches differ.
        """
        saved, current = dict(state["config"]), self._config()
        if saved != current:
            differ = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
            raise ValueError(f"sampler state was saved with different settings ({', '.join(differ)}); "
                             "resume with the same data, seed, batch size, world size and schedule")
        self.epoch = int(state["epoch"])
        self._step = self._resume_step = int(state["step"])

    # ------------------------------------------------------------------ planning
    def _config(self) -> dict[str, Any]:
        return {
            "data": self._data_digest,
            "subsets": {t: int(len(s)) for t, s in self._subsets.items()},
            "subset_seed": self.subset_seed,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "max_duration": self.max_duration,
            "shuffle": self.shuffle,
            "pool_size": self.pool_size,
            "world_size": self.world_size,
            "schedule": repr(self.schedule),
        }

    def _epoch_plan(self) -> list[tuple[str, np.ndarray]]:
        """Global batches of the current epoch: (stream name, stream positions) per step."""
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            self._plan_cache = (self.epoch, self._plan(self.epoch))
        return self._plan_cache[1]

    def _plan(self, epoch: int) -> list[tuple[str, np.ndarray]]:
        first = {name: self._pass_batches(s, epoch, 0) for name, s in self._streams.items()}
        passes = {name: self._passes(stream, epoch, first[name]) for name, stream in self._streams.items()}
        sizes = {name: len(stream) for name, stream in self._streams.items()}
        first_pass_batches = {name: len(batches) for name, batches in first.items()}
        # A schedule that never picks some stream would loop forever: fail loudly instead.
        max_steps = 100 * sum(first_pass_batches.values()) + 1000
        rng = np.random.default_rng([self.seed, epoch, _ORDER_STREAM])
        remaining = dict(first_pass_batches)
        plan: list[tuple[str, np.ndarray]] = []
        for name in self.schedule.order(sizes, rng):
            plan.append((name, next(passes[name])))
            if remaining.get(name, 0) > 0:
                remaining[name] -= 1
                if remaining[name] == 0:
                    del remaining[name]
            if not remaining:
                return plan
            if len(plan) > max_steps:
                raise RuntimeError(f"schedule {self.schedule!r} starves stream(s) {sorted(remaining)}")
        raise RuntimeError(f"schedule {self.schedule!r} ended; schedules must be endless")

    def _passes(self, stream: _Stream, epoch: int, first: list[np.ndarray]) -> Iterator[np.ndarray]:
        """Endless batches of ``stream``: pass 0 (``first``), then pass 1 (fresh shuffle), ..."""
        yield from first
        pass_number = 1
        while True:
            yield from self._pass_batches(stream, epoch, pass_number)
            pass_number += 1

    def _pass_batches(self, stream: _Stream, epoch: int, pass_number: int) -> list[np.ndarray]:
        """One pass over ``stream`` as global batches of stream positions (each exactly once)."""
        rng = np.random.default_rng([self.seed, epoch, stream.rng_id, pass_number])
        n = len(stream)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        pool = self.pool_size or n
        batches: list[np.ndarray] = []
        for start in range(0, n, pool):
            chunk = order[start:start + pool]
            if self.pool_size is not None:
                chunk = chunk[np.argsort(stream.durations[chunk], kind="stable")]
            batches.extend(self._cut(chunk, stream.durations))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _cut(self, chunk: np.ndarray, durations: np.ndarray) -> list[np.ndarray]:
        """Greedily cut ``chunk`` (in order) into global batches within the size limits."""
        ws = self.world_size
        max_count = self.batch_size * ws if self.batch_size is not None else math.inf
        if self.max_duration is None:
            return np.split(chunk, range(int(max_count), len(chunk), int(max_count)))
        batches, current, longest = [], [], 0.0
        for position in chunk.tolist():
            d = float(durations[position])
            new_longest = max(longest, d)
            # Per-rank padded seconds: a rank holds ceil(count / ws) utterances.
            fits = len(current) < max_count and math.ceil((len(current) + 1) / ws) * new_longest <= self.max_duration
            if current and not fits:
                batches.append(np.asarray(current, dtype=np.int64))
                current, new_longest = [], d
            current.append(position)
            longest = new_longest
        if current:
            batches.append(np.asarray(current, dtype=np.int64))
        return batches

    def _shard(self, name: str, batch: np.ndarray) -> BatchPlan:
        """This rank's strided share of a global batch."""
        if len(batch) < self.world_size:  # every rank needs at least one utterance
            batch = np.resize(batch, self.world_size)
        stream = self._streams[name]
        mine = batch[self.rank::self.world_size]
        items = [(stream.tasks[t], int(i)) for t, i in zip(stream.task_of[mine], stream.index_of[mine])]
        return BatchPlan(task=name, items=items)
