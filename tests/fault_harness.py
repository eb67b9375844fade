"""SIGKILL a tiny training run at many moments, resume it every time, and check nothing was lost.

    python tests/fault_harness.py CONFIG OUT [--kills 20] [--seed 0]

prints a JSON report (tests/test_faults.py reads it). The harness imports everything once and
runs every attempt in a forked child: a real process, which SIGKILL ends as it ends any, but
which does not pay the interpreter's and torch's start-up again, so twenty kills take seconds.

Moments, in a seeded order (the first two attempts are killed while the feature cache fills and while
the first best model is exported):

- ``inside:<point>``: the child kills itself at the n-th time it reaches a point inside a write:
  a feature-cache entry half written; a checkpoint's weights written, its state half written,
  its state written but not its ``done`` marker, the folder complete but not renamed, renamed
  but older checkpoints not pruned, pruning half-way; the best model's weights half written;
  a log line half written;
- ``step``: the parent kills it when its log reaches a randomly chosen step (plus 0-30 ms);
- ``time``: the parent kills it a random time (0-4 s) after it started (start-up, data, steps).

A child that gets ``GUARD`` steps past where it started is killed there (so that on any machine
the run cannot end before the kills do); a moment the run gets past without reaching (a best model
not improved, say) is made up for by a ``step`` kill, until there were ``--kills`` kills.

After every kill it checks that each complete checkpoint loads (checksums) and equals the
uninterrupted reference run's checkpoint of the same step, that the exported best model loads,
and that every feature-cache entry is whole. The next attempt always runs with ``--resume``.
After the kills one last attempt runs to the end; its final and best weights and its log are
compared with the reference.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

import harmonifuse.atomic as atomic
import harmonifuse.data.feature_cache as feature_cache
import harmonifuse.training.checkpoint as checkpoint
import harmonifuse.training.logger as run_logger
from harmonifuse import cli
from harmonifuse.weights import load_weights

GUARD = 12
"""A child that gets this many steps past where it started is killed whatever its moment."""
POINTS = ["ckpt:after_weights", "ckpt:state_partial", "ckpt:before_done", "ckpt:before_rename",
          "ckpt:before_prune", "ckpt:mid_prune", "export:weights_partial", "log:partial_line"]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, occurrence: int) -> None:
    """In the child: SIGKILL this process the ``occurrence``-th time ``point`` is reached."""
    seen = {"n": 0}

    def reached() -> bool:
        seen["n"] += 1
        return seen["n"] == occurrence

    if point == "cache:partial":
        original = np.save

        def save(handle, array, *args, **kwargs):
            if not hasattr(handle, "write") or not reached():
                return original(handle, array, *args, **kwargs)
            buffer = io.BytesIO()
            original(buffer, array, *args, **kwargs)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            die()
        feature_cache.np.save = save
    elif point == "ckpt:after_weights":
        original_weights = checkpoint.save_weights

        def save_weights(*args, **kwargs):
            original_weights(*args, **kwargs)
            if reached():
                die()
        checkpoint.save_weights = save_weights
    elif point in ("ckpt:state_partial", "ckpt:before_done"):
        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            if not reached():
                return original_save(obj, f, *args, **kwargs)
            if point == "ckpt:before_done":
                original_save(obj, f, *args, **kwargs)
                die()
            buffer = io.BytesIO()
            original_save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            die()
        torch.save = save
    elif point == "ckpt:before_rename":
        original_move = atomic._move_into_place

        def move(*args, **kwargs):
            if reached():
                die()
            return original_move(*args, **kwargs)
        atomic._move_into_place = move
    elif point == "ckpt:before_prune":
        original_prune = checkpoint.CheckpointManager._prune

        def prune(self):
            if reached():
                die()
            return original_prune(self)
        checkpoint.CheckpointManager._prune = prune
    elif point == "ckpt:mid_prune":
        import shutil

        original_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):  # an old checkpoint, moved aside to be removed
            if Path(path).name.startswith(".step_") and Path(path).is_dir() and reached():
                files = sorted(p for p in Path(path).iterdir() if p.is_file())
                if files:
                    files[0].unlink()
                die()
            return original_rmtree(path, *args, **kwargs)
        shutil.rmtree = rmtree
    elif point == "export:weights_partial":
        import safetensors.torch as st

        original_file = st.save_file

        def save_file(tensors, filename, metadata=None):
            if Path(filename).parent.name != "best" or not reached():
                return original_file(tensors, filename, metadata=metadata)
            data = st.save(tensors, metadata=metadata)
            with open(filename, "wb") as handle:
                handle.write(data[: len(data) // 2])
            die()
        st.save_file = save_file
    elif point == "log:partial_line":
        def write(self, record):
            if not self.enabled:
                return
            line = json.dumps(record) + "\n"
            if reached():
                self.file.write(line[: len(line) // 2])
                self.file.flush()
                die()
            self.file.write(line)
        run_logger.RunLogger.write = write
    else:
        raise ValueError(point)


def attempt(argv: list[str], log: Path, point: str | None = None, occurrence: int = 1) -> int:
    """Fork a child running ``harmonifuse ARGV`` (output to ``log``); returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:  # the child
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if point:
            install(point, occurrence)
        code = cli.main(argv)
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wait(pid: int) -> int:
    """The child's exit code, or minus the signal that ended it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def running(pid: int) -> bool:
    """Whether the child has not ended yet (without reaping it)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def logged_step(run: Path) -> int:
    """The highest training step in the run's log so far."""
    step = 0
    try:
        for line in (run / "log.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind") == "train":
                step = max(step, record["step"])
    except FileNotFoundError:
        pass
    return step


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_weights(path)


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_run(run: Path, reference: Path) -> list[str]:
    """Problems in a killed run's folder: damaged or wrong checkpoints, a damaged best model or cache."""
    problems = []
    manager = checkpoint.CheckpointManager(run)
    for path in manager.complete():
        try:
            trained, state = manager.load(path)
        except Exception as error:  # noqa: BLE001
            problems.append(f"{path.name} does not load: {error}")
            continue
        twin = reference / "checkpoints" / path.name
        if not equal(trained, weights(twin / "trained.safetensors")):
            problems.append(f"{path.name} differs from the reference run's")
    best = run / "best"
    if (best / "config.yaml").is_file():
        try:
            weights(best / "trained.safetensors")
        except Exception as error:  # noqa: BLE001
            problems.append(f"best/ does not load: {error}")
    for entry in (run.parent / "killed-features").rglob("*.npy"):
        if entry.name.startswith("."):
            continue
        try:
            array = np.load(entry, mmap_mode="r")
            if feature_cache._check_trailer(entry, array, verify=True):
                problems.append(f"feature cache entry {entry.name} is damaged")
        except Exception as error:  # noqa: BLE001
            problems.append(f"feature cache entry {entry.name} does not load: {error}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    def argv(name: str, resume: bool) -> list[str]:
        return ["train", args.config, f"train.output_dir={out / name}", f"data.feature_cache={out / (name + '-features')}",
                *(["train.keep_last=1000"] if name == "reference" else []), "-q", *(["--resume"] if resume else [])]

    began = time.perf_counter()
    code = wait(attempt(argv("reference", False), out / "reference.log"))
    reference_seconds = time.perf_counter() - began
    if code != 0:
        raise SystemExit(f"the reference run failed ({code}): {(out / 'reference.log').read_text()[-3000:]}")

    # first a kill while the feature cache fills, then one in the export of the first best model (the
    # first evaluation always improves on none); the others in a seeded random order
    first = [("inside", "cache:partial"), ("inside", "export:weights_partial")]
    moments = ([("inside", p) for p in POINTS if p != "export:weights_partial"] + [("step", None)] * 5
               + [("time", None)] * (args.kills - len(first) - (len(POINTS) - 1) - 5))
    rng.shuffle(moments)
    moments = first + moments
    report = {"reference_seconds": reference_seconds, "attempts": [], "problems": []}
    killed = out / "killed"
    kills = i = 0
    while kills < args.kills and i < 2 * args.kills:
        # a moment not reached (the run got past it) is not a kill: make up for it with a step kill
        how, point = moments[i] if i < len(moments) else ("step", None)
        before = logged_step(killed)
        log = out / f"attempt-{i:02d}.log"
        occurrence = 1 if point in ("cache:partial", None) else rng.randint(1, 2)
        started = time.perf_counter()
        pid = attempt(argv("killed", i > 0), log, point if how == "inside" else None, occurrence)
        delay = rng.uniform(0.0, 4.0) if how == "time" else None
        target = before + rng.randint(1, 4) if how == "step" else None
        jitter = rng.uniform(0.0, 0.03) if how == "step" else 0.0
        while running(pid):
            step = logged_step(killed)
            guarded = step >= before + GUARD  # however fast the machine, the run must not end during the kills
            if guarded or (target is not None and step >= target) or (
                    delay is not None and time.perf_counter() - started >= delay):
                time.sleep(jitter)
                os.kill(pid, signal.SIGKILL)  # a child that ended meanwhile is a zombie until waited for: no error
                if guarded and how != "step":
                    how, point = "guard", f"{point or how} not reached by step {step}"
                break
            time.sleep(0.003)
        if delay is not None and how == "time":
            point = f"{delay:.2f} s"
        elif target is not None:
            point = f"step {target} + {jitter * 1000:.0f} ms"
        code = wait(pid)
        record = {"moment": how, "where": point, "occurrence": occurrence, "code": code,
                  "seconds": round(time.perf_counter() - started, 2), "steps": [before, logged_step(killed)],
                  "checkpoints": [p.name for p in checkpoint.CheckpointManager(killed).complete()]}
        report["attempts"].append(record)
        if code not in (0, -signal.SIGKILL):
            report["problems"].append(f"attempt {i} ({how} {point}) failed with {code}: {log.read_text()[-2000:]}")
        report["problems"] += [f"after attempt {i} ({how} {point}): {p}" for p in check_run(killed, out / "reference")]
        kills += code == -signal.SIGKILL
        i += 1

    code = wait(attempt(argv("killed", True), out / "final.log"))
    report["final_code"] = code
    if code != 0:
        report["problems"].append(f"the final --resume failed ({code}): {(out / 'final.log').read_text()[-2000:]}")
    else:
        ref_final = checkpoint.CheckpointManager(out / "reference").latest()
        final = checkpoint.CheckpointManager(killed).latest()
        report["final"] = [ref_final.name, final.name]
        report["final_equal"] = equal(weights(ref_final / "trained.safetensors"), weights(final / "trained.safetensors"))
        report["best_equal"] = equal(weights(out / "reference" / "best" / "trained.safetensors"),
                                     weights(killed / "best" / "trained.safetensors"))
        steps = {}
        for name in ("reference", "killed"):
            records = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
            steps[name] = [(r["kind"], r["step"]) for r in records]
        report["log_equal"] = steps["reference"] == steps["killed"]
        report["problems"] += check_run(killed, out / "reference")
    report["kills"] = sum(a["code"] == -signal.SIGKILL for a in report["attempts"])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
