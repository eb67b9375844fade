"""Where training runs and how its processes agree: the device choice, one stop decision for all
ranks, resume on another number of processes, and no rank ever waiting on a collective the others
skip (tiny models, gloo on the CPU)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import ENV, TORCHRUN, run_cli as _cli, train_summaries as _summaries
from tiny import write_tiny_run_config

from harmonifuse.config import ConfigError, from_dict
from harmonifuse.config.run import TrainConfig
from harmonifuse.training.hardware import DeviceError, choose_device, init_distributed

CPU = torch.device("cpu")


# -- 1. the device follows the user -------------------------------------------------------------------


def test_auto_is_the_cpu_here_and_a_ranks_own_gpu_where_cuda_is(monkeypatch):
    assert not torch.cuda.is_available()  # this machine: what "auto" must pick is the CPU
    assert choose_device("auto", 0) == CPU and choose_device("auto", 1) == CPU
    assert choose_device("cpu", 3) == CPU
    # the same code where CUDA is (no GPU is touched: choosing creates no tensor); the chosen GPU becomes
    # the process's current one (--device cuda:1 must not leave the CUDA generator and nccl on cuda:0),
    # and float32 matmuls (the CTC over the vocabulary) may use TF32
    bound = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        assert choose_device("auto", 1) == torch.device("cuda", 1)  # cuda:$LOCAL_RANK
        assert choose_device("cuda", 0) == torch.device("cuda", 0)
        assert choose_device("cuda:1", 0) == torch.device("cuda", 1)
        assert choose_device("cpu", 1) == CPU
        assert bound == [torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cuda", 1)]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
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
    assert init_distributed(torch.device("cuda", 3), timeout=timedelta(minutes=30)) == (3, 4)
    assert calls == [("set_device", torch.device("cuda", 3)),
                     ("init", "nccl", {"device_id": torch.device("cuda", 3), "timeout": timedelta(minutes=30)})]
    calls.clear()
    init_distributed(CPU)
    assert calls == [("init", "gloo", {})]


def test_a_gpu_without_native_bf16_trains_in_float32_with_a_message(monkeypatch, caplog):
    """Pre-Ampere GPUs (V100, T4) only emulate bf16, several times slower than float32."""
    from harmonifuse.modules.llm import resolve_frozen_dtype
    from harmonifuse.training.hardware import choose_precision

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with caplog.at_level("WARNING"):
        for requested in ("auto", "bf16"):
            assert choose_precision(requested, gpu) is None
    assert "Tesla V100-SXM2-32GB (compute capability 7.0) has no native bf16: training in float32" in caplog.text
    assert resolve_frozen_dtype("auto", gpu) == torch.float32
    assert resolve_frozen_dtype("bfloat16", gpu) == torch.bfloat16  # asked for by name: as asked
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100
    assert choose_precision("auto", gpu) == torch.bfloat16 and choose_precision("fp32", gpu) is None
    assert resolve_frozen_dtype("auto", gpu) == torch.bfloat16


def test_on_a_gpu_the_frozen_llm_loads_straight_onto_it(monkeypatch, tmp_path):
    """Not whole into host memory first (eight ranks of a node: eight copies of a 7B LLM in host memory)."""
    import transformers
    from tiny import tiny_llama, tiny_tokenizer

    from harmonifuse.modules.llm import SpeechLLM

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    calls = []

    def from_pretrained(path, **options):
        calls.append(options)
        return tiny_llama(len(tokenizer))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    SpeechLLM.from_pretrained(str(tmp_path), frozen_dtype="bfloat16", device=torch.device("cuda", 1))
    SpeechLLM.from_pretrained(str(tmp_path), frozen_dtype="float32", device=CPU)
    assert calls[0]["device_map"] == {"": torch.device("cuda", 1)} and calls[0]["dtype"] == torch.bfloat16
    assert "device_map" not in calls[1]  # the CPU: where transformers loads anyway


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


@pytest.mark.multiprocess
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


@pytest.mark.multiprocess
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


@pytest.mark.multiprocess
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


@pytest.mark.multiprocess
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


@pytest.mark.multiprocess
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


# -- 4. no rank waits on a collective the others skip ------------------------------------------------


def _script(path: Path, setup: str, *argv) -> Path:
    """A program for torchrun: ``setup`` (Python, run first on every rank, ``RANK`` an int), then
    ``harmonifuse ARGV``. What the setup patches stands for what real hardware does (slow scoring, ...)."""
    path.write_text("import os, sys, time\nRANK = int(os.environ['RANK'])\n" + textwrap.dedent(setup)
                    + f"\nfrom harmonifuse.cli import main\nsys.exit(main({[str(a) for a in argv]!r}))\n")
    return path


def test_the_collective_timeout_is_a_config_field():
    assert TrainConfig().collective_timeout_minutes == 30.0
    with pytest.raises(ConfigError, match=r"train.collective_timeout_minutes.*must be > 0 minutes"):
        from_dict(TrainConfig, {"collective_timeout_minutes": 0}, "train")


@pytest.mark.multiprocess
def test_dev_scoring_longer_than_the_collective_timeout_is_split_over_the_ranks(tmp_path):
    """Each dev batch takes 6 s to score here, 8 batches: 48 s for one process, twice the 24 s
    collective timeout. Rank 0 scoring alone (the others waiting in a broadcast) stopped the run; split,
    every rank scores 4 and the metrics are those of one process scoring everything. The same run
    checks that the ranks draw their own random numbers in training (SpecAugment masks, dropout:
    every rank seeded alike used to mask the same frames of different utterances)."""
    from harmonifuse.config import load_config
    from harmonifuse.config.run import RunConfig
    from harmonifuse.evaluation.evaluate import evaluate
    from harmonifuse.evaluation.metrics import dev_score
    from harmonifuse.model import HarmoniFuse
    from harmonifuse.training.loaders import feature_cache_for, read_split

    config = write_tiny_run_config(tmp_path, train={"max_steps": 2, "eval_every": 2, "save_every": 2,
                                                    "collective_timeout_minutes": 0.4}, data={"batch_size": 2})
    scored, draws = tmp_path / "scored.txt", tmp_path / "draws.txt"
    slow_scoring = f"""
        import torch
        from harmonifuse.model import HarmoniFuse
        from harmonifuse.modules.feature_masking import FeatureMasking
        answer, mask = HarmoniFuse.analyze_hidden, FeatureMasking.forward
        def slowly(self, hidden, *args, **kwargs):
            time.sleep(6)
            with open({str(scored)!r}, "a") as log:
                log.write(f"{{RANK}}\\n")
            return answer(self, hidden, *args, **kwargs)
        def drawn(self, hidden, lengths):  # the draw SpecAugment would make next, once per training step
            with open({str(draws)!r}, "a") as log:
                log.write(f"{{RANK}} {{torch.rand(()).item()}}\\n")
            return mask(self, hidden, lengths)
        HarmoniFuse.analyze_hidden, FeatureMasking.forward = slowly, drawn
    """
    script = _script(tmp_path / "slow_dev.py", slow_scoring, "train", config, "-q")
    result = subprocess.run([*TORCHRUN, "2", str(script)], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [s["steps"] for s in _summaries(result.stdout)] == [2, 2]
    assert sorted(scored.read_text().split()) == ["0"] * 4 + ["1"] * 4  # 8 dev batches, 4 each
    by_rank = {rank: [] for rank in "01"}
    for rank, value in map(str.split, draws.read_text().splitlines()):
        by_rank[rank].append(value)
    assert len(by_rank["0"]) == len(by_rank["1"]) == 2 and not set(by_rank["0"]) & set(by_rank["1"])
    [dev] = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
             if r["kind"] == "dev"]
    # one process, everything, the same weights (best = step 2, the only evaluation) and batches
    run = load_config(RunConfig, str(config))
    model = HarmoniFuse.from_pretrained(str(tmp_path / "run" / "best"))
    manifests = read_split(Path(run.data.root), run.data.dev, run.model.tasks.emotion_labels)
    metrics = evaluate(model, manifests, batch_size=2, cache=feature_cache_for(model.encoder, run.data),
                       progress=False)["metrics"]
    metrics["score"] = dev_score(metrics)
    for key in ("wer", "cer", "wa", "ua", "macro_f1", "asr_confidence", "ser_confidence", "ser_ece", "score"):
        assert dev[key] == pytest.approx(metrics[key], rel=1e-9, abs=1e-12), key


def _paired_corpus(corpus: Path) -> None:
    """Training manifests in which every utterance comes twice, the copy (another file, the same audio)
    listed 0.1 ms longer so that it sorts right after its original: 2 pairs a task make one global batch
    of 4 a pass, of which rank 0 takes the originals and rank 1 their copies (the strided shard). So
    the gradient of every step is that of rank 0's items alone, whatever rank 1 contributes."""
    import dataclasses
    import shutil

    from harmonifuse.data.manifest import read_manifest, write_manifest

    for task in ("asr", "ser"):
        originals = read_manifest(corpus / f"{task}_train.jsonl")[:2]
        assert abs(originals[0].duration - originals[1].duration) > 1e-3
        paired = []
        for u in originals:
            copy = corpus / "audio" / f"{u.id}_copy.wav"
            shutil.copy(u.audio, copy)
            paired += [u, dataclasses.replace(u, id=f"{u.id}_copy", audio=str(copy), duration=u.duration + 1e-4)]
        write_manifest(corpus / f"{task}_train.jsonl", paired)


@pytest.mark.multiprocess
def test_a_rank_whose_whole_batch_is_unreadable_still_joins_the_step(tmp_path):
    """Rank 1's SER items are unreadable files (data.bad_samples: skip), so its SER batches are empty.
    It used to run backward() outside the wrapped model, joining no gradient all-reduce: the other
    rank's then met its next collective (a hang, or wrong gradients). Now it runs a stand-in through
    the wrapped model with its loss times zero: the same weights as the run whose copies were readable
    (rank 1's items are copies of rank 0's, so they change no gradient there), under ddp and fsdp."""
    from safetensors.torch import load_file

    config = write_tiny_run_config(tmp_path, train={"max_steps": 3, "eval_every": 3, "save_every": 3,
                                                    "collective_timeout_minutes": 1.0},
                                   data={"batch_size": 2, "feature_cache": "off"})
    _paired_corpus(tmp_path / "corpus")

    def run(name: str, *args: str) -> tuple[dict, list[dict]]:
        result = subprocess.run([*TORCHRUN, "2", "-m", "harmonifuse.cli", "train", str(config),
                                 f"train.output_dir={tmp_path / name}", *args, "-q"], env=ENV,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return load_file(str(tmp_path / name / "checkpoints" / "step_0000003" / "trained.safetensors")), \
            _summaries(result.stdout)

    readable, _ = run("readable")
    for u in (tmp_path / "corpus" / "audio").glob("ser_*_copy.wav"):
        u.write_bytes(b"not audio")
    for kind, atol in (("ddp", 1e-7), ("fsdp", 2e-5)):  # fsdp sums in another order (test_fsdp.py)
        weights, summaries = run(f"unreadable_{kind}", f"train.parallel={kind}")
        skipped = sorted(s["skipped"]["ser"] for s in summaries)
        assert skipped[0] == 0 and skipped[1] >= 2, summaries  # rank 1 alone, a whole batch or more
        assert weights.keys() == readable.keys()
        for name in weights:
            assert torch.allclose(weights[name], readable[name], rtol=0, atol=atol), \
                (kind, name, float((weights[name] - readable[name]).abs().max()))


@pytest.mark.multiprocess
def test_llm_gradient_checkpointing_is_non_reentrant_so_ddp_finds_unused_parameters(monkeypatch, tmp_path):
    """transformers 4.x checkpoints reentrantly unless told; reentrant checkpointing hides the LoRA
    weights from DDP's search for unused parameters (find_unused_parameters: the alignment stage, a
    trained encoder), whose backward then fails with 'mark a variable ready only once'. Emulated here
    (transformers 5 defaults to non-reentrant) on a one-process gloo group."""
    from tiny import tiny_harmonifuse
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    from harmonifuse.data.batch import SpeechBatch

    enable = PreTrainedModel._activation_checkpointing_enable

    def as_on_transformers_4(self, options=None, *args, **kwargs):
        return enable(self, {"use_reentrant": True} if options is None else options, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_activation_checkpointing_enable", as_on_transformers_4)
    model = tiny_harmonifuse().train()
    model.enable_gradient_checkpointing()
    layers = [m for m in model.llm.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and all(m._gradient_checkpointing_func.keywords["use_reentrant"] is False for m in layers)
    torch.manual_seed(0)
    batch = SpeechBatch(task="asr", tasks=["asr", "asr"], ids=["a", "b"], targets=["hello world", "the lazy dog"],
                        waveforms=0.1 * torch.randn(2, 8000), wave_lengths=torch.tensor([8000, 6000]))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        for _ in range(2):
            ddp(batch).loss.backward()
    finally:
        dist.destroy_process_group()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.multiprocess
def test_only_rank_0_builds_the_corpus_while_the_others_wait(tmp_path):
    """Every rank calls ensure_corpus at the start of training; they used to synthesise into one
    folder at once. Now rank 0 builds, the others wait and read it; an error of rank 0's is every rank's."""
    built = tmp_path / "built.txt"
    program = tmp_path / "corpus_ranks.py"
    program.write_text(textwrap.dedent(f"""
        import os, time
        from pathlib import Path
        import torch.distributed
        from harmonifuse.config.run import DataConfig
        from harmonifuse.data import synthetic
        from harmonifuse.training.hardware import init_distributed
        from harmonifuse.training.loaders import ensure_corpus

        rank = int(os.environ["RANK"])
        def prepare(out, **options):  # stands for minutes of speech synthesis
            with open({str(built)!r}, "a") as log:
                log.write(f"start {{rank}} {{time.time()}}\\n")
            time.sleep(3)
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / synthetic.PLAN_FILE).write_text("{{}}")
            for task in synthetic.TASKS:
                for split in synthetic.SPLITS:
                    (Path(out) / synthetic.manifest_name(task, split)).write_text("")
            with open({str(built)!r}, "a") as log:
                log.write(f"done {{rank}} {{time.time()}}\\n")
        synthetic.prepare = prepare
        init_distributed()
        root = ensure_corpus(DataConfig(root={str(tmp_path / 'corpus')!r}), progress=False)
        def say(line):  # one write per line: two ranks share the pipe, and print's pieces interleave
            os.write(1, (line + "\\n").encode())
        say(f"rank {{rank}} has {{root}} at {{time.time()}}")
        try:
            ensure_corpus(DataConfig(root={str(tmp_path / 'mine')!r}, build_synthetic=False), progress=False)
        except FileNotFoundError as error:
            say(f"rank {{rank}} error: {{error}}")
        torch.distributed.destroy_process_group()
    """))
    result = subprocess.run([*TORCHRUN, "2", str(program)], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [line.split() for line in built.read_text().splitlines()]
    assert [e[:2] for e in events] == [["start", "0"], ["done", "0"]]  # rank 0 alone built
    finished = float(events[1][2])
    having = {int(w[1]): float(w[-1]) for w in map(str.split, result.stdout.splitlines()) if w[2:3] == ["has"]}
    assert sorted(having) == [0, 1] and having[1] >= finished, result.stdout  # rank 1 waited for the corpus
    errors = [line for line in result.stdout.splitlines() if " error: " in line]
    assert len(errors) == 2 and all("data.train.asr: training manifest" in line for line in errors)


def test_a_collective_timeout_is_told_apart_from_other_errors():
    from harmonifuse.training.hardware import is_collective_timeout

    gloo = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 24000ms for recv operation "
                        "to complete")
    nccl = RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE)")
    assert is_collective_timeout(gloo) and is_collective_timeout(nccl)
    assert not is_collective_timeout(RuntimeError("DataLoader timed out after 60 seconds"))
    assert not is_collective_timeout(ValueError("timed out waiting"))
