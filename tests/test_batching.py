"""One batching plan for every entry point: `analyze` on a list honours `batch_size`, groups by
duration and keeps the input order (memory flat in the number of inputs)."""
from __future__ import annotations

import numpy as np
import pytest
from tiny import perturbed, tiny_harmonifuse

from harmonifuse.inference.batching import duration_batches, input_duration


def test_duration_batches_group_similar_lengths_within_input_order_windows():
    durations = [9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 0.5]
    plan = duration_batches(durations, batch_size=2, window_batches=2)
    assert plan == [[[1, 3], [2, 0]], [[6, 5], [4]]]
    # every file once; a later window never holds an earlier file
    assert sorted(i for window in plan for batch in window for i in batch) == list(range(len(durations)))
    assert duration_batches([], batch_size=8) == []
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        duration_batches(durations, batch_size=0)


def test_input_duration_reads_arrays_pairs_and_headers(tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.zeros(8000, dtype=np.float32), 8000)
    assert input_duration(np.zeros(32000)) == 2.0
    assert input_duration((np.zeros(22050), 44100)) == 0.5
    assert input_duration(tmp_path / "a.wav") == 1.0
    assert input_duration(tmp_path / "absent.wav") == 0.0  # decoding names the problem later


def test_analyze_encodes_at_most_batch_size_inputs_at_once_and_keeps_the_order(monkeypatch):
    model = perturbed(tiny_harmonifuse(seed=0))
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(int(16000 * s)).astype(np.float32) for s in (1.0, 0.4, 0.8, 0.3, 0.6, 0.5, 0.9)]
    alone = [model.analyze(clip) for clip in clips]
    seen = []
    encode = model.encode

    def counting(waves, lengths):
        seen.append(len(lengths))
        return encode(waves, lengths)

    monkeypatch.setattr(model, "encode", counting)
    together = model.analyze(clips, batch_size=3)
    assert max(seen) <= 3 and sum(seen) == len(clips)
    assert [r["duration"] for r in together] == [r["duration"] for r in alone]
    for a, b in zip(alone, together):
        assert a["transcript"] == b["transcript"] and a["emotion"] == b["emotion"]
        assert b["emotion_probs"] == pytest.approx(a["emotion_probs"], abs=1e-4)
