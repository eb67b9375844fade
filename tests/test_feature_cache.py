"""FeatureCache: hits, misses, invalidation (audio, encoder), fidelity, batched builds, atomicity."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from harmonifuse.audio import AudioError, load_audio
from harmonifuse.data.feature_cache import FeatureCache
from harmonifuse.data.manifest import Utterance
from harmonifuse.modules.encoders.base import EncoderOutput, SpeechEncoder

STRIDE = 320  # 50 frames/s at 16 kHz


class TinyEncoder(SpeechEncoder):
    """Seeded conv + 2 linear layers: 3 hidden states of width 8, padding-independent frames."""

    num_layers = 2
    hidden_size = 8
    frame_rate = 50.0

    def __init__(self, seed: int = 0, trainable: bool = False) -> None:
        super().__init__(trainable=trainable)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.conv = nn.Conv1d(1, 8, kernel_size=STRIDE, stride=STRIDE)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.identity = f"tiny-test:seed={seed}"
        self.calls = 0
        self.freeze_unless_trainable()

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths // STRIDE

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        self.calls += 1
        x = self.conv(waveforms[:, None]).transpose(1, 2) * 10  # (B, T, D); x10: values beyond 1
        states = [x]
        for layer in self.layers:
            x = torch.tanh(layer(x))
            states.append(x)
        frames = self.frame_lengths(lengths)
        mask = torch.arange(x.shape[1])[None, :] < frames[:, None]
        return EncoderOutput(torch.stack(states) * mask[None, :, :, None], frames)


def write_wav(path, seconds: float, freq: float = 220.0, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    wave = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.shape)
    sf.write(path, wave.astype(np.float32), 16_000, subtype="PCM_16")
    return str(path)


def utterance(path: str, seconds: float, index: int = 0) -> Utterance:
    return Utterance(id=f"u{index}", audio=path, duration=seconds, corpus="test", speaker="s", text="hi")


def reference(encoder: SpeechEncoder, path: str) -> torch.Tensor:
    """Uncached features of one file: (L+1, T, D) float32."""
    wave = torch.from_numpy(load_audio(path))[None]
    out = encoder(wave, torch.tensor([wave.shape[1]]))
    return out.hidden_states[:, 0, : int(out.lengths[0])]


@pytest.fixture
def wav(tmp_path):
    return write_wav(tmp_path / "a.wav", 0.5)


def test_miss_then_hit_returns_stored_float16_equal_to_uncached(tmp_path, wav):
    encoder = TinyEncoder()
    cache = FeatureCache(encoder, tmp_path / "cache")
    first = cache.get(wav)
    assert cache.stats() == {"hits": 0, "misses": 1}
    second = cache.get(utterance(wav, 0.5))  # an Utterance and its path share the key
    assert cache.stats() == {"hits": 1, "misses": 1} and encoder.calls == 1
    assert first.dtype == torch.float16 and first.shape == (3, 25, 8)
    assert torch.equal(first, second)
    expected = reference(encoder, wav)
    assert expected.abs().max() > 1.0  # the check below is relative to real magnitudes
    torch.testing.assert_close(second.float(), expected, rtol=1e-3, atol=1e-3)
    files = list(cache.folder.glob("*/*.npy"))
    assert len(files) == 1 and np.load(files[0], mmap_mode="r").dtype == np.float16
    assert (cache.folder / "meta.json").is_file()
    assert wav in cache


def test_changed_audio_is_a_miss_and_recomputed(tmp_path, wav):
    encoder = TinyEncoder()
    cache = FeatureCache(encoder, tmp_path / "cache")
    old = cache.get(wav)
    write_wav(wav, 0.5, freq=440.0)  # same path and length, new content
    new = cache.get(wav)
    assert cache.misses == 2 and cache.hits == 0
    assert not torch.equal(old, new)
    torch.testing.assert_close(new.float(), reference(encoder, wav), rtol=1e-3, atol=1e-3)


def test_changed_encoder_identity_is_a_miss_in_its_own_folder(tmp_path, wav):
    first = FeatureCache(TinyEncoder(seed=0), tmp_path / "cache")
    second = FeatureCache(TinyEncoder(seed=1), tmp_path / "cache")
    a, b = first.get(wav), second.get(wav)
    assert second.misses == 1 and second.hits == 0
    assert first.folder != second.folder and not torch.equal(a, b)
    again = FeatureCache(TinyEncoder(seed=0), tmp_path / "cache")  # same identity: served from disk
    assert torch.equal(again.get(wav), a) and again.hits == 1


def test_build_batches_similar_lengths_and_stores_valid_frames_only(tmp_path):
    seconds = [0.5, 1.3, 0.7, 0.3, 1.1, 0.9, 0.4]
    utterances = [utterance(write_wav(tmp_path / f"{i}.wav", s, seed=i), s, i) for i, s in enumerate(seconds)]
    encoder = TinyEncoder()
    cache = FeatureCache(encoder, tmp_path / "cache")
    stats = cache.build(utterances, batch_size=3, progress=False)
    assert stats == {"total": 7, "cached": 0, "computed": 7, "failed": 0}
    assert encoder.calls == 3
    for u in utterances:
        features = cache.get(u)
        assert features.shape[1] == round(u.duration * 50)  # no padding frames stored
        # Batched (padded) computation agrees with the single-utterance run.
        torch.testing.assert_close(features.float(), reference(encoder, u.audio), rtol=1e-3, atol=1e-3)
    assert cache.hits == 7 and cache.misses == 7
    assert cache.build(utterances, batch_size=3, progress=False)["cached"] == 7


def test_build_skips_or_fails_on_bad_audio(tmp_path, wav):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    utterances = [utterance(wav, 0.5, 0), utterance(str(bad), 1.0, 1), utterance(str(tmp_path / "gone.wav"), 1.0, 2)]
    cache = FeatureCache(TinyEncoder(), tmp_path / "cache")
    stats = cache.build(utterances, batch_size=2, progress=False, on_error="skip")
    assert stats == {"total": 3, "cached": 0, "computed": 1, "failed": 2}
    with pytest.raises(AudioError):
        FeatureCache(TinyEncoder(seed=2), tmp_path / "cache").build(utterances, progress=False)
    with pytest.raises(AudioError, match="cannot read"):
        cache.get(str(tmp_path / "gone.wav"))


def test_corrupt_or_misshaped_entry_is_recomputed(tmp_path, wav):
    cache = FeatureCache(TinyEncoder(), tmp_path / "cache")
    good = cache.get(wav)
    path = cache.path_for(cache.key(wav))
    path.write_bytes(b"\x93NUMPY garbage")
    assert torch.equal(cache.get(wav), good) and cache.misses == 2
    np.save(path, np.zeros((2, 25, 8), dtype=np.float16))  # wrong number of hidden states
    assert torch.equal(cache.get(wav), good) and cache.misses == 3
    assert not list(path.parent.glob("*.tmp"))  # atomic writes leave no temp files


def test_waveform_only_key_and_waveform_reuse(tmp_path, wav):
    encoder = TinyEncoder()
    cache = FeatureCache(encoder, tmp_path / "cache")
    wave = load_audio(wav)
    from_array = cache.get(None, waveform=wave)
    assert torch.equal(cache.get(None, waveform=wave), from_array) and cache.hits == 1
    # A given waveform is used on a miss, keyed by the file: later path lookups hit.
    cache.get(wav, waveform=wave)
    assert torch.equal(cache.get(wav), from_array) and cache.hits == 2
    with pytest.raises(ValueError, match="utterance"):
        cache.get(None)


def test_trainable_encoder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="frozen"):
        FeatureCache(TinyEncoder(trainable=True), tmp_path)
