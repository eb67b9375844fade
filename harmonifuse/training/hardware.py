"""Where a run executes: the process group, the precision, and a description of the hardware for its logs."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from harmonifuse.device import (  # noqa: F401 (re-exported: the trainer's device choice is the shared one)
    DeviceError, choose_device, env_local_rank, native_bf16, use_gpu)

log = logging.getLogger(__name__)


def init_distributed(device: torch.device | None = None, *, timeout: timedelta | None = None) -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun: nccl bound to ``device``
    on CUDA (``set_device`` first, so every rank's CUDA work lands on its own GPU), gloo on the CPU.

    ``timeout``: how long a collective waits for the other ranks before it fails (``train.collective_timeout_minutes``;
    None: torch's default, 10 minutes under nccl, 30 under gloo)."""
    device = device if device is not None else torch.device("cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        options = {"timeout": timeout} if timeout is not None else {}
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, **options)
        else:
            dist.init_process_group("gloo", **options)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_collective_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a collective that waited past the process group's timeout (gloo raises it
    in Python; nccl's watchdog ends the process itself, logging the timeout)."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out waiting" in text or "collective operation timeout" in text)


def pre_ampere_note(device: torch.device) -> str:
    """'NAME (compute capability X.Y) has no native bf16' for a GPU without it."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no native bf16"


def loader_settings(num_workers: int | str, pin_memory: bool | str, device: torch.device) -> tuple[int, bool]:
    """(worker processes, pinned batches) for ``train.num_workers`` / ``train.pin_memory`` ("auto" or a value).

    On the CPU, "auto" loads in the training process without pinning: a worker would take a core
    from the matrix products. On CUDA the cores are free: up to 4 workers per rank (torchrun's
    ``LOCAL_WORLD_SIZE`` ranks share the node's cores, one core each kept for the training loop),
    and pinned batches so the host-to-GPU copy overlaps the previous step.
    """
    on_gpu = device.type == "cuda"
    if num_workers == "auto":
        if on_gpu:
            ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            num_workers = max(0, min(4, cores // ranks_here - 1))
        else:
            num_workers = 0
    if pin_memory is True and not on_gpu:
        log.warning("train.pin_memory: true has no effect on %s (pinning serves copies to a GPU)", device)
    return int(num_workers), on_gpu and pin_memory in (True, "auto")


def choose_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it measures faster than float32 (CUDA, CPUs with bf16 matrix units).

    A GPU older than Ampere only emulates bf16 (several times slower than float32): it trains in
    float32, with a warning, whatever ``train.precision`` asked (float16 autocast would need loss
    scaling, which the trainer does not do)."""
    if requested == "fp32":
        return None
    if device.type == "cuda" and not native_bf16(device):
        log.warning("%s: training in float32 (train.precision %s would run emulated bf16, several times slower); "
                    "model.llm.frozen_dtype auto keeps the LLM in float32 there too", pre_ampere_note(device),
                    requested)
        return None
    if requested == "bf16" or device.type == "cuda":
        return torch.bfloat16
    a = torch.randn(1024, 1024)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x
        start = time.perf_counter()
        for _ in range(8):
            x @ x
        timings[dtype] = time.perf_counter() - start
    faster = timings[torch.bfloat16] < 0.7 * timings[torch.float32]
    log.info("matmul float32 %.3fs vs bf16 %.3fs: %s", timings[torch.float32], timings[torch.bfloat16],
             "bf16 autocast" if faster else "float32")
    return torch.bfloat16 if faster else None


def describe_hardware(device: torch.device) -> str:
    """What a run's minutes were measured on, e.g. 'AMD EPYC, AVX2, 2 threads' or 'cuda: NVIDIA A100'."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    units = torch.backends.cpu.get_cpu_capability() + "".join(
        f" + {name}" for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")) if flag in flags)
    return f"{name}, {units}, {torch.get_num_threads()} threads"
