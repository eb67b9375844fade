"""Every kind of bad input (tests/make_bad_inputs.py) through the CLI and the Python API.

Each kind ends as the corpus's table says: answered, answered as no speech, or one message that
names the file (line, field) and says what to do, with no stack trace (unless ``--debug``). In a
batch, the other files are still answered and the exit status says some failed.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import make_bad_inputs
import pytest
import torch
from conftest import ENV
from tiny import plain_model, tiny_harmonifuse, tiny_wavlm_config, write_tiny_assets
from transformers import WavLMConfig

from harmonifuse import cli
from harmonifuse.audio import AudioError
from harmonifuse.config import ConfigError, ModelConfig, from_dict
from harmonifuse.data.manifest import ManifestError, read_manifest
from harmonifuse.model import HarmoniFuse
from harmonifuse.modules.encoders.ssl import SSLSpeechEncoder
from harmonifuse.tasks import EMOTION_LABELS
from harmonifuse.training.run import load_run_config
from harmonifuse.weights import WeightsError

SPEECH = shutil.which("flite") is not None  # else the clips are speech-like tones the detector may not take for speech
KINDS = {k.name: k for k in make_bad_inputs.KINDS}
BY_GROUP = {g: [k.name for k in make_bad_inputs.KINDS if k.group == g] for g in ("audio", "manifest", "config", "model")}


def test_the_corpus_has_at_least_thirty_kinds():
    assert len(KINDS) >= 30 and len(make_bad_inputs.KINDS) == len(KINDS)  # names unique
    assert all(BY_GROUP.values())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus, a tiny model folder like a real one (voice activity detection on, a small encoder
    window so 40 s is a long recording) and weights of another configuration."""
    root = tmp_path_factory.mktemp("bad_inputs")
    encoder_dir, llm_dir = write_tiny_assets(root / "assets")
    # the tiny encoder at 100 frames per second instead of 800: seconds of audio stay cheap
    settings = {**tiny_wavlm_config().to_dict(), "conv_dim": (8, 8, 8, 8), "conv_stride": (5, 4, 4, 2),
                "conv_kernel": (10, 4, 4, 2)}
    settings.pop("num_feat_extract_layers", None)
    torch.manual_seed(0)
    SSLSpeechEncoder.from_config(WavLMConfig(**settings)).model.save_pretrained(encoder_dir)
    sections = plain_model(encoder={"source": str(encoder_dir), "max_seconds": 8.0},
                           llm={"source": str(llm_dir), "lora_rank": 4, "lora_alpha": 8.0, "max_new_tokens": 4},
                           projector={"stack": 2, "hidden_size": 24}, vad={"enabled": True})
    model = HarmoniFuse.build(from_dict(ModelConfig, sections))
    model.save_pretrained(root / "model")
    wider = {**sections, "projector": {**sections["projector"], "hidden_size": 32}}
    other = HarmoniFuse.build(from_dict(ModelConfig, wider))
    other.save_pretrained(root / "other")
    kinds = make_bad_inputs.build(root / "corpus", root / "model", root / "other" / "trained.safetensors")
    built = {k.name: k for k in kinds}
    assert set(built) == set(KINDS)
    model = HarmoniFuse.from_pretrained(root / "model")
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only waits (20x slower on a busy machine)
    yield {"root": root, "model": model, "kinds": built, "good": built["flac"].path}
    torch.set_num_threads(threads)


def check_message(message: str, kind, path: str | None = None) -> None:
    """One message: names the input, says what is wrong and what to do, no stack trace."""
    name = Path(path or kind.path).name
    assert name in message, (kind.name, message)
    for needle in kind.needles:
        assert needle in message, (kind.name, needle, message)
    assert "Traceback" not in message and 'File "' not in message, message


def check_answer(result: dict, kind) -> None:
    assert "error" not in result, (kind.name, result)
    assert result["duration"] > 0
    if kind.outcome == "no_speech":
        assert result["no_speech"] is True and result["transcript"] == "" and result["emotion"] is None
        return
    assert "transcript" in result and "emotion" in result
    if SPEECH:
        assert result["no_speech"] is False, kind.name
        assert result["emotion"] in EMOTION_LABELS and set(result["emotion_probs"]) == set(EMOTION_LABELS)
    if kind.name == "long_recording":
        assert result["duration"] == pytest.approx(40.0, abs=0.01)
        if SPEECH:
            assert len(result["segments"]) >= 2 and all(s["end"] - s["start"] <= 8.0 for s in result["segments"])


# -- running as a user without the right to read other users' files, even as root ----------------------

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_DAC = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: root reads any file with them


@contextmanager
def file_permissions_apply():
    """Root ignores file modes; lower this thread's effective DAC capabilities for the block."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        pytest.skip("cannot read this thread's capabilities")
    saved = data[0].effective
    data[0].effective = saved & ~_DAC
    if libc.capset(ctypes.byref(header), data) != 0:
        pytest.skip("cannot lower this thread's capabilities")
    try:
        yield
    finally:
        data[0].effective = saved
        libc.capset(ctypes.byref(header), data)


def _drop_dac_for_child() -> None:
    """preexec_fn: the child (root or not) is refused files it has no permission to read."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):
            libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP: gone from the program it executes


# -- audio: the Python API -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BY_GROUP["audio"])
def test_audio_kind_through_the_python_api(corpus, name, caplog):
    kind = corpus["kinds"][name]
    model = corpus["model"]
    with file_permissions_apply(), caplog.at_level(logging.WARNING):
        if kind.is_error:
            with pytest.raises(AudioError) as info:
                model.analyze(kind.path)
            check_message(str(info.value), kind)
            return
        result = model.analyze(kind.path)
    check_answer(result, kind)
    if name == "truncated_wav":
        check_message(caplog.text, kind)
    # the list form answers it alike, beside a good file
    results = model.analyze([corpus["good"], kind.path])
    assert "error" not in results[0] and results[1]["no_speech"] == result["no_speech"]


@pytest.mark.parametrize("name", [n for n in BY_GROUP["audio"] if KINDS[n].outcome == "no_speech"])
def test_silence_is_an_error_with_voice_activity_detection_off(corpus, name):
    kind = corpus["kinds"][name]
    with pytest.raises(AudioError) as info:
        tiny_harmonifuse().analyze(kind.path)  # the tiny models have the detector off
    check_message(str(info.value), kind)


def test_transcribe_and_recognize_emotion_raise_the_same_errors(corpus):
    model, kinds = corpus["model"], corpus["kinds"]
    for call in (model.transcribe, model.recognize_emotion):
        with pytest.raises(AudioError) as info:
            call(kinds["nan_samples"].path)
        check_message(str(info.value), kinds["nan_samples"])
    assert isinstance(model.transcribe(kinds["mp3"].path), str)


# -- audio: the CLI, every kind in one batch -----------------------------------------------------------


@pytest.mark.multiprocess
def test_every_audio_kind_in_one_cli_batch(corpus):
    """One `harmonifuse analyze` over all kinds (and a good file first): good ones answered, bad ones
    one error line each, a warning for the truncated file, exit status 1, no stack trace."""
    kinds = [corpus["kinds"][n] for n in BY_GROUP["audio"]]
    locked = corpus["kinds"]["permission_denied"].path
    probe = subprocess.run([sys.executable, "-c", f"open({locked!r}, 'rb')"], preexec_fn=_drop_dac_for_child,
                           capture_output=True)
    if probe.returncode == 0:  # root whose capabilities cannot be dropped here: the file is readable after all
        kinds = [k for k in kinds if k.name != "permission_denied"]
    args = [sys.executable, "-m", "harmonifuse.cli", "analyze", corpus["good"], *[k.path for k in kinds],
            "--model", str(corpus["root"] / "model"), "--json", "-q"]
    result = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600,
                            preexec_fn=_drop_dac_for_child)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [corpus["good"], *[k.path for k in kinds]]
    check_answer(lines[0], corpus["kinds"]["flac"])
    for kind, line in zip(kinds, lines[1:]):
        if kind.is_error:
            assert "error" in line, (kind.name, line)
            check_message(line["error"], kind)
        else:
            check_answer(line, kind)
    failed = sum(k.is_error for k in kinds)
    assert f"{failed} of {len(kinds) + 1} file(s) failed" in result.stderr
    check_message(result.stderr, corpus["kinds"]["truncated_wav"])
    assert "Traceback" not in result.stderr


def test_cli_text_output_names_each_bad_file_once_with_its_fix(corpus, capsys):
    kinds = corpus["kinds"]
    code = cli.main(["analyze", kinds["empty_file"].path, kinds["mp3"].path, "--model", str(corpus["root"] / "model"),
                     "-q"])
    out = capsys.readouterr()
    assert code == 1
    assert "empty (0 bytes); re-extract or re-download it" in out.out and "transcript:" in out.out
    assert "1 of 2 file(s) failed" in out.err


# -- manifests, configs and model folders: the Python API and the CLI ----------------------------------


def _cli(capsys, *args) -> tuple[int, str]:
    code = cli.main([*args])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("name", BY_GROUP["manifest"])
def test_manifest_kind_through_the_api_and_the_cli(corpus, name, capsys):
    kind = corpus["kinds"][name]
    with pytest.raises(ManifestError) as info:
        read_manifest(kind.path, labels=EMOTION_LABELS)
    check_message(str(info.value), kind)
    code, err = _cli(capsys, "evaluate", "--model", str(corpus["root"] / "model"), "--manifest", kind.path, "-q")
    assert code == 2 and "\nerror: " in "\n" + err
    check_message(err, kind)


@pytest.mark.parametrize("name", BY_GROUP["config"])
def test_config_kind_through_the_api_and_the_cli(corpus, name, capsys):
    kind = corpus["kinds"][name]
    with pytest.raises(ConfigError) as info:
        load_run_config(kind.path)
    check_message(str(info.value), kind)
    code, err = _cli(capsys, "train", kind.path, "-q")
    assert code == 2 and "\nerror: " in "\n" + err
    check_message(err, kind)


@pytest.mark.parametrize("name", BY_GROUP["model"])
def test_model_folder_kind_through_the_api_and_the_cli(corpus, name, capsys):
    kind = corpus["kinds"][name]
    with pytest.raises((FileNotFoundError, WeightsError, ConfigError)) as info:
        HarmoniFuse.from_pretrained(kind.path)
    check_message(str(info.value), kind)
    code, err = _cli(capsys, "analyze", corpus["good"], "--model", kind.path, "--json", "-q")
    assert code == 2 and "\nerror: " in "\n" + err
    check_message(err, kind)


def test_debug_shows_the_traceback(corpus, capsys):
    kind = corpus["kinds"]["unknown_key"]
    with pytest.raises(ConfigError, match="did you mean"):
        cli.main(["--debug", "train", kind.path])
    with pytest.raises(ConfigError):
        cli.main(["train", kind.path, "--debug"])  # after the command too
    assert cli.main(["train", kind.path]) == 2


def test_an_unexpected_error_is_one_line_naming_its_type(monkeypatch, tmp_path, capsys):
    def broken(args):
        raise KeyError("surprise")

    monkeypatch.setitem(cli.COMMANDS, "train", broken)
    assert cli.main(["train", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'surprise' (KeyError; run again with --debug") and "Traceback" not in err
