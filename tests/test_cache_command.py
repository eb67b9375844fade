"""`harmonifuse cache CONFIG`: every process builds its share of the feature cache (tiny encoder, gloo
on the CPU); an interrupted build resumes; multi-node jobs refuse a cache folder the nodes do not share."""
import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ENV, TORCHRUN
from tiny import write_tiny_run_config

from harmonifuse import cli
from harmonifuse.config import ConfigError
from harmonifuse.data.feature_cache import FeatureCache
from harmonifuse.training.feature_cache_build import cache_command
from harmonifuse.training.run import load_run_config



@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """A tiny run config: 16 distinct clips (8 ASR, 8 SER; train, dev and test list the same)."""
    return write_tiny_run_config(tmp_path_factory.mktemp("run"))


def _files(folder: Path) -> dict[str, bytes]:
    """Every cache file (features and meta.json) by its path inside ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cache_in_process(capsys, config: Path, folder: Path, *extra: str) -> tuple[int, dict | None]:
    status = cli.main(["cache", str(config), f"data.feature_cache={folder}", "--device", "cpu", "-q", *extra])
    lines = capsys.readouterr().out.splitlines()
    return status, (json.loads(lines[-1]) if status == 0 else None)


@pytest.mark.multiprocess
def test_two_processes_build_disjoint_shares_equal_to_one_process_build(config, tmp_path, capsys):
    # batch size 1: every clip is encoded alone in both builds, so the bytes cannot depend on which
    # clips shared a padded batch (float rounding), only on the sharing of the work
    one = tmp_path / "one"
    status, single = _cache_in_process(capsys, config, one, "--batch-size", "1")
    assert status == 0 and single["world_size"] == 1
    assert single["overall"] == {"total": 16, "cached": 0, "computed": 16, "failed": 0}

    two = tmp_path / "two"
    result = subprocess.run([*TORCHRUN, "2", "-m", "harmonifuse.cli", "cache", str(config),
                             f"data.feature_cache={two}", "--device", "cpu", "--batch-size", "1"],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])  # rank 0 alone prints, after the all-reduce
    assert summary["world_size"] == 2 and summary["overall"] == single["overall"]
    per_rank = summary["per_rank"]
    assert [r["computed"] for r in per_rank] == [8, 8]  # disjoint shares (distinct audio) that cover all
    assert "rank 0: total 8, cached 0, computed 8, failed 0" in result.stdout
    assert "rank 1: total 8, cached 0, computed 8, failed 0" in result.stdout
    assert "feature cache " in result.stdout and "computed 16" in result.stdout
    assert _files(two) == _files(one)  # the same files, byte for byte

    # a rerun computes nothing, with one process or two
    status, again = _cache_in_process(capsys, config, two)
    assert status == 0 and again["overall"] == {"total": 16, "cached": 16, "computed": 0, "failed": 0}
    result = subprocess.run([*TORCHRUN, "2", "-m", "harmonifuse.cli", "cache", str(config),
                             f"data.feature_cache={one}", "--device", "cpu", "-q"],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert [r["computed"] for r in summary["per_rank"]] == [0, 0]
    assert summary["overall"] == {"total": 16, "cached": 16, "computed": 0, "failed": 0}


def test_an_interrupted_build_resumes_where_it_stopped(config, tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference"
    assert _cache_in_process(capsys, config, reference, "--batch-size", "1")[0] == 0
    compute = FeatureCache.compute
    calls = []

    def dies_on_the_third_batch(self, waveforms):
        calls.append(len(waveforms))
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) in the middle of the build
        return compute(self, waveforms)

    folder = tmp_path / "cache"
    monkeypatch.setattr(FeatureCache, "compute", dies_on_the_third_batch)
    assert _cache_in_process(capsys, config, folder, "--batch-size", "1")[0] == 130
    assert len(list(folder.rglob("*.npy"))) == 2
    monkeypatch.setattr(FeatureCache, "compute", compute)
    status, summary = _cache_in_process(capsys, config, folder, "--batch-size", "1")
    assert status == 0
    assert summary["overall"] == {"total": 16, "cached": 2, "computed": 14, "failed": 0}
    assert _files(folder) == _files(reference)
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_nothing_to_cache_is_a_clear_error(config, monkeypatch):
    run = load_run_config(str(config))
    with pytest.raises(ConfigError, match=r'data.feature_cache is "off"; nothing to build'):
        cache_command(load_run_config(str(config), ["data.feature_cache='off'"]), device="cpu", progress=False)
    with pytest.raises(ConfigError, match=r"trainable is true.*nothing to build"):
        cache_command(load_run_config(str(config), ["model.encoder.trainable=true"]), device="cpu", progress=False)
    # "auto" on a GPU: training runs the frozen encoder in its forward pass, there is nothing to build
    from harmonifuse.training import hardware

    monkeypatch.setattr(hardware, "choose_device", lambda *args, **kwargs: torch.device("cuda", 0))
    auto = load_run_config(str(config), ["data.feature_cache=auto"])
    with pytest.raises(ConfigError, match=r'"auto", which caches nothing on cuda.*data.feature_cache=FOLDER'):
        cache_command(auto, device="cuda", progress=False)
    assert run.data.feature_cache != "auto"  # a folder caches on every device: not refused (it would run)


SHARED_CHECK = textwrap.dedent('''
    import os, sys
    from pathlib import Path

    import torch.distributed as dist

    from harmonifuse.training.shared_folders import SharedFolderError, check_shared_folder

    dist.init_process_group("gloo")
    rank, base = dist.get_rank(), Path(sys.argv[1])
    check_shared_folder(base / "own" / f"rank{rank}", "the test folder")  # one node: not checked
    os.environ["LOCAL_WORLD_SIZE"] = "1"  # from here on: as if each rank ran on a node of its own
    check_shared_folder(base / "shared", "the test folder")  # every rank sees it
    print(f"rank {rank}: shared ok, {sorted(os.listdir(base / 'shared'))}", flush=True)
    try:
        check_shared_folder(base / "own" / f"rank{rank}", "the test folder", remedy="or set X to a shared path")
    except SharedFolderError as error:
        print(f"rank {rank}: {error}", flush=True)
        sys.exit(3)
    print(f"rank {rank}: no error", flush=True)
''')


@pytest.mark.multiprocess
def test_a_folder_the_nodes_do_not_share_fails_fast_naming_it(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SHARED_CHECK)
    result = subprocess.run([*TORCHRUN, "2", str(script), str(tmp_path)], env=ENV, capture_output=True,
                            text=True, timeout=300)
    out = result.stdout
    assert result.returncode != 0, out
    assert "rank 0: shared ok, []" in out and "rank 1: shared ok, []" in out  # the marker is removed again
    assert "no error" not in out
    mine = tmp_path / "own" / "rank1"
    assert (f"rank 1: the test folder {mine} is not shared between the nodes of this job: rank 1 cannot see the "
            "marker file rank 0 wrote there") in out
    assert "put it on a shared filesystem that every node mounts at the same path" in out
    assert "or set X to a shared path" in out
    assert (f"rank 0: the test folder {tmp_path / 'own' / 'rank0'} is not shared between the nodes of this job: "
            "rank(s) 1 cannot see it") in out


@pytest.mark.multiprocess
def test_training_with_an_incomplete_cache_builds_it_with_every_process(config, tmp_path):
    folder = tmp_path / "features"
    result = subprocess.run([*TORCHRUN, "2", "-m", "harmonifuse.cli", "train", str(config),
                             f"data.feature_cache={folder}", f"train.output_dir={tmp_path / 'run'}",
                             "train.max_steps=1", "train.eval_every=1000", "train.save_every=1000",
                             "data.batch_size=2", "-q"],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("the feature cache is incomplete") == 1  # rank 0 says so, with the faster way
    assert "run `harmonifuse cache CONFIG` first" in result.stderr and "(8 to compute here)" in result.stderr
    assert len(list(folder.rglob("*.npy"))) == 16  # both shares: rank 0 alone computed half of them
