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
so a new sampler that loads :meth:`state_dict` (``(epoch, step)``, a fingerprint of the config and
which utterances each stream has used) yields exactly the batches the interrupted one would have
yielded next.

Resume with other batch limits. A state saved with another world size, ``batch_size``,
``max_duration`` or ``pool_size`` (a run continued on another number of processes) cannot
continue the same global batches, whose size changed. It keeps the epoch, the schedule's position
(which stream supplies the next step) and, per stream, the pass it is in and the utterances that
pass has used; the utterances the pass has not used are shuffled, pooled and cut again under the
new limits and the epoch continues with them, then with fresh passes. So every utterance is used
exactly once per pass across the resume, and the epoch still ends when every stream has finished
its first pass; what differs from an uninterrupted run is which utterances share a batch, their
order, and so the number of steps the rest of the epoch takes. The data, seeds, subsets and
schedule must stay the same.

Limited data. ``limit`` (max utterances) and ``fraction`` select a fixed random subset per task,
seeded by ``subset_seed`` (not ``seed``, so runs with different training seeds see the same
data). Subsets are nested: the 10 % subset is contained in the 20 % one.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harmonifuse.data.schedules import Schedule, build_schedule

__all__ = ["BatchPlan", "BatchInterleavedSampler"]

log = logging.getLogger(__name__)

_ORDER_STREAM = 0x5EED  # rng namespace for the schedule's draws, apart from every stream id
# settings that only change how a pass is cut into global batches: a state saved under others
# resumes by cutting the unused rest of each pass again (module docstring)
_CUT_SETTINGS = ("world_size", "batch_size", "max_duration", "pool_size")


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


@dataclass
class _Progress:
    """How far one stream is in an epoch: the pass it is in and which of its positions that pass used."""

    pass_number: int
    used: np.ndarray            # (N,) bool over the stream's positions

    def to_state(self) -> dict[str, Any]:
        return {"pass": self.pass_number, "used": np.packbits(self.used).tobytes()}  # N/8 bytes

    @classmethod
    def from_state(cls, state: Mapping[str, Any], n: int) -> _Progress:
        used = np.unpackbits(np.frombuffer(state["used"], dtype=np.uint8), count=n).astype(bool)
        return cls(int(state["pass"]), used)


@dataclass
class _EpochPlan:
    """The global batches of one epoch from step ``start`` on (0, or where a re-cut resume began)."""

    start: int
    origin: dict[str, _Progress] | None  # every stream's progress at ``start``; None: a fresh epoch
    batches: list[tuple[str, np.ndarray, int]]  # (stream, stream positions, pass) for steps start, start + 1, ...

    def __len__(self) -> int:
        """Steps of the whole epoch (those before ``start`` included)."""
        return self.start + len(self.batches)


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
        self._plan_cache: tuple[int, _EpochPlan] | None = None
        # (epoch, start step, progress): that epoch is planned from there (a re-cut resume)
        self._origin: tuple[int, int, dict[str, _Progress]] | None = None

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
            name, batch, _ = plan.batches[step - plan.start]  # then says "this batch was consumed"
            yield self._shard(name, batch)

    def state_dict(self, step: int | None = None) -> dict[str, Any]:
        """``{"epoch", "step", "config", "progress", "origin"}`` after ``step`` batches of the current
        epoch (default: as many as yielded so far).

        ``progress``: per stream, its pass and the positions that pass has used (a bit mask), what
        a resume under other batch limits continues from; ``origin``: the same at the step this
        epoch's plan began from, when a resume re-cut it (None otherwise). Identical on every rank
        (rank is not part of it), so rank 0's copy restores all ranks.
        """
        step = self._step if step is None else step
        plan = self._epoch_plan()
        origin = None if plan.origin is None else {
            "start": plan.start, "progress": {name: p.to_state() for name, p in plan.origin.items()}}
        return {"epoch": self.epoch, "step": step, "config": self._config(), "origin": origin,
                "progress": {name: p.to_state() for name, p in self._progress(step).items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next ``__iter__`` yields the rest of epoch ``state["epoch"]`` from ``step``.

        Saved with the same settings, exactly the batches the saving sampler would have yielded;
        with another world size or other batch limits, the rest of the epoch re-cut from the
        utterances each stream's pass has not used (module docstring).

        Raises:
            ValueError: the state was saved with other data, seed, subsets or schedule, or (a state
                without ``progress``, written before it existed) with other batch limits.
        """
        saved, current = dict(state["config"]), self._config()
        differ = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        fixed = [k for k in differ if k not in _CUT_SETTINGS]
        if fixed or (differ and "progress" not in state):
            raise ValueError(f"sampler state was saved with different settings ({', '.join(fixed or differ)}); "
                             "resume with the same data, seed, subsets and schedule" +
                             ("" if fixed else f" (this state predates resuming under other batch limits: "
                                                f"resume with the same {', '.join(differ)})"))
        epoch, step = int(state["epoch"]), int(state["step"])
        self._origin = None
        if differ:
            self._origin = (epoch, step, self._load_progress(state["progress"]))
            log.warning("the sampler state was saved with %s; epoch %d continues from step %d with the "
                        "utterances its passes have not used, cut into batches again (%s)", ", ".join(
                            f"{k}={saved.get(k)}" for k in differ), epoch, step,
                        ", ".join(f"{k}={current.get(k)}" for k in differ))
        elif state.get("origin") is not None:  # a re-cut epoch: plan it from the same place again
            origin = state["origin"]
            self._origin = (epoch, int(origin["start"]), self._load_progress(origin["progress"]))
        self.epoch = epoch
        self._step = self._resume_step = step
        self._plan_cache = None

    def _load_progress(self, states: Mapping[str, Any]) -> dict[str, _Progress]:
        if set(states) != set(self._streams):
            raise ValueError(f"sampler state has streams {sorted(states)}, this sampler {sorted(self._streams)}; "
                             "resume with the same tasks and schedule")
        return {name: _Progress.from_state(states[name], len(stream)) for name, stream in self._streams.items()}

    def _progress(self, step: int) -> dict[str, _Progress]:
        """Every stream's pass and used positions after ``step`` batches of the current epoch."""
        plan = self._epoch_plan()
        if step < plan.start:
            raise ValueError(f"step {step} precedes step {plan.start}, where this epoch's plan begins")
        progress = {name: _Progress(0, np.zeros(len(stream), dtype=bool)) for name, stream in self._streams.items()}
        if plan.origin is not None:
            progress = {name: _Progress(p.pass_number, p.used.copy()) for name, p in plan.origin.items()}
        for name, batch, pass_number in plan.batches[: step - plan.start]:
            if pass_number != progress[name].pass_number:  # the stream began its next pass
                progress[name] = _Progress(pass_number, np.zeros(len(self._streams[name]), dtype=bool))
            progress[name].used[batch] = True
        return progress

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

    def _epoch_plan(self) -> _EpochPlan:
        """Global batches of the current epoch."""
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            start, origin = 0, None
            if self._origin is not None and self._origin[0] == self.epoch:
                _, start, origin = self._origin
            self._plan_cache = (self.epoch, _EpochPlan(start, origin, self._plan(self.epoch, start, origin)))
        return self._plan_cache[1]

    def _plan(self, epoch: int, start: int = 0,
              origin: dict[str, _Progress] | None = None) -> list[tuple[str, np.ndarray, int]]:
        """(stream, global batch, pass) for each step of ``epoch`` from ``start``, where every stream
        stands at ``origin`` (None: a fresh epoch, ``start`` 0)."""
        streams = {name: self._stream_batches(stream, epoch, None if origin is None else origin[name], start)
                   for name, stream in self._streams.items()}
        sizes = {name: len(stream) for name, stream in self._streams.items()}
        # batches each stream has left in its first pass: the epoch ends when none has any
        remaining = {name: first for name, (first, _) in streams.items() if first > 0}
        # A schedule that never picks some stream would loop forever: fail loudly instead.
        max_steps = 100 * sum(remaining.values()) + 1000
        rng = np.random.default_rng([self.seed, epoch, _ORDER_STREAM])
        plan: list[tuple[str, np.ndarray, int]] = []
        if not remaining:  # saved at the very end of the epoch
            return plan
        for name in itertools.islice(self.schedule.order(sizes, rng), start, None):
            plan.append((name, *next(streams[name][1])))
            if remaining.get(name, 0) > 0:
                remaining[name] -= 1
                if remaining[name] == 0:
                    del remaining[name]
            if not remaining:
                return plan
            if len(plan) > max_steps:
                raise RuntimeError(f"schedule {self.schedule!r} starves stream(s) {sorted(remaining)}")
        raise RuntimeError(f"schedule {self.schedule!r} ended; schedules must be endless")

    def _stream_batches(self, stream: _Stream, epoch: int, origin: _Progress | None,
                        start: int) -> tuple[int, Iterator[tuple[np.ndarray, int]]]:
        """(batches left in the first pass, endless (batch, pass) of ``stream``): from pass 0, or
        from ``origin``: the positions its pass has not used, cut again (``start`` seeds the cut)."""
        pass_number, batches = 0, None
        if origin is not None:
            pass_number = origin.pass_number
            unused = np.flatnonzero(~origin.used)
            if len(unused):
                rng = np.random.default_rng([self.seed, epoch, stream.rng_id, pass_number, start, _ORDER_STREAM])
                batches = self._batches(unused, stream.durations, rng)
            else:  # that pass is complete: the next one is due
                pass_number += 1
        if batches is None:
            batches = self._pass_batches(stream, epoch, pass_number)

        def endless() -> Iterator[tuple[np.ndarray, int]]:
            yield from ((batch, pass_number) for batch in batches)
            later = pass_number + 1
            while True:
                yield from ((batch, later) for batch in self._pass_batches(stream, epoch, later))
                later += 1

        return (len(batches) if pass_number == 0 else 0), endless()

    def _pass_batches(self, stream: _Stream, epoch: int, pass_number: int) -> list[np.ndarray]:
        """One pass over ``stream`` as global batches of stream positions (each exactly once)."""
        rng = np.random.default_rng([self.seed, epoch, stream.rng_id, pass_number])
        return self._batches(np.arange(len(stream)), stream.durations, rng)

    def _batches(self, positions: np.ndarray, durations: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """``positions`` (each once) shuffled, pooled, sorted by duration within pools and cut into
        global batches, in shuffled order."""
        n = len(positions)
        order = positions[rng.permutation(n)] if self.shuffle else positions
        pool = self.pool_size or n
        batches: list[np.ndarray] = []
        for start in range(0, n, pool):
            chunk = order[start:start + pool]
            if self.pool_size is not None:
                chunk = chunk[np.argsort(durations[chunk], kind="stable")]
            batches.extend(self._cut(chunk, durations))
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
