"""Per-task datasets and the multi-task loader that turns sampler plans into batches.

:class:`SpeechTaskDataset` serves one task's utterances: cached encoder features when a
:class:`~harmonifuse.data.feature_cache.FeatureCache` is given (frozen encoder), otherwise
waveforms from :func:`~harmonifuse.audio.load_audio`. Its target is the label field the manifest
registers for the task (``asr`` -> ``text``, ``ser`` -> ``emotion``).

:class:`MultiTaskLoader` walks a :class:`~harmonifuse.data.sampler.BatchInterleavedSampler`,
fetches each plan's items from the right task's dataset and collates a
:class:`~harmonifuse.data.batch.SpeechBatch`, optionally in background worker processes. Its
resumable state *is* the sampler's, counted in batches the caller actually received (workers
prefetch ahead of the caller, so the sampler's own counter runs ahead).

Bad samples. Under ``on_error="skip"`` an unloadable item comes back as ``{"id", "task",
"error"}``; collate drops it and lists it in ``SpeechBatch.skipped``, and the loader tallies
skips per task *in the main process* (``loader.skipped``), so counts survive worker processes.

Waveform augmentation. Given a :class:`~harmonifuse.data.augmentation.WaveAugment`, the loader
numbers each plan with its (epoch, step within the epoch) and the fetcher augments the batch's
waveform items with it (cached hidden states are left alone), keyed by utterance id: the draws
repeat on resume and do not depend on the worker.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader, Dataset

from harmonifuse.audio import AudioError, BadSamplePolicy, load_audio
from harmonifuse.data.batch import SpeechBatch, collate
from harmonifuse.data.feature_cache import FeatureCache
from harmonifuse.data.manifest import Utterance
from harmonifuse.data.sampler import BatchInterleavedSampler, BatchPlan
from harmonifuse.tasks import get_task

if TYPE_CHECKING:
    from harmonifuse.data.augmentation import WaveAugment

__all__ = ["SpeechTaskDataset", "MultiTaskLoader"]


class SpeechTaskDataset(Dataset):
    """One task's utterances -> item dicts for :func:`~harmonifuse.data.batch.collate`.

    Args:
        utterances: the task's utterances; those without the task's label are left out
            (counted in ``unlabelled``), so indices refer to ``self.utterances``.
        task: "asr" or "ser" (any task of ``harmonifuse.tasks.TASKS``).
        cache: serve cached hidden states from this cache instead of waveforms.
        sample_rate: waveform rate (ignored with a cache, which has its own).
        load_kwargs: extra ``load_audio`` arguments (``max_seconds``, ``min_seconds``, ...).
        on_error: "skip" drops bad samples (counted) or "fail" raises.
        max_skips: with "skip", raise anyway past this many skips in one process.
    """

    def __init__(self, utterances: Sequence[Utterance], task: str, *, cache: FeatureCache | None = None,
                 sample_rate: int = 16_000, load_kwargs: Mapping[str, Any] | None = None,
                 on_error: str = "skip", max_skips: int | None = None) -> None:
        self._label_field = get_task(task).label_field  # ValueError naming the known tasks
        self.task = task
        self.utterances = [u for u in utterances if u.has_task(task)]
        self.unlabelled = len(utterances) - len(self.utterances)
        self.cache = cache
        self.sample_rate = sample_rate
        self.load_kwargs = dict(load_kwargs or {})
        self.policy = BadSamplePolicy(on_error, max_skips=max_skips)

    @property
    def durations(self) -> list[float]:
        """Seconds per utterance (manifest durations): the sampler's input."""
        return [u.duration for u in self.utterances]

    @property
    def skip_count(self) -> int:
        """Skips seen by *this process's* copy (see ``MultiTaskLoader.skipped`` for the total)."""
        return self.policy.counter.count

    def __len__(self) -> int:
        return len(self.utterances)

    def target(self, index: int) -> str:
        return getattr(self.utterances[index], self._label_field)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"id", "task", "target"}`` + ``"hidden_states"`` (L+1, T, D) float16 (a read-only numpy
        memory map of the cache file; collate copies it) or ``"waveform"`` (S,) float32; or
        ``{"id", "task", "error"}`` for a skipped bad sample."""
        utterance = self.utterances[index]
        item: dict[str, Any] = {"id": utterance.id, "task": self.task, "target": self.target(index)}
        try:
            if self.cache is not None:
                item["hidden_states"] = self.cache.read(utterance)
            else:
                item["waveform"] = load_audio(utterance.audio, sample_rate=self.sample_rate, **self.load_kwargs)
        except AudioError as error:
            self.policy.handle(utterance.audio, error)  # raises under "fail"
            return {"id": utterance.id, "task": self.task, "error": str(error)}
        return item


@dataclass(frozen=True)
class _NumberedPlan:
    """A sampler plan with the (epoch, step within the epoch) it was drawn for."""

    plan: BatchPlan
    epoch: int
    step: int


class _NumberedPlans:
    """The sampler's plans, each numbered (a DataLoader sampler: iterable with a length)."""

    def __init__(self, sampler: BatchInterleavedSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[_NumberedPlan]:
        epoch, start = self.sampler.epoch, self.sampler.resume_step  # read before iteration resets it
        for offset, plan in enumerate(self.sampler):
            yield _NumberedPlan(plan, epoch, start + offset)


class _PlanFetcher(Dataset):
    """Map-style view for DataLoader: ``fetcher[plan]`` is the collated batch (runs in workers)."""

    def __init__(self, datasets: Mapping[str, SpeechTaskDataset], augment: WaveAugment | None = None,
                 stage: str = "main") -> None:
        self.datasets = dict(datasets)
        self.augment = augment
        self.stage = stage

    def __getitem__(self, plan: BatchPlan | _NumberedPlan) -> SpeechBatch:
        numbered = plan if isinstance(plan, _NumberedPlan) else None
        plan = numbered.plan if numbered else plan
        items = [self.datasets[task][index] for task, index in plan.items]
        if numbered is not None and self.augment is not None:
            for item in items:
                if "waveform" in item:
                    item["waveform"] = self.augment(item["waveform"], item_id=item["id"], step=numbered.step,
                                                    epoch=numbered.epoch, stage=self.stage)
        return collate(items, task=plan.task)


def _identity(batch: SpeechBatch) -> SpeechBatch:  # module level: picklable for workers
    return batch


class MultiTaskLoader:
    """Iterates :class:`SpeechBatch` objects in the sampler's order, one per step.

    Args:
        datasets: task -> dataset; must cover the sampler's tasks, with matching sizes.
        sampler: the :class:`BatchInterleavedSampler` (its durations came from these datasets).
        num_workers: background worker processes (0: load in the calling process).
        prefetch_factor: batches each worker prepares ahead.
        pin_memory: pin batches for faster host-to-GPU copies.
        skip_empty: drop batches whose every item was skipped. Default: only when
            ``world_size == 1``, since under DDP every rank must run every step.
        augment: waveform augmentation for the batches' waveform items (None: none).
        stage: the training stage these batches feed ("main", "align"): part of the augmentation
            seed, so two stages at the same step draw differently.
    """

    def __init__(self, datasets: Mapping[str, SpeechTaskDataset], sampler: BatchInterleavedSampler, *,
                 num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False,
                 skip_empty: bool | None = None, multiprocessing_context: str | None = None,
                 augment: WaveAugment | None = None, stage: str = "main") -> None:
        for task in sampler.tasks:
            if task not in datasets:
                raise ValueError(f"sampler task {task!r} has no dataset; datasets: {sorted(datasets)}")
            if len(datasets[task]) != sampler.dataset_sizes[task]:
                raise ValueError(f"task {task!r}: dataset has {len(datasets[task])} utterances, sampler "
                                 f"was built from {sampler.dataset_sizes[task]} durations")
        self.datasets = dict(datasets)
        self.sampler = sampler
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.skip_empty = sampler.world_size == 1 if skip_empty is None else skip_empty
        self.multiprocessing_context = multiprocessing_context
        self.augment = augment if augment else None  # a WaveAugment with every p = 0 is none
        self.stage = stage
        self.skipped: dict[str, list[str]] = {task: [] for task in sampler.tasks}
        self._epoch = sampler.epoch
        self._step = 0  # batches delivered to the caller in the current epoch

    def __len__(self) -> int:
        """Steps per epoch."""
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._epoch, self._step = self.sampler.epoch, self.sampler.resume_step

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state at the last batch *delivered* (not the last prefetched)."""
        return self.sampler.state_dict(step=self._step)  # the loader's epoch is always the sampler's

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._epoch, self._step = int(state["epoch"]), int(state["step"])

    def skip_counts(self) -> dict[str, int]:
        """Bad samples skipped so far, per task (all workers included)."""
        return {task: len(ids) for task, ids in self.skipped.items()}

    def _batches(self) -> Iterator[SpeechBatch]:
        fetcher = _PlanFetcher(self.datasets, self.augment, self.stage)
        plans = self.sampler if self.augment is None else _NumberedPlans(self.sampler)
        if self.num_workers == 0:
            for plan in plans:
                batch = fetcher[plan]
                yield batch.pin_memory() if self.pin_memory else batch
            return
        loader = DataLoader(fetcher, sampler=plans, batch_size=None, collate_fn=_identity,
                            num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                            pin_memory=self.pin_memory, multiprocessing_context=self.multiprocessing_context)
        yield from loader

    def __iter__(self) -> Iterator[SpeechBatch]:
        self._epoch, self._step = self.sampler.epoch, self.sampler.resume_step
        for batch in self._batches():
            self._step += 1
            for task, item_id in batch.skipped:
                self.skipped[task].append(item_id)
            if len(batch) == 0 and self.skip_empty:
                continue
            yield batch
