"""One training run per output folder: an advisory lock on ``OUTPUT_DIR/.train.lock``.

Two ``harmonifuse train`` processes writing checkpoints into one folder would interleave them
(and ``--resume`` would mix two runs). The first holds an exclusive ``flock`` on the lock file for
as long as it trains; the second refuses at once, naming the holder. The operating system drops
the lock when its holder exits in any way, SIGKILL included, so a killed run never leaves a
stale lock behind. (Where ``fcntl`` is missing, e.g. Windows, there is no lock.)
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from harmonifuse.config import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".train.lock"


class RunLockedError(ConfigError):
    """Another process is training into the same output folder."""


class RunExistsError(ConfigError):
    """A fresh run (no --resume) into a folder that already holds another run's work."""


def refuse_to_overwrite(output_dir: str | os.PathLike) -> None:
    """Raise RunExistsError when ``output_dir`` holds a finished checkpoint or a best model.

    A fresh run there would replace the best model at its first evaluation and, its step numbers
    being lower, have its own new checkpoints pruned as the oldest while the old run's stayed the
    "latest" that a later ``--resume`` would pick.
    """
    folder = Path(output_dir)
    steps = sorted(p.name for p in (folder / "checkpoints").glob("step_*") if (p / "done.json").is_file())
    best = (folder / "best" / "config.yaml").is_file()
    if steps or best:
        held = ", ".join(filter(None, [f"checkpoints up to {steps[-1]}" if steps else "",
                                       "a best model (best/)" if best else ""]))
        raise RunExistsError(f"train.output_dir {folder} already holds a run ({held}); continue it with "
                             f"--resume, set another train.output_dir, or move the folder away first: a fresh run "
                             f"would overwrite its best model and mix its checkpoints with this one's")


@contextmanager
def output_dir_lock(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the output folder's training lock for the ``with`` block, or raise RunLockedError."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    if fcntl is None:  # pragma: no cover
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            raise RunLockedError(
                f"train.output_dir {folder} is in use by another training run{holder}; wait for it to finish "
                f"(or stop it), or set another train.output_dir. Two runs in one folder would interleave "
                f"their checkpoints") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode())
        return f" (pid {holder['pid']} on {holder['host']}, started {holder['started']})"
    except (ValueError, KeyError, TypeError):
        return ""
