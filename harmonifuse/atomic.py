"""Atomic writes: a file or folder is either absent, the old version, or complete, never half-written.

Every writer in HarmoniFuse goes through here. The content is written under a temporary name in
the target's own folder (``.NAME.PID.RANDOM.tmp``; same file system, so the rename is atomic),
flushed to disk, given the permissions a file the user creates normally gets (``0o666 & ~umask``;
``mkstemp``'s and safetensors' owner-only ``0o600`` would otherwise survive the rename), renamed
over the target with :func:`os.replace`, and the folder is synced so the rename itself survives a
power cut. On any failure, including ``KeyboardInterrupt``, the temporary file is removed and the
old target is left untouched; a full disk raises :class:`DiskFullError`, naming the target and
the space left.

    atomic_write_text(path, "hello\\n")
    atomic_write(path, lambda tmp: save_file(tensors, tmp))    # writers that want a path
    atomic_directory(folder, lambda tmp: build_into(tmp))      # a whole folder at once
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["DiskFullError", "atomic_directory", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "leftovers", "temp_path"]

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(OSError):
    """The disk (or quota) filled up while writing ``target``: nothing was written under its name,
    and the version there before, if any, is untouched."""

    def __init__(self, target: str | os.PathLike, cause: Exception,
                 consequence: str = "nothing was written under this name and any previous version is intact") -> None:
        super().__init__(errno.ENOSPC, "No space left on device")
        self.target = Path(target)
        usage = shutil.disk_usage(self.target.parent) if self.target.parent.exists() else None
        free = f" ({usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.0f} MiB)" if usage else ""
        quota = isinstance(cause, OSError) and cause.errno == getattr(errno, "EDQUOT", None)
        reason = "Disk quota exceeded" if quota else "No space left on device"
        self.message = (f"{self.target}: {reason} while writing it{free}; {consequence}: free some space "
                        "or write to another disk, then run again")

    def __str__(self) -> str:
        return self.message


def _disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error``, raised while writing into ``folder``, means the disk is full. Writers
    say so in different ways: OSError ENOSPC (numpy, open), "os error 28" (safetensors), or only
    "unexpected pos" (torch.save); so an unexplained write error with under 1 MiB left counts too.
    Call it before the temporary file is removed (that frees the space again)."""
    if isinstance(error, DiskFullError) or not isinstance(error, Exception):
        return False
    if isinstance(error, OSError) and error.errno in _FULL:
        return True
    text = str(error)
    if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.\d+\.[0-9a-f]{8}\.tmp")


def temp_path(target: str | os.PathLike) -> Path:
    """A fresh, hidden name beside ``target`` that no other process or thread will pick."""
    target = Path(target)
    return target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


def leftovers(folder: str | os.PathLike, target: str | None = None, *, recursive: bool = False) -> Iterator[Path]:
    """Temporary files or folders in ``folder`` (of the target named ``target``, else of any) that a
    killed writer left, or that a live writer is using: remove them only when none can be running."""
    folder = Path(folder)
    for path in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        match = _TEMP_NAME.fullmatch(path.name)
        if match and (target is None or match["target"] == target):
            yield path


def atomic_write(target: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Have ``write(tmp)`` fill the path ``tmp`` (an existing empty file), then move it to ``target``.

    ``write`` may write through the path (``save_file``, ``sf.write``, ``open(tmp, "wb")``) or
    recreate the file; whatever mode it leaves, the result gets the user's normal file mode.
    Returns ``target`` as a Path. The target's folder must exist.
    """
    target = Path(target)
    tmp = temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies here
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, target)
    except BaseException as error:
        full = _disk_full(error, target.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(target, error) from error
        raise
    _fsync_folder(target.parent)
    return target


def atomic_write_text(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write(target, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(target, lambda tmp: tmp.write_bytes(data))


def atomic_directory(
    target: str | os.PathLike,
    build: Callable[[Path], object],
    *,
    keep_existing: Callable[[Path], bool] | None = None,
) -> Path:
    """Have ``build(tmp)`` fill the empty folder ``tmp``, then move it to ``target`` as a whole.

    Everything inside gets the user's normal modes (folders and executables ``0o777 & ~umask``,
    other files ``0o666 & ~umask``) and is synced before the rename. A ``target`` already in the
    way is replaced, unless ``keep_existing(target)`` says it is as good (a concurrent builder
    finished first); then the new folder is discarded. Returns ``target`` as a Path.
    """
    target = Path(target)
    tmp = temp_path(target)
    try:
        os.mkdir(tmp)  # 0o777 & ~umask
        folder_mode = stat.S_IMODE(os.stat(tmp).st_mode)
        build(tmp)
        _normalise_and_sync(tmp, folder_mode)
        _move_into_place(tmp, target, keep_existing)
    except Exception as error:
        if _disk_full(error, target.parent):
            raise DiskFullError(target, error) from error
        raise
    finally:
        _remove(tmp)  # gone already after a successful rename
    _fsync_folder(target.parent)
    return target


def _move_into_place(tmp: Path, target: Path, keep_existing: Callable[[Path], bool] | None) -> None:
    try:
        os.rename(tmp, target)  # atomic; fails when a non-empty folder or a file is in the way
        return
    except OSError:
        if not os.path.lexists(target):
            raise
        if keep_existing is not None and keep_existing(target):
            return
    aside = temp_path(target)
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    finally:
        _remove(aside)


def _normalise_and_sync(root: Path, folder_mode: int) -> None:
    file_mode = folder_mode & 0o666
    for here, folders, files in os.walk(root):
        for name in files:
            path = os.path.join(here, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o111
            os.chmod(path, folder_mode if executable else file_mode)
            _fsync(path)
        for name in folders:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                os.chmod(path, folder_mode)
        _fsync_folder(here)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
