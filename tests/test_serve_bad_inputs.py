"""The bad-input corpus's audio kinds (tests/make_bad_inputs.py) uploaded to `harmonifuse serve`.

Every kind a client can upload (a regular file: not a missing path, a folder, an unreadable file or
a broken link, which fail on the client's side) ends as the corpus says: answered (200), answered
as no speech (200, ``no_speech``), or a 400 in OpenAI's error shape whose message names the
uploaded file and says what was wrong, without a server path or a stack trace.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
from serve_tiny import running
from tiny import tiny_harmonifuse

from harmonifuse.serve.app import ServeSettings, create_app

make_bad_inputs = pytest.importorskip("make_bad_inputs")
CLIENT_SIDE = {"missing_file", "directory", "permission_denied", "symlink_loop", "broken_symlink"}
SPEECH = shutil.which("flite") is not None  # else the clips are tones the detector may not take for speech


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs_http")
    kinds = [k for k in make_bad_inputs.build(root / "corpus") if k.group == "audio"]
    sendable = [k for k in kinds if k.name not in CLIENT_SIDE]
    assert all(os.path.isfile(k.path) for k in sendable)
    return kinds, sendable


@pytest.fixture(scope="module")
def url():
    # voice activity detection on, and an 8 s encoder window so the 40 s recording takes the long path
    model = tiny_harmonifuse(seed=0, vad={"enabled": True}, encoder={"max_seconds": 8.0}).eval()
    with running(create_app(model, settings=ServeSettings(model_id="tiny"))) as base:
        yield base


def test_only_client_side_kinds_cannot_be_uploaded(corpus):
    kinds, sendable = corpus
    unsendable = {k.name for k in kinds} - {k.name for k in sendable}
    assert unsendable == CLIENT_SIDE
    assert len(sendable) >= 20


def test_every_uploadable_kind_ends_as_the_corpus_says(corpus, url):
    _, sendable = corpus
    seen = {}
    for kind in sendable:
        name = Path(kind.path).name
        response = httpx.post(url + "/v1/audio/analyze", files={"file": (name, Path(kind.path).read_bytes())},
                              timeout=300)
        seen[kind.name] = response.status_code
        if kind.outcome == "error":
            assert response.status_code == 400, (kind.name, response.text)
            error = response.json()["error"]
            code = "sample_rate_too_high" if kind.name == "header_bomb" else "invalid_audio"
            assert error["code"] == code and error["param"] == "file", (kind.name, error)
            assert name in error["message"] and kind.needles[0] in error["message"], (kind.name, error["message"])
            for secret in (tempfile.gettempdir(), "Traceback", 'File "'):
                assert secret not in response.text, (kind.name, response.text)
            continue
        assert response.status_code == 200, (kind.name, response.text)
        body = response.json()
        assert body["file"] == name and body["duration"] > 0
        if kind.outcome == "no_speech":
            assert body["no_speech"] is True and body["emotion"] is None, (kind.name, body)
        elif SPEECH:
            assert body["no_speech"] is False and body["emotion"] in body["emotion_probs"], (kind.name, body)
        if kind.name == "long_recording":
            assert body["duration"] == pytest.approx(40.0) and body["segments"], body
    assert len(seen) == len(sendable)
