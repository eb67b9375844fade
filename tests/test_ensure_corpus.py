"""data.build_synthetic builds the built-in corpus into its own folder only, never into a user's data folder."""
from __future__ import annotations

from pathlib import Path

import pytest

from harmonifuse.config.run import DataConfig
from harmonifuse.data import synthetic
from harmonifuse.training.loaders import ensure_corpus


@pytest.fixture
def prepare_calls(monkeypatch):
    calls: list[Path] = []

    def fake_prepare(out, **options):
        calls.append(Path(out))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / synthetic.PLAN_FILE).write_text("{}")
        for task in synthetic.TASKS:
            for split in synthetic.SPLITS:
                (Path(out) / synthetic.manifest_name(task, split)).write_text("")

    monkeypatch.setattr(synthetic, "prepare", fake_prepare)
    return calls


def users_folder(root: Path) -> dict[str, bytes]:
    root.mkdir()
    (root / "asr_train.jsonl").write_text('{"id": "a", "audio": "a.wav", "text": "hi"}\n')
    (root / "a.wav").write_bytes(b"RIFF")
    return {p.name: p.read_bytes() for p in root.iterdir()}


def test_a_mistyped_manifest_name_in_a_users_folder_is_an_error_not_a_new_corpus(tmp_path, prepare_calls):
    root = tmp_path / "mine"
    before = users_folder(root)
    config = DataConfig(root=str(root), train={"asr": "asr_trian.jsonl"})
    with pytest.raises(FileNotFoundError, match=r"data\.train\.asr: .*asr_trian\.jsonl does not exist") as error:
        ensure_corpus(config, progress=False)
    assert "built-in corpus (asr_train.jsonl)" in str(error.value)
    assert prepare_calls == []
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before  # nothing written into it


def test_built_in_names_in_a_folder_that_is_not_the_built_in_corpus_are_an_error(tmp_path, prepare_calls):
    root = tmp_path / "mine"
    users_folder(root)
    config = DataConfig(root=str(root))  # the built-in names; ser_train.jsonl is missing
    with pytest.raises(FileNotFoundError, match=r"data\.train\.ser: .*ser_train\.jsonl does not exist") as error:
        ensure_corpus(config, progress=False)
    assert f"data.root={root}" in str(error.value)
    assert prepare_calls == []


def test_a_mistyped_dev_manifest_is_named_before_anything_is_synthesised(tmp_path, prepare_calls):
    config = DataConfig(root=str(tmp_path / "new"), dev={"asr": "asr_dev.jsonl", "ser": "ser-dev.jsonl"})
    with pytest.raises(FileNotFoundError, match=r"data\.dev\.ser: .*ser-dev\.jsonl"):
        ensure_corpus(config, progress=False)
    assert prepare_calls == [] and not (tmp_path / "new").exists()


@pytest.mark.parametrize("state", ["absent", "empty", "temp file only", "interrupted corpus"])
def test_the_built_in_corpus_is_built_into_its_own_folder(tmp_path, prepare_calls, state):
    root = tmp_path / "synthetic"
    if state != "absent":
        root.mkdir()
    if state == "temp file only":  # another rank is writing the plan file right now
        (root / f".{synthetic.PLAN_FILE}.123.abcdef01.tmp").write_text("{")
    if state == "interrupted corpus":
        (root / synthetic.PLAN_FILE).write_text("{}")
        (root / "audio").mkdir()
    assert ensure_corpus(DataConfig(root=str(root)), progress=False) == root
    assert prepare_calls == [root]
    assert ensure_corpus(DataConfig(root=str(root)), progress=False) == root and len(prepare_calls) == 1


def test_without_build_synthetic_a_missing_manifest_names_its_field(tmp_path, prepare_calls):
    config = DataConfig(root=str(tmp_path / "none"), build_synthetic=False)
    with pytest.raises(FileNotFoundError, match=r"data\.train\.asr: .*asr_train\.jsonl does not exist.*prepare"):
        ensure_corpus(config, progress=False)
    assert prepare_calls == []
