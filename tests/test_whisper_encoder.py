"""The Whisper tiny.en encoder on real recordings: padded mode is exactly transformers' Whisper,
and the variable-length mode agrees with it on the speech frames."""
from pathlib import Path

import pytest
import torch

from harmonifuse.audio import load_audio

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not LIBRIVOX.is_dir(), reason="needs Debian pocketsphinx-testdata")]
# Measured on the five LibriVox clips (3-7 s): mean cosine per hidden state 0.9999, 0.998, 0.994, 0.987, 0.962
# at worst (the last layer of the 3 s clip); the first layers are nearly identical.
MIN_MEAN_COSINE = [0.999, 0.99, 0.98, 0.97, 0.95]


@pytest.fixture(scope="module")
def encoders():
    from harmonifuse.modules.encoders import build_encoder

    return build_encoder("whisper-tiny.en"), build_encoder("whisper-tiny.en", pad_to_30s=True)


@pytest.fixture(scope="module")
def clips():
    return [torch.from_numpy(load_audio(p)) for p in sorted(LIBRIVOX.glob("*.wav"))]


def _batch(clips):
    lengths = torch.tensor([len(c) for c in clips])
    waves = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        waves[i, : len(c)] = c
    return waves, lengths


def test_interface(encoders):
    varlen, padded = encoders
    assert (varlen.num_layers, varlen.hidden_size, varlen.frame_rate) == (4, 384, 50.0)
    assert varlen.identity != padded.identity  # feature caches must not mix the two modes
    assert not any(p.requires_grad for p in varlen.parameters())


def test_log_mel_matches_transformers_feature_extractor(encoders, clips):
    from transformers import WhisperFeatureExtractor

    from harmonifuse.assets import resolve_source

    extractor = WhisperFeatureExtractor.from_pretrained(resolve_source("whisper-tiny.en"))
    clip = clips[1]
    reference = torch.from_numpy(extractor(clip.numpy(), sampling_rate=16000, return_tensors="np").input_features)
    padded = torch.nn.functional.pad(clip, (0, 480000 - len(clip)))[None]
    ours = encoders[1].log_mel(padded, torch.tensor([480000]))
    assert torch.allclose(ours, reference, atol=2e-3)


def test_padded_mode_is_transformers_whisper(encoders, clips):
    from transformers import WhisperFeatureExtractor, WhisperModel

    from harmonifuse.assets import resolve_source

    path = resolve_source("whisper-tiny.en")
    reference_model = WhisperModel.from_pretrained(path).get_encoder().eval()
    features = WhisperFeatureExtractor.from_pretrained(path)(clips[0].numpy(), sampling_rate=16000,
                                                            return_tensors="pt").input_features
    with torch.no_grad():
        reference = reference_model(features).last_hidden_state
        ours = encoders[1](clips[0][None], torch.tensor([len(clips[0])]))
    T = int(ours.lengths[0])
    assert T == len(clips[0]) // 160 // 2 + (len(clips[0]) // 160) % 2
    assert torch.allclose(ours.hidden_states[-1, 0, :T], reference[0, :T], atol=1e-3)


def test_variable_length_agrees_with_padded_on_speech_frames(encoders, clips):
    varlen, padded = encoders
    waves, lengths = _batch(clips)  # batched: also checks that padding inside the batch is masked
    with torch.no_grad():
        a, b = varlen(waves, lengths), padded(waves, lengths)
    assert torch.equal(a.lengths, b.lengths)
    assert a.hidden_states.shape == b.hidden_states.shape == (5, len(clips), int(a.lengths.max()), 384)
    for i, T in enumerate(a.lengths.tolist()):
        cosine = torch.nn.functional.cosine_similarity(a.hidden_states[:, i, :T], b.hidden_states[:, i, :T], dim=-1)
        means = cosine.mean(-1).tolist()
        assert all(c >= m for c, m in zip(means, MIN_MEAN_COSINE)), (i, means)
        assert torch.all(a.hidden_states[:, i, T:] == 0)


def test_batching_does_not_change_an_utterance(encoders, clips):
    varlen = encoders[0]
    waves, lengths = _batch(clips[:2])
    with torch.no_grad():
        together = varlen(waves, lengths)
        alone = varlen(clips[1][None], torch.tensor([len(clips[1])]))
    T = int(alone.lengths[0])
    assert torch.allclose(together.hidden_states[:, 1, :T], alone.hidden_states[:, 0, :T], atol=1e-4)
