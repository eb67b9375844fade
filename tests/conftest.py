"""Shared helpers, fixtures and test lanes.

Lanes (markers, registered in pyproject.toml):

- ``multiprocess``: starts other processes: torchrun, a second training run, a server, or the CLI end to end
  (each pays a fresh torch import: seconds to a minute);
- ``faults``: fault injection (kills at random moments, full disks, damaged files);
- ``slow``: the real pretrained models (Whisper tiny.en, SmolLM2) or a headless browser;
- ``cuda``: needs a CUDA GPU (skipped without one).

``make test-fast`` runs everything but the first three (and cuda), in two pytest-xdist workers of one
torch thread each (128 s on 2 cores, against 200 s in one process); ``make test`` runs all.
Helpers here are imported by the test files as ``from conftest import ...``: one copy each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ROOT = TESTS.parent
# subprocesses find tests/tiny.py and friends; one thread each, as two processes share two cores
ENV = {**os.environ, "PYTHONPATH": str(TESTS) + os.pathsep + str(ROOT), "OMP_NUM_THREADS": "1"}
# --standalone: the launcher picks a free port, so runs side by side never collide
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def run_cli(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``harmonifuse ARGS`` in a fresh process (text output captured)."""
    return subprocess.run([sys.executable, "-m", "harmonifuse.cli", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def torchrun(world: int, *args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node WORLD ARGS`` (ARGS: ``-m harmonifuse.cli ...`` or a script)."""
    return subprocess.run([*TORCHRUN, str(world), *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def train_summaries(stdout: str) -> list[dict]:
    """The summary line ``harmonifuse train`` prints, once per rank."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"steps"')]


def git_status(*paths: str | Path) -> str:
    """``git status --porcelain`` of PATHS in this checkout ('' when clean or not a git checkout)."""
    result = subprocess.run(["git", "status", "--porcelain", "--", *map(str, paths)], cwd=ROOT,
                            capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else ""


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A tiny encoder folder and a tiny LLM folder, seeded, shared by the whole session: (encoder, llm)."""
    from tiny import write_tiny_assets

    return write_tiny_assets(tmp_path_factory.mktemp("tiny_assets"))
