"""Folders every process of a multi-node job must see: checked once, failing fast with a clear message.

A torchrun job on several nodes writes some folders from one rank and reads them from all (the
feature cache: each rank writes its share, every rank reads all of it). On a node-local disk
each node would see only its own files: ranks would recompute, or read features another node
never wrote. :func:`check_shared_folder` proves the folder is shared before any work depends on it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["SharedFolderError", "spans_several_nodes", "check_shared_folder"]

MARKER_PREFIX = ".harmonifuse-shared-"


class SharedFolderError(RuntimeError):
    """A folder that the processes of a multi-node job do not all see."""


def spans_several_nodes() -> bool:
    """Whether this torchrun job runs on more than one node (``WORLD_SIZE > LOCAL_WORLD_SIZE``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return world > local


def check_shared_folder(path: str | os.PathLike, what: str, *, remedy: str = "",
                        always: bool = False) -> None:
    """Check that every rank sees ``path`` as the same folder; a no-op on one node (unless ``always``)
    and outside a process group.

    Rank 0 creates the folder and writes a marker file with a random token into it; after a barrier
    every rank reads it back; the verdicts are shared (an all-reduce), so every rank stops together;
    rank 0 removes the marker. Collective: every rank must call it, with its own view of the path.

    Args:
        what: what the folder is, for the message, e.g. "the feature cache (data.feature_cache)".
        remedy: appended to the message, e.g. 'or set data.feature_cache to a shared folder or "off"'.
        always: check even when the job runs on one node (tests).

    Raises:
        SharedFolderError: on the ranks that cannot see rank 0's marker, naming the folder, the host
            and what to do; on the other ranks, naming the ranks that could not.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    if not (always or spans_several_nodes()):
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(backend="gloo")  # CPU tensors, whatever the main backend
    folder = Path(path).expanduser().absolute()
    token = [secrets.token_hex(16) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0, group=group)
    marker = folder / f"{MARKER_PREFIX}{token[0][:12]}"
    problem = ""
    try:
        if rank == 0:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                marker.write_text(token[0])
            except OSError as error:
                problem = f"rank 0 cannot write into it ({error})"
        dist.barrier(group=group)
        if rank != 0 and not problem:
            try:
                seen = marker.read_text()
            except OSError:
                seen = None
            if seen != token[0]:
                problem = f"rank {rank} cannot see the marker file rank 0 wrote there ({marker.name})"
        failed = torch.zeros(world, dtype=torch.int32)
        failed[rank] = int(bool(problem))
        dist.all_reduce(failed, group=group)
    finally:
        if rank == 0:
            with contextlib.suppress(OSError):
                marker.unlink()
    bad = [r for r, flag in enumerate(failed.tolist()) if flag]
    dist.destroy_process_group(group)
    if not bad:
        return
    advice = ("put it on a shared filesystem that every node mounts at the same path (NFS, Lustre, ...)"
              + (f", {remedy}" if remedy else ""))
    if problem:
        raise SharedFolderError(f"{what} {folder} is not shared between the nodes of this job: {problem} "
                                f"(host {socket.gethostname()}); {advice}")
    raise SharedFolderError(f"{what} {folder} is not shared between the nodes of this job: rank(s) "
                            f"{', '.join(map(str, bad))} cannot see it; {advice}")
