"""data.mix: further corpora drawn into a task's training set at a share, and into its dev subset."""
from __future__ import annotations

import pytest

from harmonifuse.config import ConfigError, from_dict
from harmonifuse.config.run import DataConfig
from harmonifuse.data.manifest import Utterance, write_manifest
from harmonifuse.training.loaders import mix_in, read_mix


def _utterances(corpus: str, n: int, folder=None) -> list[Utterance]:
    """N utterances of CORPUS; with FOLDER, their (empty) audio files exist there."""
    if folder is not None:
        for i in range(n):
            (folder / f"{corpus}{i}.wav").touch()
    return [Utterance(id=f"{corpus}{i}", audio=f"{folder or '/nowhere'}/{corpus}{i}.wav", duration=1.0 + i % 3,
                      corpus=corpus, speaker=f"{corpus}-s{i % 2}", text=f"word {i}") for i in range(n)]


def test_a_source_makes_up_its_share_by_repetition_and_a_seeded_subset():
    base, real = _utterances("syn", 100), _utterances("real", 10)
    mixed = mix_in(base, [(real, 0.25)], seed=0)
    drawn = [u for u in mixed if u.corpus == "real"]
    assert mixed[:100] == base and len(drawn) == 33  # 0.25 / 0.75 x 100
    assert all(drawn.count(u) in (3, 4) for u in real)  # three copies each, three drawn once more
    assert mix_in(base, [(real, 0.25)], seed=0) == mixed
    assert mix_in(base, [(real, 0.25)], seed=1) != mixed


def test_a_small_share_of_a_large_source_is_a_subset_and_two_sources_keep_their_shares():
    base, big, other = _utterances("syn", 60), _utterances("big", 500), _utterances("oth", 7)
    mixed = mix_in(base, [(big, 0.2), (other, 0.2)], seed=3)
    counts = {c: sum(u.corpus == c for u in mixed) for c in ("syn", "big", "oth")}
    assert counts == {"syn": 60, "big": 20, "oth": 20}
    assert len({id(u) for u in mixed if u.corpus == "big"}) == 20  # no repeats when the source is larger


def test_bad_mixes_are_refused_by_field():
    with pytest.raises(ConfigError, match=r"data.mix.asr\[0\].share.*\(0, 1\)"):
        from_dict(DataConfig, {"mix": {"asr": [{"train": "a.jsonl", "share": 1.0}]}}, prefix="data")
    with pytest.raises(ConfigError, match=r"data.mix.asr': the shares add up to 1.2"):
        from_dict(DataConfig, {"mix": {"asr": [{"train": "a.jsonl", "share": 0.6},
                                               {"train": "b.jsonl", "share": 0.6}]}}, prefix="data")
    with pytest.raises(ConfigError, match=r"data.mix.ser': mixes into a task without a training manifest"):
        from_dict(DataConfig, {"train": {"asr": "a.jsonl"}, "mix": {"ser": [{"train": "a.jsonl"}]}}, prefix="data")
    with pytest.raises(ConfigError, match=r"data.mix.asr\[0\].train': must name"):
        from_dict(DataConfig, {"mix": {"asr": [{"share": 0.2}]}}, prefix="data")


def test_read_mix_draws_train_and_splits_the_dev_budget_evenly(tmp_path):
    write_manifest(tmp_path / "real_train.jsonl", _utterances("real", 10, tmp_path))
    write_manifest(tmp_path / "real_dev.jsonl", _utterances("rdev", 40, tmp_path))
    config = from_dict(DataConfig, {"root": str(tmp_path), "dev_limit": 20, "mix": {"asr": [
        {"train": "real_train.jsonl", "dev": str(tmp_path / "real_dev.jsonl"), "share": 0.5}]}}, prefix="data")
    train, dev = {"asr": _utterances("syn", 30)}, {"asr": _utterances("sdev", 20)}
    read_mix(config, tmp_path, ["neutral", "happy", "sad", "angry"], train, dev, seed=0)
    assert sum(u.corpus == "real" for u in train["asr"]) == 30
    assert sum(u.corpus == "sdev" for u in dev["asr"]) == 10 and sum(u.corpus == "rdev" for u in dev["asr"]) == 10


def test_a_missing_mix_manifest_names_its_field(tmp_path):
    config = from_dict(DataConfig, {"root": str(tmp_path), "mix": {"asr": [{"train": "gone.jsonl"}]}}, prefix="data")
    with pytest.raises(FileNotFoundError, match=r"data.mix.asr\[0\].train: manifest .*gone.jsonl does not exist"):
        read_mix(config, tmp_path, [], {"asr": []}, {}, seed=0)
