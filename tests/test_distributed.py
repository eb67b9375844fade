"""Where training runs and how its processes agree: the device choice, one stop decision for all
ranks, resume on another number of processes (tiny models, gloo on the CPU)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from tiny import write_tiny_run_config

from harmonifuse.config import ConfigError, from_dict
from harmonifuse.config.run import TrainConfig
from harmonifuse.training.hardware import DeviceError, choose_device, init_distributed

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
# --standalone: the launcher picks a free port, so runs side by side never collide
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
CPU = torch.device("cpu")


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "harmonifuse.cli", *args], env=ENV, capture_output=True,
                          text=True, timeout=600, **kwargs)


def _summaries(stdout: str) -> list[dict]:
    """The summary line `harmonifuse train` prints, once per rank."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"steps"')]


# -- 1. the device follows the user -------------------------------------------------------------------


def test_auto_is_the_cpu_here_and_a_ranks_own_gpu_where_cuda_is(monkeypatch):
    assert not torch.cuda.is_available()  # this machine: what "auto" must pick is the CPU
    assert choose_device("auto", 0) == CPU and choose_device("auto", 1) == CPU
    assert choose_device("cpu", 3) == CPU
    # the same code where CUDA is (no GPU is touched: choosing creates no tensor)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert choose_device("auto", 1) == torch.device("cuda", 1)  # cuda:$LOCAL_RANK
    assert choose_device("cuda", 0) == torch.device("cuda", 0)
    assert choose_device("cuda:1", 0) == torch.device("cuda", 1)
    assert choose_device("cpu", 1) == CPU
    with pytest.raises(DeviceError, match=r"--device cuda: there is no GPU 2, this machine shows 2"):
        choose_device("cuda", 2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun a fixed GPU would put every rank on it
    with pytest.raises(DeviceError, match=r"every rank takes its own GPU, cuda:\$LOCAL_RANK; pass --device cuda"):
        choose_device("cuda:1", 0)


def test_cuda_without_cuda_and_unknown_devices_are_clear_errors():
    with pytest.raises(DeviceError) as error:
        choose_device("cuda", 0)
    message = str(error.value)
    assert message.startswith("--device cuda: CUDA is not available")
    assert "--device cpu" in message and "pip install torch --index-url" in message
    with pytest.raises(DeviceError, match=r"train.device cuda:0: CUDA is not available"):
        choose_device("cuda:0", 0, option="train.device")
    for bad in ("gpu", "cuda:x", "cuda:", "cpu:0", "CPU", "mps", ""):
        with pytest.raises(DeviceError, match=r"is no device; choose auto, cpu, cuda or cuda:N"):
            choose_device(bad, 0)
        with pytest.raises(ConfigError, match=r"train.device.*must be auto, cpu, cuda or cuda:N"):
            from_dict(TrainConfig, {"device": bad}, "train")


def test_under_torchrun_on_cuda_each_rank_binds_nccl_and_its_gpu(monkeypatch):
    """The calls a CUDA rank makes (recorded, not run: there is no GPU here)."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(calls) and calls[-1][0] == "init")
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    assert init_distributed(torch.device("cuda", 3)) == (3, 4)
    assert calls == [("set_device", torch.device("cuda", 3)), ("init", "nccl", {"device_id": torch.device("cuda", 3)})]
    calls.clear()
    init_distributed(CPU)
    assert calls == [("init", "gloo", {})]


def test_loader_workers_and_pinning_follow_the_device(monkeypatch, caplog):
    from harmonifuse.training.hardware import loader_settings

    gpu = torch.device("cuda", 0)
    assert loader_settings("auto", "auto", CPU) == (0, False)  # workers would take the training's cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_settings("auto", "auto", gpu) == (3, True)  # 32 cores / 8 ranks, one kept for the loop
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loader_settings("auto", "auto", gpu) == (4, True)  # at most 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert loader_settings("auto", False, gpu) == (0, False)  # one core for two ranks: none to spare
    assert loader_settings(2, "auto", CPU) == (2, False)  # a number is taken as given
    with caplog.at_level("WARNING"):
        assert loader_settings(0, True, CPU) == (0, False)
    assert "train.pin_memory: true has no effect on cpu" in caplog.text
    for bad in (-1, "many", 1.5):
        with pytest.raises(ConfigError, match=r"train.num_workers"):
            from_dict(TrainConfig, {"num_workers": bad}, "train")
    assert from_dict(TrainConfig, {"num_workers": 3, "pin_memory": True}, "train").num_workers == 3


def test_device_is_honoured_end_to_end_on_the_tiny_model(tmp_path):
    config = write_tiny_run_config(tmp_path, train={"max_steps": 2, "eval_every": 2, "save_every": 2})
    run = tmp_path / "run"
    # --device cuda fails at once (exit 2), naming the flag and what to do; nothing is trained
    for command in (["train", str(config)], ["analyze", str(tmp_path / "corpus" / "audio" / "asr_0.wav")],
                    ["evaluate", "--manifest", str(tmp_path / "corpus" / "asr_test.jsonl")], ["serve"]):
        result = _cli(*command, "--device", "cuda", "-q" if command[0] != "serve" else "--port=1")
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert result.stderr.startswith("error: --device cuda: CUDA is not available"), result.stderr[-2000:]
        assert "run with --device cpu (or auto)" in result.stderr
    assert not run.exists()
    result = _cli("train", str(config), "train.device=cuda", "-q")  # the config's field is named as such
    assert result.returncode == 2 and result.stderr.startswith("error: train.device cuda: CUDA is not available")
    # --device cpu: trained there, recorded in the summary and in the run's config
    result = _cli("train", str(config), "--device", "cpu", "-q")
    assert result.returncode == 0, result.stderr[-2000:]
    [summary] = _summaries(result.stdout)
    assert summary["device"] == "cpu" and summary["steps"] == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["device"] == "cpu"
    result = _cli("analyze", "--model", str(run / "best"), "--device", "cpu", "--json", "-q",
                  str(tmp_path / "corpus" / "audio" / "ser_1.wav"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["emotion"] in ("neutral", "happy", "sad", "angry")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_steps_and_analyze_on_a_gpu(tmp_path):
    """On a machine with CUDA: `auto` takes the GPU, training runs there (on two GPUs: nccl, one
    each, under ddp and fsdp) and analyze answers from it. Skipped here (no GPU)."""
    config = write_tiny_run_config(tmp_path, train={"max_steps": 4, "eval_every": 4, "save_every": 2})
    several = torch.cuda.device_count() >= 2
    launch = [*TORCHRUN, "2"] if several else [sys.executable]
    for parallel in ("ddp", "fsdp") if several else ("ddp",):
        result = subprocess.run([*launch, "-m", "harmonifuse.cli", "train", str(config), f"train.parallel={parallel}",
                                 f"train.output_dir={tmp_path / parallel}", "-q"], env=ENV,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        summaries = _summaries(result.stdout)
        assert sorted(s["device"] for s in summaries) == [f"cuda:{i}" for i in range(len(summaries))]
        assert all(s["steps"] == 4 and s["hardware"].startswith("cuda: ") for s in summaries)
    result = _cli("analyze", "--model", str(tmp_path / "ddp" / "best"), "--device", "cuda", "--json", "-q",
                  str(tmp_path / "corpus" / "audio" / "asr_1.wav"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "transcript" in json.loads(result.stdout)


# -- 2. one stop decision ----------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so only processes this test started are signalled."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank_process(launcher: int, rank: int) -> int:
    for pid in _descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no process of rank {rank} under {launcher}")


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before it could be signalled"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_the_run_resumes(tmp_path):
    max_steps = 150
    config = write_tiny_run_config(tmp_path, train={"max_steps": max_steps, "save_every": 5, "eval_every": 1000,
                                                    "log_every": 1})
    run = tmp_path / "run"
    command = [*TORCHRUN, "2", "-m", "harmonifuse.cli", "train", str(config), "data.batch_size=2", "-q"]
    launcher = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(run / "checkpoints" / "step_0000005" / "done.json", launcher)  # both ranks are in the loop
    os.kill(_rank_process(launcher.pid, 1), signal.SIGTERM)  # rank 1 alone: it writes nothing itself
    try:
        out, err = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a rank left alone waits in a collective for ever
        launcher.terminate()  # torchrun stops its workers
        launcher.communicate()
        raise AssertionError("the ranks did not stop together: the run hung after the signal") from None
    assert launcher.returncode == 0, err[-3000:]
    summaries = _summaries(out)
    assert len(summaries) == 2  # one per rank, both ended normally
    assert [s["stop_reason"] for s in summaries] == [f"signal {int(signal.SIGTERM)}"] * 2
    assert summaries[0]["steps"] == summaries[1]["steps"]
    stopped = summaries[0]["steps"]
    assert 5 <= stopped < max_steps
    assert (run / "checkpoints" / f"step_{stopped:07d}" / "done.json").is_file()  # the last step is kept

    resumed = subprocess.run([*command, "--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [(s["steps"], s["stop_reason"]) for s in _summaries(resumed.stdout)] == [(max_steps, "max_steps")] * 2
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, max_steps + 1))


def test_a_job_over_nodes_whose_output_folder_is_not_shared_stops_at_once(tmp_path):
    """Two 'nodes' of one rank each (LOCAL_WORLD_SIZE=1), each seeing its own disk under one path:
    both ranks stop before any training, with the folder and the fix named."""
    config = write_tiny_run_config(tmp_path, train={"max_steps": 2})
    node_local = tmp_path / "launch_on_node_local_disks.py"  # what a node-local /scratch looks like
    node_local.write_text(
        "import os, sys\n"
        "os.environ['LOCAL_WORLD_SIZE'] = '1'\n"
        "from harmonifuse.cli import main\n"
        f"sys.exit(main(['train', {str(config)!r},\n"
        f"               'train.output_dir={tmp_path}/node' + os.environ['RANK'] + '/run', '-q']))\n")
    result = subprocess.run([*TORCHRUN, "2", str(node_local)], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "error: the output folder (train.output_dir)" in result.stderr
    assert "is not shared between the nodes of this job: rank 1 cannot see the marker file" in result.stderr
    assert "every node mounts at the same path" in result.stderr
    assert not list(tmp_path.glob("node*/run/checkpoints"))  # nothing trained
    # one node: no check, no marker left behind
    result = subprocess.run([*TORCHRUN, "2", "-m", "harmonifuse.cli", "train", str(config), "data.batch_size=2",
                             "-q"], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list((tmp_path / "run").glob(".harmonifuse-shared-*"))


def test_a_time_budget_stops_every_rank_at_the_same_step(tmp_path):
    """Each rank measures its own minutes; the ranks still stop, evaluate and save at one step."""
    config = write_tiny_run_config(tmp_path, train={"max_steps": 5000, "max_minutes": 0.05, "save_every": 5000,
                                                    "eval_every": 5000})
    result = subprocess.run([*TORCHRUN, "2", "-m", "harmonifuse.cli", "train", str(config), "data.batch_size=2",
                             "-q"], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = _summaries(result.stdout)
    assert [s["stop_reason"] for s in summaries] == ["max_minutes"] * 2
    assert summaries[0]["steps"] == summaries[1]["steps"] < 5000
    stopped = summaries[0]["steps"]
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "dev"] == [stopped]  # scored once, at the stop
    assert (tmp_path / "run" / "checkpoints" / f"step_{stopped:07d}" / "done.json").is_file()


# -- 3. resume on another number of processes --------------------------------------------------------


def _loader_state(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step_{step:07d}" / "state.pt", weights_only=True)["loader"]


def _used(progress: dict) -> dict[str, set[int]]:
    import numpy as np

    return {task: set(np.flatnonzero(np.unpackbits(np.frombuffer(p["used"], dtype=np.uint8), count=8)).tolist())
            for task, p in progress.items()}


@pytest.mark.parametrize("world", [1, 3])
def test_a_checkpoint_of_two_processes_resumes_on_one_and_on_three(tmp_path, world):
    import shutil

    # 8 utterances a task, 2 a rank: on 2 processes a pass is 2 global batches of 4 and the
    # round-robin epoch 4 steps (asr, ser, asr, ser); stopped at step 3, ser has used half its pass
    config = write_tiny_run_config(tmp_path, train={"max_steps": 3, "save_every": 100, "eval_every": 1000},
                                   data={"batch_size": 2})
    first = subprocess.run([*TORCHRUN, "2", "-m", "harmonifuse.cli", "train", str(config), "-q"], env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = _loader_state(tmp_path / "run", 3)
    assert (saved["epoch"], saved["step"], saved["config"]["world_size"]) == (0, 3, 2)
    assert {task: p["pass"] for task, p in saved["progress"].items()} == {"asr": 0, "ser": 0}
    before = _used(saved["progress"])
    assert len(before["asr"]) == 8 and len(before["ser"]) == 4

    run = tmp_path / f"on{world}"
    shutil.copytree(tmp_path / "run", run)
    launch = [*TORCHRUN, str(world)] if world > 1 else [sys.executable]
    resumed = subprocess.run([*launch, "-m", "harmonifuse.cli", "train", str(config), f"train.output_dir={run}",
                              "train.max_steps=6", "--resume", "-q"], env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [s["steps"] for s in _summaries(resumed.stdout)] == [6] * world
    # the schedule went on where it stopped: ser, asr, ser, ... never two of a task in a row
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["tasks"][0] for r in records if r["kind"] == "train"] == ["asr", "ser"] * 3
    # epoch 0 ended once ser's unused half was taken: on 3 processes in one global batch (step 4),
    # on one in two (steps 4 and 6, asr's next pass at step 5); its ser utterances are each used once
    end = _loader_state(run, 6)
    assert end["config"]["world_size"] == world
    if world == 3:
        assert (end["epoch"], end["step"]) == (1, 2)  # epoch 1's asr and ser batches at steps 5, 6
    else:
        assert (end["epoch"], end["step"]) == (0, 6)
        ser = end["progress"]["ser"]
        assert ser["pass"] == 0 and _used(end["progress"])["ser"] == set(range(8))
