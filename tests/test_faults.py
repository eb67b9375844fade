"""Injected faults: SIGKILL anywhere in training, a full disk, a damaged feature cache, a killed
`prepare synthetic`, two runs in one folder. Nothing is lost, nothing half-written passes as valid.

The full disk is a real 4 MiB tmpfs when this process may mount one (root); elsewhere ENOSPC is
simulated: every file written through harmonifuse.atomic fails to sync with ENOSPC, as a file
whose blocks could not be allocated does (the test ids say which: ``tmpfs`` or ``simulated``).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import ENV, TESTS
from tiny import tiny_encoder, tiny_harmonifuse, write_tiny_run_config

from harmonifuse import atomic, cli
from harmonifuse.atomic import DiskFullError
from harmonifuse.data.feature_cache import FeatureCache
from harmonifuse.training.checkpoint import CheckpointManager
from harmonifuse.training.lock import RunLockedError, output_dir_lock
from harmonifuse.training.run import load_run_config, train
from harmonifuse.weights import load_weights

pytestmark = pytest.mark.faults


def _weights(path: Path) -> dict:
    return load_weights(path)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


# -- SIGKILL ------------------------------------------------------------------------------------------


def test_sigkill_at_twenty_moments_then_resume_ends_equal_to_an_uninterrupted_run(tmp_path):
    """tests/fault_harness.py: 20 kills (inside checkpoint, export, cache and log writes, at random
    steps and times); every resume starts, every checkpoint left is whole and equals the reference
    run's, and the resumed run ends with the reference's final weights, best model and log."""
    config = write_tiny_run_config(tmp_path / "config", train={"max_steps": 80, "save_every": 2, "eval_every": 8})
    result = subprocess.run([sys.executable, str(TESTS / "fault_harness.py"), str(config), str(tmp_path / "runs"),
                             "--kills", "20", "--seed", "0"], env=ENV, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["problems"] == []
    assert report["kills"] == 20
    inside = {a["where"] for a in report["attempts"] if a["moment"] == "inside" and a["code"] == -signal.SIGKILL}
    assert {"ckpt:state_partial", "ckpt:before_rename", "ckpt:mid_prune", "cache:partial",
            "export:weights_partial"} <= inside, inside
    assert report["final_code"] == 0 and report["final"] == ["step_0000080", "step_0000080"]
    assert report["final_equal"] and report["best_equal"] and report["log_equal"]


def test_resume_skips_a_damaged_newest_checkpoint_and_still_ends_equal(tmp_path, caplog):
    config = write_tiny_run_config(tmp_path, train={"max_steps": 4, "save_every": 2, "eval_every": 1000})
    train(load_run_config(config, [f"train.output_dir={tmp_path / 'reference'}"]), progress=False)
    run = tmp_path / "damaged"
    train(load_run_config(config, [f"train.output_dir={run}"]), progress=False)
    newest = run / "checkpoints" / "step_0000004" / "trained.safetensors"
    data = bytearray(newest.read_bytes())
    data[-8] ^= 0xFF  # a flipped bit in the tensors: safetensors alone would load it
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        train(load_run_config(config, [f"train.output_dir={run}"]), resume=True, progress=False)
    assert "step_0000004 is damaged: checksum mismatch" in caplog.text and "trying the one before it" in caplog.text
    assert _equal(_weights(run / "checkpoints" / "step_0000004" / "trained.safetensors"),
                  _weights(tmp_path / "reference" / "checkpoints" / "step_0000004" / "trained.safetensors"))


# -- a full disk --------------------------------------------------------------------------------------


class SmallDisk:
    """A 4 MiB tmpfs at ``path`` (or, where mounting is not allowed, a folder whose atomic writes
    fail with ENOSPC once ``fill`` was called)."""

    def __init__(self, path: Path, real: bool, monkeypatch) -> None:
        self.path, self.real, self.monkeypatch = path, real, monkeypatch
        self.filler = path / "filler"
        self._full = False

    def fill(self, leave: int = 40 * 1024) -> None:
        """Leave ``leave`` bytes free (for the log's lines, not for a checkpoint or a model)."""
        if self.real:
            free = shutil.disk_usage(self.path).free
            with open(self.filler, "ab") as handle:
                os.posix_fallocate(handle.fileno(), 0, max(0, free - leave) + self._size())
            return
        self._full = True

    def free(self) -> None:
        if self.real:
            self.filler.unlink(missing_ok=True)
        self._full = False

    def _size(self) -> int:
        return self.filler.stat().st_size if self.filler.exists() else 0

    def install(self) -> None:
        if self.real:
            return
        original = atomic._fsync

        def fsync(path):
            if self._full and ".tmp" in str(path):
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(path)

        self.monkeypatch.setattr(atomic, "_fsync", fsync)


@pytest.fixture(params=["tmpfs", "simulated"])
def small_disk(request, tmp_path, monkeypatch):
    mount = tmp_path / "disk"
    mount.mkdir()
    real = False
    if request.param == "tmpfs":
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root; the simulated full disk runs instead")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the simulated full disk runs")
        real = True
    disk = SmallDisk(mount, real, monkeypatch)
    disk.install()
    yield disk
    if real:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_while_writing_a_checkpoint(tmp_path, small_disk, monkeypatch, capsys):
    """The disk fills after the first checkpoint: the next one fails with a clear message, the first
    stays whole, nothing half-written is left; once there is space, --resume ends equal to a run
    that never met a full disk."""
    config = write_tiny_run_config(tmp_path / "config", train={"max_steps": 6, "save_every": 2, "eval_every": 1000})
    run = small_disk.path / "run"
    original_save = CheckpointManager.save

    def save_then_fill(self, step, *args, **kwargs):
        path = original_save(self, step, *args, **kwargs)
        if step == 2:
            small_disk.fill()
        return path

    monkeypatch.setattr(CheckpointManager, "save", save_then_fill)
    code = cli.main(["train", str(config), f"train.output_dir={run}", "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert "step_0000004: No space left on device while writing it" in err
    assert "checkpoint 4 was not saved; the previous one, step_0000002, is intact" in err and "--resume" in err
    assert "Traceback" not in err
    manager = CheckpointManager(run)
    assert [p.name for p in manager.complete()] == ["step_0000002"]
    manager.load(manager.latest())  # whole: its checksum holds
    assert not _leftovers(run) and not (run / "checkpoints" / "step_0000004").exists()
    with output_dir_lock(run):  # the failed run let go of its lock
        pass

    small_disk.free()
    monkeypatch.setattr(CheckpointManager, "save", original_save)
    assert cli.main(["train", str(config), f"train.output_dir={run}", "--resume", "-q"]) == 0
    train(load_run_config(config, [f"train.output_dir={tmp_path / 'reference'}"]), progress=False)
    assert _equal(_weights(run / "checkpoints" / "step_0000006" / "trained.safetensors"),
                  _weights(tmp_path / "reference" / "checkpoints" / "step_0000006" / "trained.safetensors"))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_disk_full_while_writing_a_model(small_disk):
    model = tiny_harmonifuse()
    folder = small_disk.path / "model"
    model.save_pretrained(folder)
    before = {name: (folder / name).read_bytes() for name in ("config.yaml", "trained.safetensors")}
    with torch.no_grad():
        for parameter in model.trained_state_dict().values():
            parameter.add_(1.0)
    small_disk.fill(leave=8 * 1024)
    with pytest.raises(DiskFullError) as info:
        model.save_pretrained(folder)
    assert "trained.safetensors: No space left on device while writing it" in str(info.value)
    assert "any previous version is intact" in str(info.value)
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert not _leftovers(folder)
    tiny_harmonifuse().load_trained(folder / "trained.safetensors")  # the old model, whole


def _wav(path: Path, seconds: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(str(path), (0.3 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
    return path


def test_disk_full_while_writing_the_feature_cache(tmp_path, small_disk):
    cache = FeatureCache(tiny_encoder(), small_disk.path / "features")
    first, second = _wav(tmp_path / "a.wav", 0.5, 0), _wav(tmp_path / "b.wav", 0.5, 1)
    kept = cache.get(first)
    small_disk.fill(leave=8 * 1024)
    with pytest.raises(DiskFullError) as info:
        cache.get(second)
    message = str(info.value)
    assert cache.path_for(cache.key(second)).name in message and "No space left on device" in message
    assert not cache.path_for(cache.key(second)).exists() and not _leftovers(cache.folder)
    assert torch.equal(cache.get(first), kept) and cache.hits == 1  # the entry written before is whole
    small_disk.free()
    assert cache.get(second).shape[0] == 3 and cache.path_for(cache.key(second)).is_file()


# -- a damaged feature cache ----------------------------------------------------------------------------


def test_a_damaged_or_truncated_feature_cache_entry_is_detected_and_recomputed(tmp_path, caplog):
    cache = FeatureCache(tiny_encoder(), tmp_path / "features")
    wav = _wav(tmp_path / "a.wav", 0.5, 0)
    good = cache.get(wav)
    path = cache.path_for(cache.key(wav))
    whole = path.read_bytes()
    middle = len(whole) // 2

    def flipped(at: int) -> bytes:
        data = bytearray(whole)
        data[at] ^= 0x10
        return bytes(data)

    damaged = {
        "truncated half-way": whole[:middle],
        "one byte short": whole[:-1],
        "a flipped bit in the features": flipped(middle),
        "a flipped bit in the checksum": flipped(len(whole) - 6),
        "a damaged trailer": flipped(len(whole) - 14),
        "bytes appended": whole + b"\0" * 7,
    }
    for what, data in damaged.items():
        path.write_bytes(data)
        misses = cache.misses
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = cache.get(wav)
        assert torch.equal(again, good), what  # recomputed, never read as features
        assert cache.misses == misses + 1 and "recomputing" in caplog.text, what
        assert path.read_bytes() == whole, what  # and stored whole again
    # the lookup before training (build) checks sizes: a truncated entry is recomputed there too
    path.write_bytes(whole[:middle])
    assert cache.build([type("U", (), {"id": "a", "audio": str(wav), "duration": 0.5})()], progress=False) == {
        "total": 1, "cached": 0, "computed": 1, "failed": 0}
    assert path.read_bytes() == whole


# -- prepare synthetic killed half-way ------------------------------------------------------------------

needs_synthesis = pytest.mark.skipif(
    not (shutil.which("flite") and shutil.which("espeak-ng") and Path("/usr/share/wordnet/data.noun").is_file()),
    reason="needs `apt-get install flite espeak-ng wordnet-base`")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_synthesis
def test_prepare_synthetic_killed_half_way_then_rerun_is_byte_identical(tmp_path):
    command = [sys.executable, "-m", "harmonifuse.cli", "prepare", "synthetic"]
    reference = subprocess.run([*command, str(tmp_path / "reference"), "--size", "tiny"], env=ENV,
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    total = len(list((tmp_path / "reference").rglob("*.wav")))
    out = tmp_path / "killed"
    process = subprocess.Popen([*command, str(out), "--size", "tiny"], env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # its workers die with it
    deadline = time.time() + 300
    while len(list(out.rglob("*.wav"))) < total // 3:
        assert process.poll() is None, "prepare ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    written = len(list(out.rglob("*.wav")))
    assert written < total and not (out / "ser_test.jsonl").exists()  # killed half-way
    again = subprocess.run([*command, str(out), "--size", "tiny"], env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _snapshot(out) == _snapshot(tmp_path / "reference")  # every file, byte for byte; no temp files


# -- two runs, one folder -------------------------------------------------------------------------------


def test_a_second_train_in_the_same_output_folder_refuses(tmp_path, capsys):
    config = write_tiny_run_config(tmp_path, train={"max_steps": 100000, "save_every": 100000,
                                                    "eval_every": 100000})
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "harmonifuse.cli", "train", str(config), "-q"], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (run / "log.jsonl").is_file() or not (run / "log.jsonl").read_text():
            assert first.poll() is None, "the first run ended early"
            assert time.time() < deadline
            time.sleep(0.05)
        code = cli.main(["train", str(config), "train.max_steps=2", "-q"])
        err = capsys.readouterr().err
        assert code == 2
        assert f"train.output_dir {run} is in use by another training run (pid {first.pid}" in err
        assert "wait for it to finish" in err and "another train.output_dir" in err
        assert not (run / "checkpoints").exists()  # the second wrote nothing
        with pytest.raises(RunLockedError):
            train(load_run_config(config, ["train.max_steps=2"]), progress=False)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the lock died with its holder: the folder is usable at once
    assert cli.main(["train", str(config), "train.max_steps=2", "-q"]) == 0


def test_the_lock_is_held_only_while_training(tmp_path):
    with output_dir_lock(tmp_path / "run"):
        with pytest.raises(RunLockedError, match="is in use by another training run"):
            with output_dir_lock(tmp_path / "run"):
                pass
    with output_dir_lock(tmp_path / "run"):
        pass


def test_a_fresh_run_into_a_folder_holding_a_run_refuses_and_keeps_it(tmp_path, capsys):
    config = write_tiny_run_config(tmp_path, train={"max_steps": 4, "save_every": 2, "eval_every": 2})
    run = tmp_path / "run"
    assert cli.main(["train", str(config), "-q"]) == 0
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".train.lock"}
    assert (run / "best" / "trained.safetensors") in kept and (run / "checkpoints" / "step_0000004" / "done.json") in kept
    capsys.readouterr()  # the first run's progress bars
    assert cli.main(["train", str(config), "train.max_steps=2", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: train.output_dir {run} already holds a run (checkpoints up to step_0000004, "
                          "a best model (best/)); continue it with --resume, set another train.output_dir")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".train.lock"} == kept
    # --resume continues it; another folder starts afresh
    assert cli.main(["train", str(config), "train.max_steps=6", "--resume", "-q"]) == 0
    assert cli.main(["train", str(config), f"train.output_dir={tmp_path / 'other'}", "-q"]) == 0


def test_a_resumed_run_cuts_its_log_back_to_the_checkpoint(tmp_path):
    """What a killed run logged after its checkpoint (and a line cut off mid-write) is dropped, so the
    resumed run logs every step once, as a run never killed does."""
    from harmonifuse.training.logger import RunLogger

    logger = RunLogger(tmp_path, True)
    for step in range(1, 6):
        logger.write({"kind": "train", "step": step})
    logger.file.write('{"kind": "tra')  # killed mid-line
    logger.trim(lambda record: record["step"] > 3)
    logger.write({"kind": "train", "step": 4})
    logger.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
