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


# -- shares: every process of a run builds its own part --------------------------------------------


def test_shares_are_disjoint_cover_everything_and_keep_an_audio_file_in_one_share(tmp_path):
    from harmonifuse.data.feature_cache import share_of

    paths = [write_wav(tmp_path / f"{i}.wav", 0.3 + 0.1 * i, seed=i) for i in range(5)]
    utterances = [utterance(p, 0.3 + 0.1 * i, i) for i, p in enumerate(paths)]
    utterances += [utterance(paths[1], 0.4, 9), utterance(paths[3], 0.6, 8)]  # listed twice (dev, another task)
    assert share_of(utterances, 0, 1) == utterances
    for world in (2, 3, 8):
        shares = [share_of(utterances, rank, world) for rank in range(world)]
        audio = [{u.audio for u in share} for share in shares]
        assert sum(len(a) for a in audio) == 5 and set().union(*audio) == set(paths)  # disjoint, covering
        assert sorted(u.id for share in shares for u in share) == sorted(u.id for u in utterances)
    with pytest.raises(ValueError, match="rank 2"):
        share_of(utterances, 2, 2)

    whole = FeatureCache(TinyEncoder(), tmp_path / "whole")
    assert whole.build(utterances, batch_size=1, progress=False) == {"total": 5, "cached": 0, "computed": 5,
                                                                     "failed": 0}
    parts = FeatureCache(TinyEncoder(), tmp_path / "parts")
    counts = [parts.build(utterances, batch_size=1, progress=False, rank=r, world_size=2) for r in range(2)]
    assert [c["computed"] for c in counts] == [3, 2]
    files = {p.relative_to(parts.folder): p.read_bytes() for p in parts.folder.rglob("*.npy")}
    assert files == {p.relative_to(whole.folder): p.read_bytes() for p in whole.folder.rglob("*.npy")}
    # duplicates count once, hits too (train and dev list the same files)
    assert parts.build(utterances, progress=False) == {"total": 5, "cached": 5, "computed": 0, "failed": 0}


def test_read_serves_the_memory_map_and_get_a_writable_copy(tmp_path, wav):
    cache = FeatureCache(TinyEncoder(), tmp_path / "cache")
    computed = cache.read(wav)  # a miss: the computed array
    mapped = cache.read(wav)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable and mapped.dtype == np.float16
    assert np.array_equal(mapped, computed)
    copy = cache.get(wav)
    assert copy.dtype == torch.float16 and torch.equal(copy, torch.from_numpy(computed))
    copy += 1  # writable, and the file is untouched
    assert np.array_equal(cache.read(wav), computed)


# -- float16 batches: the model widens them, with the same results ---------------------------------


def test_float16_batches_widen_exactly_and_give_the_models_float32_results(tmp_path):
    from tiny import perturbed, tiny_harmonifuse

    from harmonifuse.data.batch import collate, pad_hidden_states
    from harmonifuse.data.dataset import SpeechTaskDataset

    seconds = [0.5, 0.8, 0.3, 0.6]
    utterances = [utterance(write_wav(tmp_path / f"{i}.wav", s, seed=i), s, i) for i, s in enumerate(seconds)]
    model = tiny_harmonifuse(feature_masking={"time_masks": 2, "channel_masks": 2, "channel_width": 4})
    perturbed(model)
    cache = FeatureCache(model.encoder, tmp_path / "cache")
    cache.build(utterances, progress=False)
    dataset = SpeechTaskDataset(utterances, "asr", cache=cache)
    items = [dataset[i] for i in range(len(dataset))]
    assert all(isinstance(item["hidden_states"], np.memmap) for item in items)  # hits: mapped, not copied
    half = collate(items)
    assert half.hidden_states.dtype == torch.float16  # half the host memory and host-to-device copy
    # before: float32 batches (the float16 entries widened on the host); widening later is exact
    full = collate(items)
    full.hidden_states = pad_hidden_states([item["hidden_states"] for item in items], dtype=np.float32)[0]
    assert full.hidden_states.dtype == torch.float32
    assert torch.equal(half.hidden_states.float(), full.hidden_states)

    def run(batch):
        model.zero_grad()
        torch.manual_seed(3)  # the same feature masks for both batches
        model.train()
        out = model(batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "fusion" in n}
        model.eval()
        with torch.no_grad():
            loss = model(batch).loss
            align = model.alignment_loss(batch).loss
            analyzed = model.analyze_hidden(batch.hidden_states, batch.frame_lengths, tasks=("asr", "ser"))
            ctc = model.ctc_transcribe_hidden(batch.hidden_states, batch.frame_lengths)
            profiles = model.task_profiles(batch.hidden_states, batch.frame_lengths)
        return out.loss, grads, loss, align, analyzed, ctc, profiles

    a, b = run(half), run(full)
    assert a[1] and a[1].keys() == b[1].keys()
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)  # training loss, with masking
    for name in a[1]:  # the fusion's gradients: recomputed layer by layer in the backward pass
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[3], b[3], rtol=1e-5, atol=1e-6)
    assert [r["transcript"] for r in a[4]] == [r["transcript"] for r in b[4]] and a[5] == b[5]
    for x, y in zip(a[4], b[4]):
        assert x["emotion"] == y["emotion"]
        assert x["emotion_probs"] == pytest.approx(y["emotion_probs"], abs=1e-5)
    for task in a[6]:
        assert a[6][task]["layer_weights"] == pytest.approx(b[6][task]["layer_weights"], abs=1e-6)
        assert a[6][task]["gate"] == pytest.approx(b[6][task]["gate"], abs=1e-5)


def test_fusion_of_float16_states_keeps_no_float32_copy_of_all_layers():
    from harmonifuse.modules.fusion import build_fusion

    torch.manual_seed(0)
    fusion = build_fusion("prompt", 13, 64, 8, 2)
    nn.init.normal_(fusion.weighting.proj.weight)
    hidden = (torch.randn(13, 2, 50, 64) * 4).half()
    prompt, tasks = torch.randn(2, 8), torch.tensor([0, 1])

    def saved_for_backward(states):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fused = fusion(states, prompt, tasks)
        return fused, sum(t.numel() * t.element_size() for t in saved)

    fused, kept = saved_for_backward(hidden)
    assert fused.dtype == torch.float32
    reference, kept_widened = saved_for_backward(hidden.float())
    all_layers = hidden.numel() * 4
    assert kept_widened >= all_layers  # autograd keeps the normalised float32 layers for alpha's gradient
    assert kept < hidden.numel() * 2 + 4096  # the float16 input (the batch holds it anyway) and alpha
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    fused.square().sum().backward()
    grad = fusion.weighting.proj.weight.grad.clone()
    fusion.zero_grad()
    reference.square().sum().backward()
    expected = fusion.weighting.proj.weight.grad  # float32 sums over B x T x D products, in another order
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


# -- data.feature_cache: auto caches on the CPU only -------------------------------------------------


def test_auto_caches_on_the_cpu_not_on_cuda_a_folder_always_off_never(tmp_path):
    from harmonifuse.config import from_dict
    from harmonifuse.config.run import DataConfig
    from harmonifuse.training.loaders import feature_cache_for, uses_feature_cache

    for device, auto in (("cpu", True), ("cuda", False), ("cuda:1", False)):
        assert uses_feature_cache("auto", device) is auto
        assert uses_feature_cache(str(tmp_path), device) is True
        assert uses_feature_cache("off", device) is False

    def cache(setting, device=None, encoder=None):
        config = from_dict(DataConfig, {"feature_cache": setting}, "data")
        return feature_cache_for(encoder or TinyEncoder(), config, device)

    assert isinstance(cache("auto"), FeatureCache)  # default: where the encoder's parameters are (the CPU)
    assert isinstance(cache("auto", "cpu"), FeatureCache)
    assert cache("auto", "cuda") is None  # the frozen encoder runs in the forward pass
    on_gpu = cache(str(tmp_path), "cuda")
    assert on_gpu is not None and on_gpu.device == torch.device("cuda") and str(on_gpu.folder).startswith(str(tmp_path))
    assert cache("off", "cpu") is None and cache("off", "cuda") is None
    assert cache(str(tmp_path), "cpu", TinyEncoder(trainable=True)) is None
