"""The default model is found without the repository root: --model, then $HARMONIFUSE_MODEL, then
the model shipped inside the package."""
from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

import harmonifuse
from harmonifuse import cli, pretrained
from harmonifuse.config import ConfigError

PACKAGE = Path(harmonifuse.__file__).resolve().parent
ROOT = PACKAGE.parent


def test_the_shipped_model_lives_inside_the_package():
    assert cli.DEMO_MODEL.parent.parent == PACKAGE
    assert (cli.DEMO_MODEL / "config.yaml").is_file() and (cli.DEMO_MODEL / "trained.safetensors").is_file()


def test_the_shipped_model_is_package_data():
    """Every file of the shipped model matches pyproject's package-data, so `pip install .` copies it."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["harmonifuse"]
    for path in cli.DEMO_MODEL.iterdir():
        relative = path.relative_to(PACKAGE).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative


def test_model_order_is_flag_then_environment_then_shipped(monkeypatch, tmp_path):
    monkeypatch.delenv(cli.MODEL_ENV, raising=False)
    assert cli.resolve_model(None) == str(cli.DEMO_MODEL)
    monkeypatch.setenv(cli.MODEL_ENV, str(tmp_path))
    assert cli.resolve_model(None) == str(tmp_path)
    assert cli.resolve_model("given") == "given"


def test_no_model_found_says_to_pass_model_or_set_the_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(cli.MODEL_ENV, raising=False)
    monkeypatch.setattr(pretrained, "DEMO_MODEL", tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"pass --model FOLDER or set HARMONIFUSE_MODEL"):
        cli.resolve_model(None)
    assert cli.main(["analyze", str(tmp_path / "clip.wav")]) == 2  # before any model or audio is loaded
    assert "--model" in capsys.readouterr().err


def test_a_missing_environment_model_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(cli.MODEL_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"HARMONIFUSE_MODEL=.*nowhere"):
        cli.resolve_model(None)


def test_the_python_api_loads_the_shipped_model_by_its_name_from_anywhere(monkeypatch, tmp_path):
    from safetensors.torch import load_file

    from harmonifuse.model import HarmoniFuse

    monkeypatch.chdir(tmp_path)  # no models/ folder here: the name alone must find it
    model = HarmoniFuse.from_pretrained(cli.DEMO_MODEL.name)
    shipped = load_file(cli.DEMO_MODEL / pretrained.WEIGHTS_NAME)
    trained = model.trained_state_dict()
    assert set(trained) == set(shipped)
    name = "fusion.weighting.proj.weight"
    assert trained[name].float().equal(shipped[name].float())
