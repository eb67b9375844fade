"""The run log: JSON lines (always) and TensorBoard (when installed), written by rank 0 only."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from harmonifuse.atomic import DiskFullError


class RunLogger:
    """JSONL (always) and TensorBoard (when installed) on rank 0; no-ops elsewhere."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.file = None
        self.tb = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(output_dir / "log.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional for logging
                self.tb = None

    def trim(self, drop) -> None:
        """Cut the log (in place) at its first record for which ``drop(record)`` is true, or at its first
        incomplete line (a kill mid-write): a resumed run logs again what came after its checkpoint."""
        if not self.enabled:
            return
        self.file.flush()
        path = Path(self.file.name)
        offset = 0
        with open(path, "rb") as handle:
            for line in handle:
                try:
                    if not line.endswith(b"\n") or drop(json.loads(line)):
                        break
                except ValueError:
                    break
                offset += len(line)
        if offset < path.stat().st_size:
            os.truncate(path, offset)  # the file is open for appending: the next record lands here

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise DiskFullError(self.file.name, error, "the log lost its last record; the checkpoints are "
                                "intact and `--resume` continues from the newest") from error
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
                elif isinstance(value, list) and value and isinstance(value[0], (int, float)):
                    for i, v in enumerate(value):
                        self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}/{i}", v, step)

    def close(self) -> None:
        """Close the log files (again: a no-op)."""
        file, tb, self.file, self.tb = self.file, self.tb, None, None
        if file is not None:
            file.close()
        if tb is not None:
            tb.close()
