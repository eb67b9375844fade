"""Building a run's feature cache with every process: ``harmonifuse cache CONFIG`` and training's start.

Each rank computes its own share (:func:`~harmonifuse.data.feature_cache.share_of`), then all ranks
meet in one all-reduce of their counts, on a gloo group whose timeout is :data:`CACHE_WAIT`: a big
corpus takes hours, far beyond a default process-group timeout (10 minutes under nccl). A rank that
dies makes torchrun stop the others, so the long wait never hides a failure.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from harmonifuse.config import ConfigError
from harmonifuse.config.run import RunConfig
from harmonifuse.data.feature_cache import FeatureCache
from harmonifuse.data.manifest import Utterance
from harmonifuse.training.shared_folders import check_shared_folder

__all__ = ["CACHE_WAIT", "COUNTS", "build_shared", "cache_command", "format_summary"]

CACHE_WAIT = timedelta(hours=24)
"""How long the ranks that finished their share wait for the slowest one."""
COUNTS = ("total", "cached", "computed", "failed")
CACHE_FIRST_HINT = ("the feature cache is incomplete: every process computes its share before training; for a "
                    "big corpus run `harmonifuse cache CONFIG` first (faster: no LLM loaded, as many processes as "
                    "you like, resumable), e.g. `torchrun --nproc_per_node N -m harmonifuse.cli cache CONFIG`")


def build_shared(cache: FeatureCache, utterances: Sequence[Utterance], *, rank: int = 0, world_size: int = 1,
                 progress: bool = True, batch_size: int = 8, on_error: str = "skip", hint: str | None = None,
                 timeout: timedelta = CACHE_WAIT) -> dict:
    """Every rank builds its share of ``utterances``' features, then all meet; collective under torchrun.

    A multi-node job first checks that the cache folder is shared (:func:`check_shared_folder`).
    Progress bars on rank 0 only; ``hint`` is logged by rank 0 when its share has anything to compute.

    Returns:
        ``{"folder", "world_size", "per_rank": [counts of rank 0, 1, ...], "overall": counts}``, counts
        being ``{"total", "cached", "computed", "failed"}`` (distinct audio per rank; the overall
        ones are their sums), the same on every rank.
    """
    group = None
    if world_size > 1:
        check_shared_folder(cache.folder, "the feature cache folder (data.feature_cache)",
                            remedy='or set data.feature_cache to a shared path, or to "off" (quoted)')
        group = dist.new_group(backend="gloo", timeout=timeout)  # collective, so before the work
    mine = cache.build(utterances, batch_size=batch_size, progress=progress and rank == 0, on_error=on_error,
                       rank=rank, world_size=world_size, hint=hint if rank == 0 else None)
    counts = torch.zeros(world_size, len(COUNTS), dtype=torch.long)
    counts[rank] = torch.tensor([mine[k] for k in COUNTS])
    if group is not None:
        dist.all_reduce(counts, group=group)  # the meeting point: waits up to ``timeout``
        dist.destroy_process_group(group)
    per_rank = [dict(zip(COUNTS, row)) for row in counts.tolist()]
    overall = dict(zip(COUNTS, counts.sum(0).tolist()))
    return {"folder": str(cache.folder), "world_size": world_size, "per_rank": per_rank, "overall": overall}


def format_summary(summary: dict) -> str:
    """Human lines: one per rank (with several) and the overall counts."""

    def line(counts: dict) -> str:
        return ", ".join(f"{k} {counts[k]}" for k in COUNTS)

    lines = []
    if summary["world_size"] > 1:
        lines += [f"rank {r}: {line(c)}" for r, c in enumerate(summary["per_rank"])]
    lines.append(f"feature cache {summary['folder']}: {line(summary['overall'])}"
                 f" ({summary['world_size']} process{'es' if summary['world_size'] > 1 else ''})")
    return "\n".join(lines)


def run_utterances(config: RunConfig, *, progress: bool = True, rank: int = 0) -> list[Utterance]:
    """The utterances whose features training reads: train, and dev as sampled for evaluation."""
    from harmonifuse.training.loaders import cached_utterances, ensure_corpus, read_mix, read_split, spread_sample

    root = ensure_corpus(config.data, progress=progress and rank == 0)
    labels = config.model.tasks.emotion_labels
    train, dev = read_split(root, config.data.train, labels), read_split(root, config.data.dev, labels)
    dev = {task: spread_sample(utts, config.data.dev_limit) for task, utts in dev.items()}
    read_mix(config.data, root, labels, train, dev, seed=config.train.seed)
    unique = {id(u): u for utts in train.values() for u in utts}  # mixed sources repeat utterances
    return cached_utterances(config.data, {"all": list(unique.values())}, dev)


def cache_command(config: RunConfig, *, device: str | None = None, progress: bool = True,
                  batch_size: int = 8) -> dict:
    """``harmonifuse cache CONFIG``: build the feature cache of the run's train and dev utterances.

    Under torchrun every rank computes its share on its own device (``--device``, else
    ``train.device``, chosen as training chooses it). Returns :func:`build_shared`'s summary.

    Raises:
        ConfigError: nothing to cache (a trainable encoder, ``data.feature_cache: "off"``, or
            ``auto`` on CUDA, where training runs the frozen encoder in the forward pass).
        DeviceError: the device cannot be used.
    """
    from harmonifuse.modules.encoders import build_encoder
    from harmonifuse.training.hardware import choose_device, env_local_rank, init_distributed
    from harmonifuse.training.loaders import uses_feature_cache

    if device is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=device))
    where = choose_device(config.train.device, env_local_rank(),
                          option="--device" if device is not None else "train.device")
    m, data = config.model, config.data
    if m.encoder.trainable:
        raise ConfigError("model.encoder.trainable is true: a trained encoder's features change every step and "
                          "are never cached; nothing to build")
    if not uses_feature_cache(data.feature_cache, where):
        why = ('data.feature_cache is "off"' if data.feature_cache == "off" else
               f'data.feature_cache is "auto", which caches nothing on {where.type} (training runs the frozen '
               f"encoder in the forward pass there)")
        raise ConfigError(f"{why}; nothing to build. Set data.feature_cache=FOLDER to cache anyway")
    rank, world_size = init_distributed(where)
    try:
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        encoder = build_encoder(m.encoder.source, pad_to_30s=m.encoder.pad_to_30s, trainable=False)
        encoder.to(where).eval()
        from harmonifuse.training.loaders import feature_cache_for

        cache = feature_cache_for(encoder, data, where)
        utterances = run_utterances(config, progress=progress, rank=rank)
        summary = build_shared(cache, utterances, rank=rank, world_size=world_size, progress=progress,
                               batch_size=batch_size)
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return {**summary, "rank": rank}
