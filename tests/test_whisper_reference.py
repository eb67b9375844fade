"""scripts/whisper_reference.py --encoder-from: a HarmoniFuse model's fine-tuned Whisper encoder
under Whisper's own decoder (how much real-speech skill the encoder kept)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harmonifuse.pretrained import CONFIG_NAME, DEMO_MODEL, WEIGHTS_NAME

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "whisper_reference.py"


@pytest.fixture(scope="module")
def reference():
    if not SCRIPT.is_file():
        pytest.skip("not a source checkout")
    spec = importlib.util.spec_from_file_location("whisper_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def whisper():
    from transformers import WhisperForConditionalGeneration

    from harmonifuse.assets import whisper_tiny_en_dir

    return WhisperForConditionalGeneration.from_pretrained(whisper_tiny_en_dir()).eval()


def test_the_shipped_models_encoder_replaces_whispers_own(reference, whisper):
    shipped = load_file(DEMO_MODEL / WEIGHTS_NAME)
    name = "layers.3.fc1.weight"
    before = whisper.model.encoder.state_dict()[name].clone()
    reference.load_encoder(whisper, DEMO_MODEL.name)
    after = whisper.model.encoder.state_dict()[name]
    assert torch.equal(after, shipped[reference.ENCODER_PREFIX + name].to(after.dtype))
    assert not torch.equal(after, before)  # the shipped model fine-tuned it


def test_a_model_trained_with_whisper_frozen_is_refused_by_name(reference, whisper, tmp_path):
    (tmp_path / CONFIG_NAME).write_text((DEMO_MODEL / CONFIG_NAME).read_text())
    without_encoder = {k: v for k, v in load_file(DEMO_MODEL / WEIGHTS_NAME).items()
                       if not k.startswith(reference.ENCODER_PREFIX)}
    save_file(without_encoder, tmp_path / WEIGHTS_NAME)
    with pytest.raises(SystemExit, match="trained with Whisper frozen"):
        reference.load_encoder(whisper, str(tmp_path))
    with pytest.raises(SystemExit, match="no HarmoniFuse model folder"):
        reference.load_encoder(whisper, str(tmp_path / "absent"))
