"""harmonifuse average: a model folder whose trained weights are the weighted mean of several."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny import perturbed, plain_model, write_tiny_assets

from harmonifuse import cli
from harmonifuse.config import ConfigError, from_dict
from harmonifuse.config.model import ModelConfig
from harmonifuse.model import HarmoniFuse
from harmonifuse.training.averaging import PROVENANCE_NAME, average_models
from harmonifuse.weights import WeightsError, load_weights


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three tiny models of one architecture, trained parts moved apart (seeds 1-3), temperatures set."""
    root = tmp_path_factory.mktemp("averaging")
    encoder_dir, llm_dir = write_tiny_assets(root / "assets")
    sections = plain_model(encoder={"source": str(encoder_dir)},
                           llm={"source": str(llm_dir), "lora_rank": 4, "lora_alpha": 8.0, "max_new_tokens": 4},
                           projector={"stack": 2, "hidden_size": 24}, vad={"enabled": False})
    out = []
    for seed in (1, 2, 3):
        config = from_dict(ModelConfig, {**sections, "calibration": {"ser_temperature": 1.5 + seed},
                                         "decoding": {"beam_size": seed}})
        model = perturbed(HarmoniFuse.build(config), seed=seed)
        out.append(model.save_pretrained(root / f"model{seed}"))
    wider = from_dict(ModelConfig, {**sections, "projector": {**sections["projector"], "hidden_size": 32}})
    return {"models": out, "other": HarmoniFuse.build(wider).save_pretrained(root / "other"), "root": root}


def test_the_average_is_the_weighted_mean_and_loads_as_a_model(folders, tmp_path):
    a, b, c = (load_weights(f / "trained.safetensors") for f in folders["models"])
    out = average_models(folders["models"], tmp_path / "soup", weights=[2, 1, 1])
    mean = load_weights(out / "trained.safetensors")
    assert mean.keys() == a.keys()
    for name in a:
        expected = (0.5 * a[name].double() + 0.25 * b[name].double() + 0.25 * c[name].double()).to(a[name].dtype)
        assert torch.allclose(mean[name], expected, atol=1e-6), name
    model = HarmoniFuse.from_pretrained(out)
    assert model.config.calibration.ser_temperature == 1.0  # fitted for other weights: reset
    assert model.config.decoding.beam_size == 1  # the first model's inference settings
    provenance = json.loads((out / PROVENANCE_NAME).read_text())
    assert provenance["weights"] == [0.5, 0.25, 0.25] and len(provenance["sha256"]) == 3


def test_all_weight_on_one_model_gives_that_model_back(folders, tmp_path):
    out = average_models(folders["models"][:2], tmp_path / "first", weights=[1, 0])
    first, back = (load_weights(f / "trained.safetensors") for f in (folders["models"][0], out))
    assert all(torch.equal(first[k], back[k]) for k in first)


@pytest.mark.parametrize("case, message", [
    ("one model", "two or more models"),
    ("missing", "not a model folder"),
    ("weights count", "2 weights for 3 models"),
    ("negative weight", "must be >= 0"),
    ("other architecture", r"model.projector.hidden_size = 32"),
])
def test_bad_requests_are_refused_by_name(folders, tmp_path, case, message):
    models = folders["models"]
    args = {"one model": (models[:1], None), "missing": ([models[0], tmp_path / "absent"], None),
            "weights count": (models, [1, 1]), "negative weight": (models[:2], [1, -1]),
            "other architecture": ([models[0], folders["other"]], None)}[case]
    with pytest.raises(ConfigError, match=message):
        average_models(args[0], tmp_path / "out", weights=args[1])
    assert not (tmp_path / "out").exists()


def test_weights_with_other_tensors_are_named(folders, tmp_path):
    from safetensors.torch import save_file

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.yaml").write_text((folders["models"][0] / "config.yaml").read_text())
    state = load_weights(folders["models"][0] / "trained.safetensors")
    state.pop(sorted(state)[0])
    save_file(state, odd / "trained.safetensors")
    with pytest.raises(WeightsError, match=r"odd/trained.safetensors: holds other trained tensors"):
        average_models([folders["models"][0], odd], tmp_path / "out")


def test_an_existing_model_folder_is_never_overwritten(folders, tmp_path):
    target = folders["models"][2]
    before = (target / "trained.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a model"):
        average_models(folders["models"][:2], target)
    assert (target / "trained.safetensors").read_bytes() == before


def test_the_command_writes_the_folder_and_says_to_calibrate(folders, tmp_path, capsys):
    models = [str(f) for f in folders["models"][:2]]
    assert cli.main(["average", *models, "--out", str(tmp_path / "soup"), "--weights", "0.5,0.5"]) == 0
    assert "harmonifuse calibrate --model" in capsys.readouterr().out
    assert cli.main(["average", *models, "--out", str(tmp_path / "x"), "--weights", "half,half"]) == 2
    assert "--weights 'half,half'" in capsys.readouterr().err


def test_inference_sections_are_the_only_ones_allowed_to_differ():
    from harmonifuse.training.averaging import INFERENCE_FIELDS, _architecture

    config = ModelConfig()
    for section in INFERENCE_FIELDS:
        assert getattr(config, section) is not None
    changed = dataclasses.replace(config, calibration=dataclasses.replace(config.calibration, ser_temperature=3.0))
    assert _architecture(changed) == _architecture(config)
    moved = dataclasses.replace(config, projector=dataclasses.replace(config.projector, hidden_size=7))
    assert _architecture(moved) != _architecture(config)
