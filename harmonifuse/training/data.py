"""From a run's DataConfig to manifests, a feature cache and the batch-interleaved loader."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..assets import cache_dir
from ..data.dataset import MultiTaskLoader, SpeechTaskDataset
from ..data.feature_cache import FeatureCache
from ..data.manifest import Utterance, read_manifest
from ..data.sampler import BatchInterleavedSampler
from .config import DataConfig

log = logging.getLogger(__name__)


@dataclass
class RunData:
    loader: MultiTaskLoader
    dev: dict[str, list[Utterance]]
    test: dict[str, list[Utterance]]
    cache: FeatureCache | None
    align_loader: MultiTaskLoader | None = None
    """ASR batches for the alignment stage (None without one)."""


def spread_sample(utterances: list[Utterance], limit: int) -> list[Utterance]:
    """A fixed, seeded subset: manifests are often sorted by speaker or label, so never the first N."""
    if len(utterances) <= limit:
        return utterances
    import numpy as np

    keep = np.sort(np.random.default_rng(0).choice(len(utterances), size=limit, replace=False))
    return [utterances[i] for i in keep]


def ensure_corpus(config: DataConfig, *, progress: bool = True) -> Path:
    """The manifests' folder; synthesises the built-in corpus there when asked and missing."""
    root = Path(config.root)
    wanted = [root / name for name in config.train.values()]
    if all(p.is_file() for p in wanted):
        return root
    if not config.build_synthetic:
        missing = [str(p) for p in wanted if not p.is_file()]
        raise FileNotFoundError(f"training manifests missing: {missing}; run `harmonifuse prepare ...` first "
                                "or set data.build_synthetic=true for the built-in corpus")
    from ..data.synthetic import prepare

    log.warning("building the built-in synthetic corpus in %s (once)", root)
    prepare(root, size=config.synthetic_size, voices=config.synthetic_voices, progress=progress)
    return root


def read_split(root: Path, split: dict[str, str], labels: list[str]) -> dict[str, list[Utterance]]:
    out = {}
    for task, name in split.items():
        path = root / name
        if path.is_file():
            out[task] = [u for u in read_manifest(path, labels=labels) if u.has_task(task)]
    return out


def feature_cache_for(encoder, config: DataConfig) -> FeatureCache | None:
    if encoder.trainable or config.feature_cache == "off":
        return None
    root = cache_dir() / "features" if config.feature_cache == "auto" else Path(config.feature_cache)
    return FeatureCache(encoder, root, load_kwargs={"max_seconds": config.max_seconds})


def build_run_data(config: DataConfig, encoder, labels: list[str], *, seed: int, rank: int = 0,
                   world_size: int = 1, progress: bool = True, num_workers: int = 0,
                   align_batch_size: int = 0, align_tasks: Sequence[str] = ("asr",)) -> RunData:
    """Manifests, feature cache and loaders; ``align_batch_size > 0`` adds the alignment stage's
    loader over ``align_tasks`` (interleaved by the main schedule when there are several)."""
    root = ensure_corpus(config, progress=progress and rank == 0)
    train = read_split(root, config.train, labels)
    dev = read_split(root, config.dev, labels)
    test = read_split(root, config.test, labels)
    dev = {task: spread_sample(utts, config.dev_limit) for task, utts in dev.items()}
    cache = feature_cache_for(encoder, config)
    if cache is not None:
        everything = [u for split in (train, dev) for utts in split.values() for u in utts]
        if rank == 0:
            cache.build(everything, progress=progress, on_error="skip")
        if world_size > 1:  # the other ranks read what rank 0 computed
            import torch.distributed as dist

            dist.barrier()
    datasets = {task: SpeechTaskDataset(utts, task, cache=cache, load_kwargs={"max_seconds": config.max_seconds},
                                        on_error=config.bad_samples) for task, utts in train.items()}
    def loader_for(tasks: list[str], batch_size: int, schedule: dict, limit: dict, fraction: dict) -> MultiTaskLoader:
        sampler = BatchInterleavedSampler(
            {task: datasets[task].durations for task in tasks}, batch_size=batch_size, schedule=schedule, seed=seed,
            pool_size=config.pool_size or None, rank=rank, world_size=world_size,
            limit=limit or None, fraction=fraction or None)
        return MultiTaskLoader({task: datasets[task] for task in tasks}, sampler, num_workers=num_workers)

    loader = loader_for(list(datasets), config.batch_size, {"name": config.schedule, **config.schedule_options},
                        dict(config.limit), dict(config.fraction))
    align_loader = None
    if align_batch_size:
        missing = [t for t in align_tasks if t not in datasets]
        if missing:
            raise ValueError(f"the alignment stage (align.max_steps > 0) trains on model.projector.ctc_tasks "
                             f"{list(align_tasks)}, but data.train has no manifest for {missing}; add one, "
                             f"drop the task from ctc_tasks, or set align.max_steps=0")
        schedule = ({"name": config.schedule, **config.schedule_options} if len(align_tasks) > 1
                    else {"name": "round_robin"})
        # the same subsets as the main stage, so a limited-data arm stays limited
        align_loader = loader_for(list(align_tasks), align_batch_size, schedule,
                                  {t: n for t, n in config.limit.items() if t in align_tasks},
                                  {t: f for t, f in config.fraction.items() if t in align_tasks})
    return RunData(loader, dev, test, cache, align_loader)
