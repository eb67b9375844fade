"""Where a run executes: the process group, the precision, and a description of the hardware for its logs."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def init_distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def choose_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it measures faster than float32 (CUDA, CPUs with bf16 matrix units)."""
    if requested == "fp32":
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
