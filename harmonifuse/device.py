"""Which device a process computes on: the one choice inference and training share.

``choose_device`` turns a ``--device`` / ``train.device`` value into a torch device (a GPU made
the process's current one), with an error that names the option and what to do;
``native_bf16`` says whether that device computes in bf16 natively.
"""
from __future__ import annotations

import os
import re

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
CUDA_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cu124"


class DeviceError(ValueError):
    """A device that cannot be used; names the option it came from and what to do instead."""


def env_local_rank() -> int:
    """This process's index on its node: torchrun's ``LOCAL_RANK`` (0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def choose_device(requested: str = "auto", local_rank: int = 0, *, option: str = "--device") -> torch.device:
    """The device a process runs on; a GPU is made the process's current one (:func:`use_gpu`).

    ``auto``: ``cuda:local_rank`` when CUDA is available, else the CPU. ``cuda``: ``cuda:local_rank``
    (each torchrun rank its own GPU). ``cuda:N``: that GPU (one process only). ``cpu``: the CPU.

    Raises:
        DeviceError: CUDA asked for where there is none, a GPU index that does not exist, or a
            string that names no device; the message names ``option`` and what to do.
    """
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", requested) is None:  # the same rule as config field train.device
        raise DeviceError(f"{option} {requested!r} is no device; choose {DEVICE_CHOICES}")
    kind, _, index = requested.partition(":")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None
               else "no GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        raise DeviceError(f"{option} {requested}: CUDA is not available: {why}; run with {option} cpu (or auto), "
                          f"or install a CUDA build of torch ({CUDA_INSTALL})")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if index and world_size > 1:
        raise DeviceError(f"{option} {requested}: under torchrun every rank takes its own GPU, cuda:$LOCAL_RANK; "
                          f"pass {option} cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    gpu = int(index) if index else local_rank
    count = torch.cuda.device_count()
    if gpu >= count:
        raise DeviceError(f"{option} {requested}: there is no GPU {gpu}, this machine shows {count} "
                          f"(cuda:0..cuda:{count - 1}); start at most {count} processes per node or name another GPU")
    device = torch.device("cuda", gpu)
    use_gpu(device)
    return device


def use_gpu(device: torch.device) -> None:
    """Make ``device`` (a GPU) the process's current CUDA device, and let float32 matmuls use TF32.

    Current device: work that names no index (the CUDA random generator, ``torch.cuda`` calls,
    kernels' workspaces, nccl) would otherwise land on cuda:0 whatever ``--device cuda:N`` said.
    TF32: the float32 matmuls that remain under bf16 autocast (the embedding-CTC over the whole
    vocabulary, kept float32 on purpose) run on the tensor cores (Ampere and later) instead of at a
    tenth of their speed; TF32 keeps float32's range with a 10-bit mantissa, as bf16 autocast's
    inputs have 7."""
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: a CPU (autocast decides by speed, :func:`choose_precision`),
    or a GPU of compute capability 8.0 or later (Ampere); older GPUs only emulate it, several times slower."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)
