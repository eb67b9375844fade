"""SpeechTaskDataset, collate/SpeechBatch and MultiTaskLoader (workers, resume, bad samples)."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from harmonifuse.audio import AudioError
from harmonifuse.data.batch import SpeechBatch, collate
from harmonifuse.data.dataset import MultiTaskLoader, SpeechTaskDataset
from harmonifuse.data.feature_cache import FeatureCache
from harmonifuse.data.manifest import Utterance
from harmonifuse.data.sampler import BatchInterleavedSampler
from harmonifuse.modules.encoders.base import EncoderOutput, SpeechEncoder

EMOTIONS = ["neutral", "happy", "sad", "angry"]


class TinyEncoder(SpeechEncoder):
    """Seeded conv (stride 320: 50 frames/s) + 2 linear layers; 3 hidden states of width 4."""

    num_layers = 2
    hidden_size = 4
    frame_rate = 50.0
    identity = "tiny-dataset-test:v1"

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv = nn.Conv1d(1, 4, kernel_size=320, stride=320)
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.freeze_unless_trainable()

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths // 320

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        x = self.conv(waveforms[:, None]).transpose(1, 2)
        states = [x] + [x := layer(x) for layer in self.layers]
        frames = self.frame_lengths(lengths)
        mask = torch.arange(x.shape[1])[None, :] < frames[:, None]
        return EncoderOutput(torch.stack(states) * mask[None, :, :, None], frames)


def make_corpus(folder, n_asr: int = 9, n_ser: int = 5) -> tuple[list[Utterance], list[Utterance]]:
    """Tiny wavs; asr utterances carry text, ser ones emotion; one of each carries both."""
    rng = np.random.default_rng(0)
    asr, ser = [], []
    for i in range(n_asr + n_ser):
        seconds = round(float(rng.uniform(0.2, 0.8)), 2)
        path = folder / f"{i}.wav"
        sf.write(path, (0.1 * rng.standard_normal(round(seconds * 16_000))).astype(np.float32), 16_000)
        is_asr = i < n_asr
        u = Utterance(id=f"utt{i}", audio=str(path), duration=seconds, corpus="toy", speaker=f"s{i % 3}",
                      text=f"words {i}" if is_asr or i == n_asr else None,
                      emotion=EMOTIONS[i % 4] if not is_asr or i == 0 else None)
        (asr if is_asr else ser).append(u)
    return asr, ser


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path)


def loader_for(asr, ser, cache=None, **kwargs):
    datasets = {"asr": SpeechTaskDataset(asr + ser, "asr", cache=cache),
                "ser": SpeechTaskDataset(asr + ser, "ser", cache=cache)}
    sampler = BatchInterleavedSampler({t: d.durations for t, d in datasets.items()}, batch_size=2, seed=3,
                                      schedule=kwargs.pop("schedule", None))
    return MultiTaskLoader(datasets, sampler, **kwargs)


def test_dataset_keeps_labelled_utterances_and_serves_targets(corpus):
    asr, ser = corpus
    dataset = SpeechTaskDataset(asr + ser, "ser")
    assert len(dataset) == len(ser) + 1 and dataset.unlabelled == len(asr) - 1  # utt0 has both labels
    item = dataset[0]
    assert item["id"] == "utt0" and item["target"] == "neutral" and item["task"] == "ser"
    assert item["waveform"].dtype == np.float32 and item["waveform"].shape == (round(asr[0].duration * 16_000),)
    assert SpeechTaskDataset(asr, "asr")[1]["target"] == "words 1"
    assert dataset.durations == [u.duration for u in dataset.utterances]
    with pytest.raises(ValueError, match="unknown task"):
        SpeechTaskDataset(asr, "sid")


def test_collate_pads_waveforms_and_features():
    items = [{"id": "a", "task": "asr", "target": "x", "waveform": np.ones(5, np.float32)},
             {"id": "b", "task": "asr", "target": "y", "waveform": np.ones(3, np.float32)}]
    batch = collate(items)
    assert batch.task == "asr" and len(batch) == 2 and batch.hidden_states is None
    assert batch.waveforms.shape == (2, 5) and batch.wave_lengths.tolist() == [5, 3]
    assert batch.waveforms[1, 3:].abs().sum() == 0
    feats = [{"id": "a", "task": "asr", "target": "x", "hidden_states": torch.ones(3, 4, 2, dtype=torch.float16)},
             {"id": "b", "task": "ser", "target": "sad", "hidden_states": torch.ones(3, 2, 2, dtype=torch.float16)},
             {"id": "c", "task": "ser", "error": "bad file"}]
    batch = collate(feats)
    assert batch.task == "mixed" and batch.tasks == ["asr", "ser"] and batch.skipped == [("ser", "c")]
    assert batch.hidden_states.shape == (3, 2, 4, 2) and batch.hidden_states.dtype == torch.float16
    assert batch.frame_lengths.tolist() == [4, 2] and batch.hidden_states[:, 1, 2:].abs().sum() == 0
    moved = batch.to("cpu")
    assert isinstance(moved, SpeechBatch) and moved.ids == ["a", "b"]
    with pytest.raises(ValueError, match="mixes"):
        collate(items[:1] + feats[:1])
    assert len(collate([feats[2]], task="ser")) == 0


def test_loader_yields_single_task_batches_in_sampler_order(corpus):
    asr, ser = corpus
    loader = loader_for(asr, ser)
    batches = list(loader)
    plans = list(loader.sampler)
    assert len(batches) == len(loader) == len(plans)
    for batch, plan in zip(batches, plans):
        assert batch.task == plan.task and set(batch.tasks) == {plan.task}
        dataset = loader.datasets[plan.task]
        assert batch.ids == [dataset.utterances[i].id for i in plan.indices]
        assert batch.targets == [dataset.target(i) for i in plan.indices]
        assert batch.waveforms.shape[0] == len(batch) and batch.wave_lengths.max() == batch.waveforms.shape[1]


def test_loader_serves_cached_features_when_encoder_is_frozen(corpus, tmp_path):
    asr, ser = corpus
    encoder = TinyEncoder()
    cache = FeatureCache(encoder, tmp_path / "cache")
    cache.build(asr + ser, batch_size=4, progress=False)
    loader = loader_for(asr, ser, cache=cache, schedule="mixed")
    batch = next(iter(loader))
    assert batch.task == "mixed" and batch.waveforms is None
    assert batch.hidden_states.shape[:2] == (3, len(batch)) and batch.hidden_states.shape[3] == 4
    assert cache.misses == len(asr) + len(ser)  # served from disk, nothing recomputed
    first = {u.id: u for u in asr + ser}[batch.ids[0]]
    wave = torch.from_numpy(sf.read(first.audio, dtype="float32")[0])[None]
    expected = encoder(wave, torch.tensor([wave.shape[1]])).hidden_states[:, 0]
    n = int(batch.frame_lengths[0])
    torch.testing.assert_close(batch.hidden_states[:, 0, :n].float(), expected[:, :n], rtol=1e-3, atol=1e-3)


def test_workers_match_in_process_loading_and_resume_exactly(corpus):
    asr, ser = corpus
    reference = [b.ids for b in loader_for(asr, ser)]
    loader = loader_for(asr, ser, num_workers=2, prefetch_factor=2)
    iterator = iter(loader)
    head = [next(iterator).ids for _ in range(3)]
    state = loader.state_dict()  # workers have prefetched further; state counts delivered batches
    assert state["step"] == 3 and loader.sampler.state_dict()["step"] > 3
    del iterator
    resumed = loader_for(asr, ser, num_workers=2)
    resumed.load_state_dict(state)
    tail = [b.ids for b in resumed]
    assert head + tail == reference
    assert resumed.state_dict()["step"] == len(reference)


def test_bad_samples_are_skipped_and_counted_or_fail(corpus, tmp_path):
    asr, ser = corpus
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF nonsense")
    bad = Utterance(id="bad", audio=str(broken), duration=0.5, corpus="toy", speaker="s", emotion="sad")
    loader = loader_for(asr, ser + [bad], num_workers=1)
    ids = [i for batch in loader for i in batch.ids]
    assert "bad" not in ids
    planned = sum(loader.datasets[t].utterances[i].id == "bad" for p in loader.sampler for t, i in p.items)
    assert planned >= 1 and loader.skipped["ser"] == ["bad"] * planned and loader.skip_counts()["asr"] == 0
    strict = SpeechTaskDataset([bad], "ser", on_error="fail")
    with pytest.raises(AudioError):
        strict[0]
    lenient = SpeechTaskDataset([bad], "ser")
    assert "error" in lenient[0] and lenient.skip_count == 1


def test_loader_checks_datasets_against_sampler(corpus):
    asr, ser = corpus
    sampler = BatchInterleavedSampler({"asr": [1.0] * 3}, batch_size=2)
    with pytest.raises(ValueError, match="no dataset"):
        MultiTaskLoader({}, sampler)
    with pytest.raises(ValueError, match="durations"):
        MultiTaskLoader({"asr": SpeechTaskDataset(asr, "asr")}, sampler)
