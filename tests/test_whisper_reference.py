"""Whisper's own decoder with a HarmoniFuse model's fine-tuned Whisper encoder swapped in (how much
real-speech skill the encoder kept): harmonifuse/evaluation/whisper_reference.py."""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file

from harmonifuse.evaluation.whisper_reference import ENCODER_PREFIX
from harmonifuse.pretrained import CONFIG_NAME, DEMO_MODEL, WEIGHTS_NAME

@pytest.fixture(scope="module")
def reference():
    from harmonifuse.evaluation.whisper_reference import WhisperReference

    return WhisperReference()


def test_the_shipped_models_encoder_replaces_whispers_own(reference):
    shipped = load_file(DEMO_MODEL / WEIGHTS_NAME)
    name = "layers.3.fc1.weight"
    before = reference.model.model.encoder.state_dict()[name].clone()
    assert reference.load_encoder(DEMO_MODEL.name) == len([k for k in shipped if k.startswith(ENCODER_PREFIX)])
    after = reference.model.model.encoder.state_dict()[name]
    assert torch.equal(after, shipped[ENCODER_PREFIX + name].to(after.dtype))
    assert not torch.equal(after, before)  # the shipped model fine-tuned it


def test_a_model_trained_with_whisper_frozen_is_refused_by_name(reference, tmp_path):
    (tmp_path / CONFIG_NAME).write_text((DEMO_MODEL / CONFIG_NAME).read_text())
    without_encoder = {k: v for k, v in load_file(DEMO_MODEL / WEIGHTS_NAME).items()
                       if not k.startswith(ENCODER_PREFIX)}
    save_file(without_encoder, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="trained with Whisper frozen"):
        reference.load_encoder(str(tmp_path))
    with pytest.raises(ValueError, match="no HarmoniFuse model folder"):
        reference.load_encoder(str(tmp_path / "absent"))
