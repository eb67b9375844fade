"""``harmonifuse train CONFIG [key=value ...] [--resume]``: build everything from a config and train."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from harmonifuse.config import load_config
from harmonifuse.config.run import RunConfig
from harmonifuse.training.hardware import (choose_device, env_local_rank, init_distributed, is_collective_timeout,
                                           loader_settings)
from harmonifuse.training.loaders import build_run_data
from harmonifuse.training.lock import output_dir_lock, refuse_to_overwrite
from harmonifuse.training.shared_folders import check_shared_folder
from harmonifuse.training.trainer import Trainer

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_run_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    return load_config(RunConfig, path, overrides)


def train(config: RunConfig, *, resume: bool = False, progress: bool = True, model=None,
          device: str | None = None) -> dict:
    """Train ``config`` (optionally continuing its output folder's newest checkpoint); returns a summary.

    ``device`` (``harmonifuse train --device``) replaces ``train.device`` when given.

    Under torchrun the process group is made here (its timeout ``train.collective_timeout_minutes``)
    and taken down after a run that ended normally.

    Raises:
        DeviceError: the device cannot be used (CUDA asked for where there is none, ...).
        RunLockedError: another process is training into ``train.output_dir``.
        RunExistsError: without ``resume``, ``train.output_dir`` already holds a run.
        CollectiveTimeoutError: another process did not reach a collective within the timeout.
    """
    if device is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, device=device))
    where = choose_device(config.train.device, env_local_rank(),
                          option="--device" if device is not None else "train.device")
    ours = not dist.is_initialized()  # a group made by the caller is the caller's to take down
    rank, world_size = init_distributed(where, timeout=timedelta(minutes=config.train.collective_timeout_minutes))
    try:
        # several nodes: every rank reads rank 0's checkpoints on resume, so they must all see one folder
        check_shared_folder(config.train.output_dir, "the output folder (train.output_dir)")
        if not resume:  # every rank, on the folder they share: all refuse together
            refuse_to_overwrite(config.train.output_dir)
        # rank 0 alone: the other ranks of a DDP run share its folder (and write nothing into it)
        with output_dir_lock(config.train.output_dir) if rank == 0 else contextlib.nullcontext():
            summary = _train(config, rank, world_size, where, resume=resume, progress=progress, model=model)
    except Exception as error:  # the group is left as it is: another rank may still be inside a collective
        if world_size > 1 and is_collective_timeout(error):
            raise CollectiveTimeoutError(rank, config.train.collective_timeout_minutes, error) from error
        raise
    if ours and world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return summary


class CollectiveTimeoutError(RuntimeError):
    """A rank waited in a collective longer than ``train.collective_timeout_minutes`` for the others."""

    def __init__(self, rank: int, minutes: float, error: BaseException) -> None:
        super().__init__(f"rank {rank} waited more than {minutes:g} minutes (train.collective_timeout_minutes) for the "
                         "other processes in a collective: another rank has stopped or is that far behind (its own "
                         "error, if any, is above). If the ranks are merely slow (loading a model from a slow shared "
                         f"disk, say), raise train.collective_timeout_minutes. ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})")


def _train(config: RunConfig, rank: int, world_size: int, device: torch.device, *, resume: bool, progress: bool,
           model) -> dict:
    from harmonifuse.model import HarmoniFuse

    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    seed_everything(config.train.seed)
    model = model if model is not None else HarmoniFuse.build(config.model, device)
    model.to(device)  # before the feature cache is built: the frozen encoder runs where training does
    if config.train.init_from:
        from harmonifuse.pretrained import WEIGHTS_NAME, find_model_folder

        folder = find_model_folder(config.train.init_from)
        model.load_trained(folder / WEIGHTS_NAME)  # a checkpoint of this run (--resume) replaces them below
        log.info("warm start from %s", folder)
    num_workers, pin_memory = loader_settings(config.train.num_workers, config.train.pin_memory, device)
    data = build_run_data(config.data, model.encoder, config.model.tasks.emotion_labels, seed=config.train.seed,
                          rank=rank, world_size=world_size, progress=progress,
                          num_workers=num_workers, pin_memory=pin_memory,
                          align_batch_size=config.align.batch_size if config.align.max_steps else 0,
                          align_tasks=config.model.ctc.tasks)
    trainer = Trainer(config, model, data, rank=rank, world_size=world_size, progress=progress)
    try:
        if resume:
            trainer.resume()
        return trainer.fit()
    finally:  # also when the run fails (a full disk, say): no log file left open
        with contextlib.suppress(OSError):
            trainer.logger.close()
