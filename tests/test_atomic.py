"""harmonifuse.atomic: whole-or-nothing writes with the permissions of any other file the user writes."""
from __future__ import annotations

import os
import stat

import pytest
from safetensors.torch import save_file

from harmonifuse.atomic import atomic_directory, atomic_write, atomic_write_bytes, atomic_write_text, leftovers

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX")


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    text = atomic_write_text(tmp_path / "a.txt", "hello\n")
    data = atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    # safetensors creates its own files owner-only; the result must not keep that
    import torch
    weights = atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, str(tmp)))
    for path in (text, data, weights):
        assert mode(path) == 0o666 & ~mask, path
    assert text.read_text() == "hello\n" and data.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "w.safetensors"]


def test_replacing_a_file_gives_the_new_content(tmp_path):
    target = tmp_path / "t.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_writer_failing_half_way_leaves_the_old_file_and_no_temp_file(tmp_path, error):
    target = tmp_path / "manifest.jsonl"
    target.write_text("old content\n")

    def half(tmp):
        with open(tmp, "w") as out:
            out.write("half of the new")
            out.flush()
            raise error("killed")

    with pytest.raises(error):
        atomic_write(target, half)
    assert target.read_text() == "old content\n"
    assert list(tmp_path.iterdir()) == [target]

    with pytest.raises(error):  # no old file: still nothing under the real name
        atomic_write(tmp_path / "new.jsonl", half)
    assert list(tmp_path.iterdir()) == [target]


def test_directory_is_whole_or_absent_with_umask_modes(tmp_path, umask):
    umask(0o027)
    target = tmp_path / "step_1"

    def build(tmp):
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
        (tmp / "run.sh").write_text("#!/bin/sh\n")
        (tmp / "run.sh").chmod(0o700)
        (tmp / "owner-only").write_text("b")
        (tmp / "owner-only").chmod(0o600)

    assert atomic_directory(target, build) == target
    assert mode(target) == mode(target / "sub") == mode(target / "run.sh") == 0o750
    assert mode(target / "sub" / "a.txt") == mode(target / "owner-only") == 0o640

    def fail(tmp):
        (tmp / "x").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_directory(target, fail)
    assert (target / "sub" / "a.txt").read_text() == "a"  # the old folder is untouched
    assert list(tmp_path.iterdir()) == [target] and not list(leftovers(tmp_path))


def test_directory_in_the_way_is_replaced_unless_kept(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old").write_text("old")
    atomic_directory(target, lambda tmp: (tmp / "new").write_text("new"), keep_existing=lambda p: False)
    assert [p.name for p in target.iterdir()] == ["new"]
    atomic_directory(target, lambda tmp: (tmp / "newer").write_text("x"), keep_existing=lambda p: True)
    assert [p.name for p in target.iterdir()] == ["new"]
    assert list(tmp_path.iterdir()) == [target]


def test_saved_model_folder_is_readable_like_any_other_file(tmp_path, umask):
    from tiny import tiny_harmonifuse

    umask(0o022)
    model = tiny_harmonifuse(seed=0)
    folder = model.save_pretrained(tmp_path / "model")
    files = sorted(folder.iterdir())
    assert files and all(not p.name.startswith(".") for p in files)
    for path in files:
        assert mode(path) == 0o644, path
    assert mode(folder) == 0o755
    tiny_harmonifuse(seed=1).load_trained(folder / "trained.safetensors")  # whole and readable


def test_leftovers_are_told_apart_by_their_target(tmp_path):
    for name in (".thing.12.abcdef01.tmp", ".thing.en.12.abcdef01.tmp", ".notes.tmp", "thing.tmp"):
        (tmp_path / name).write_text("")
    assert sorted(p.name for p in leftovers(tmp_path)) == [".thing.12.abcdef01.tmp", ".thing.en.12.abcdef01.tmp"]
    assert [p.name for p in leftovers(tmp_path, "thing")] == [".thing.12.abcdef01.tmp"]
