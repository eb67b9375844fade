"""`evaluate` scores utterances of any length as `analyze` answers them (one long line never aborts it)."""
from __future__ import annotations

import numpy as np
import soundfile as sf
import torch
from tiny import perturbed, tiny_harmonifuse

from harmonifuse.data.manifest import Utterance
from harmonifuse.evaluation.evaluate import evaluate


def _clip(path, seconds: float, seed: int) -> Utterance:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * 16_000)) / 16_000
    # a voiced-like tone with pauses every 2 s, so a long recording has places to cut
    wave = 0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 0.5 * t) > -0.7) + 0.01 * rng.standard_normal(t.size)
    sf.write(path, wave.astype(np.float32), 16_000)
    return Utterance(id=path.stem, audio=str(path), duration=seconds, corpus="toy", speaker=path.stem[:2],
                     text="hello world")


def test_a_line_longer_than_the_encoder_window_is_answered_like_analyze(tmp_path):
    torch.manual_seed(0)
    model = perturbed(tiny_harmonifuse(seed=0, encoder={"max_seconds": 4.0}))
    utterances = [_clip(tmp_path / "s1-short.wav", 2.0, 0), _clip(tmp_path / "s2-long.wav", 9.0, 1),
                  _clip(tmp_path / "s1-mid.wav", 3.0, 2)]
    result = evaluate(model, {"asr": utterances}, batch_size=2, progress=False)
    hypotheses = {p["id"]: p["hypothesis"] for p in result["predictions"]["asr"]}
    assert list(hypotheses) == ["s1-short", "s2-long", "s1-mid"]  # input order, nothing dropped
    assert hypotheses["s2-long"] == model.analyze(str(tmp_path / "s2-long.wav"), tasks=("asr",))["transcript"]
    assert hypotheses["s1-short"] == model.analyze(str(tmp_path / "s1-short.wav"), tasks=("asr",))["transcript"]
    assert set(result["metrics"]["per_speaker"]) == {"s1", "s2"}
