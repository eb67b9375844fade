"""`harmonifuse serve` on the tiny model: every endpoint and response format, the `openai` client,
every error code from a real HTTP request, the API key, readiness, batching, the queue's limits."""
from __future__ import annotations

import json
import re
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from serve_tiny import GatedModel, multipart_chunks, running, wav_bytes
from tiny import LoudIsSpeechVAD, tiny_harmonifuse

from harmonifuse.serve.app import ServeSettings, create_app
from harmonifuse.serve.server import BindRefused, check_bind, is_loopback

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def model():
    return tiny_harmonifuse(seed=0).eval()


def settings(**changes) -> ServeSettings:
    return ServeSettings(**{"model_id": "tiny", **changes})


@pytest.fixture(scope="module")
def url(model):
    with running(create_app(model, settings=settings())) as base:
        yield base


def post(base, path="/v1/audio/transcriptions", content=None, name="clip.wav", data=None, **kwargs):
    files = {"file": (name, wav_bytes() if content is None else content, "audio/wav")}
    return httpx.post(base + path, files=files, data=data or {}, timeout=60, **kwargs)


def assert_error(response, status, code, param=None):
    """OpenAI's error shape, the expected status and code, and no trace or server path in it."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["param"] == param
    message = body["error"]["message"]
    assert message and "Traceback" not in response.text and "File \"" not in response.text
    for secret in (tempfile.gettempdir(), str(ROOT), "harmonifuse-serve-", "/upload-"):
        assert secret not in response.text, response.text
    return message


# -- endpoints ---------------------------------------------------------------------------------------

def test_health_models_and_the_page(url):
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    ready = httpx.get(url + "/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["model"] == "tiny"
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["object"] == "model" and isinstance(models["data"][0]["created"], int)
    assert httpx.get(url + "/v1/models/tiny").json()["id"] == "tiny"
    assert_error(httpx.get(url + "/v1/models/whisper-1"), 404, "model_not_found", "model")
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page.text, re.I), "the page must fetch nothing else"
    config = json.loads(re.search(r"const CONFIG = (\{.*?\});", page.text).group(1))
    assert config == {"model": "tiny", "maxSeconds": 818, "maxUploadMB": 25.0, "auth": False}
    for element in ('id="record"', 'id="file-input"', 'id="transcript"', 'id="emotions"', 'id="copy"',
                    "MediaRecorder", "OfflineAudioContext", "/v1/audio/analyze", "localhost"):
        assert element in page.text


def test_analyze_answers_as_the_python_api_does(url, model, tmp_path):
    path = tmp_path / "clip.wav"
    path.write_bytes(wav_bytes(seed=3))
    response = post(url, "/v1/audio/analyze", path.read_bytes())
    assert response.status_code == 200
    body = response.json()
    expected = model.analyze([str(path)])[0]
    assert body["model"] == "tiny" and body["file"] == "clip.wav" and body["object"] == "audio.analysis"
    for key, value in expected.items():
        assert body[key] == value, key
    assert set(body["emotion_probs"]) == {"neutral", "happy", "sad", "angry"}
    timings = body["timings"]
    assert timings["batch_size"] == 1 and timings["total_ms"] >= timings["inference_ms"] > 0
    assert int(response.headers["openai-processing-ms"]) >= 0


@pytest.mark.parametrize("response_format", ["json", "text", "verbose_json", "srt", "vtt"])
def test_transcriptions_in_every_response_format(url, model, tmp_path, response_format):
    import srt
    import webvtt

    path = tmp_path / "clip.wav"
    path.write_bytes(wav_bytes(seed=1))
    text = model.analyze([str(path)])[0]["transcript"]
    response = post(url, content=path.read_bytes(), data={"response_format": response_format, "model": "tiny",
                                                            "temperature": "0", "prompt": "ignored", "language": "en"})
    assert response.status_code == 200, response.text
    if response_format == "json":
        assert response.json()["text"] == text and response.json()["usage"]["seconds"] == 1.0
    elif response_format == "text":
        assert response.headers["content-type"].startswith("text/plain") and response.text == text + "\n"
    elif response_format == "verbose_json":
        body = response.json()
        assert body["task"] == "transcribe" and body["language"] == "english" and body["duration"] == 1.0
        assert body["text"] == text and [s["text"] for s in body["segments"]] == [text.strip()]
        assert body["segments"][0]["start"] == 0.0 and body["segments"][0]["end"] == 1.0
        assert body["emotion"]["label"] in body["emotion"]["probabilities"]
        assert sum(body["emotion"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    elif response_format == "srt":
        cues = list(srt.parse(response.text))
        assert [c.content for c in cues] == [text.strip()] and cues[0].end.total_seconds() == 1.0
    else:
        assert response.headers["content-type"].startswith("text/vtt")
        cues = list(webvtt.from_string(response.text))
        assert [c.text for c in cues] == [text.strip()] and cues[0].end == "00:00:01.000"


def test_a_long_recording_is_answered_with_segments_in_every_format(tmp_path):
    """Over the encoder's window (4 s here), the upload goes to the model as a file, cut at pauses;
    verbose_json, srt and vtt carry its segments and times."""
    import srt
    import webvtt

    long_model = tiny_harmonifuse(seed=0).eval()
    long_model.vad = LoudIsSpeechVAD()
    long_model.config.encoder.max_seconds = 4.0
    rng = np.random.default_rng(1)
    silence = np.zeros(16000, dtype=np.float32)
    noise = [(rng.standard_normal(int(s * 16000)) * 0.2).astype(np.float32) for s in (2.0, 1.5)]
    wave = np.concatenate([silence, noise[0], silence, noise[1], silence, silence])
    path = tmp_path / "long.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    expected = long_model.analyze(str(path))
    assert len(expected["segments"]) == 2
    with running(create_app(long_model, settings=settings(max_seconds=None))) as base:
        body = post(base, "/v1/audio/analyze", path.read_bytes(), "long.wav").json()
        verbose = post(base, content=path.read_bytes(), data={"response_format": "verbose_json"}).json()
        srt_text = post(base, content=path.read_bytes(), data={"response_format": "srt"}).text
        vtt_text = post(base, content=path.read_bytes(), data={"response_format": "vtt"}).text
    assert body["segments"] == expected["segments"] and body["duration"] == pytest.approx(7.5)
    spoken = [s for s in expected["segments"] if s["transcript"].strip()]
    assert [(s["start"], s["end"], s["text"]) for s in verbose["segments"]] == [
        (s["start"], s["end"], s["transcript"].strip()) for s in spoken]
    assert all(s["emotion"]["label"] == e["emotion"] for s, e in zip(verbose["segments"], spoken))
    cues = list(srt.parse(srt_text))
    assert [(c.start.total_seconds(), c.content) for c in cues] == [(s["start"], s["transcript"].strip())
                                                                   for s in spoken]
    assert [c.text for c in webvtt.from_string(vtt_text)] == [c.content for c in cues]


def test_the_openai_client_works_unchanged(model, tmp_path):
    openai = pytest.importorskip("openai")
    path = tmp_path / "clip.wav"
    path.write_bytes(wav_bytes(seed=2))
    expected = model.analyze([str(path)])[0]
    with running(create_app(model, settings=settings(api_key=KEY))) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        with path.open("rb") as f:
            result = client.audio.transcriptions.create(model="tiny", file=f)
        assert result.text == expected["transcript"]
        with path.open("rb") as f:
            verbose = client.audio.transcriptions.create(model="tiny", file=f, response_format="verbose_json")
        assert verbose.duration == 1.0 and verbose.segments[0].text == expected["transcript"].strip()
        assert verbose.model_extra["emotion"]["label"] == expected["emotion"]
        with path.open("rb") as f:
            assert client.audio.transcriptions.create(model="tiny", file=f, response_format="text").strip() == \
                expected["transcript"].strip()
        with path.open("rb") as f:
            subtitles = client.audio.transcriptions.create(model="tiny", file=f, response_format="srt")
        assert subtitles.startswith("1\n00:00:00,000 --> 00:00:01,000")
        assert [m.id for m in client.models.list()] == ["tiny"]
        with pytest.raises(openai.NotFoundError) as missing, path.open("rb") as f:
            client.audio.transcriptions.create(model="whisper-1", file=f)
        assert missing.value.code == "model_not_found" and "tiny" in missing.value.message
        wrong = openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError), path.open("rb") as f:
            wrong.audio.transcriptions.create(model="tiny", file=f)


# -- errors ------------------------------------------------------------------------------------------

def test_bad_requests_are_400_saying_what_was_wrong(url):
    message = assert_error(post(url, content=b"RIFF\x00\x00 this is text, not audio " * 20), 400,
                           "invalid_audio", "file")
    assert message.startswith("clip.wav: not a readable audio file") and "WAV" in message
    assert "empty (0 bytes)" in assert_error(post(url, content=b""), 400, "invalid_audio", "file")
    truncated = wav_bytes()[:30]
    assert "clip.wav" in assert_error(post(url, content=truncated), 400, "invalid_audio", "file")
    nan = np.full(16000, np.nan, dtype=np.float32)
    buffer = __import__("io").BytesIO()
    sf.write(buffer, nan, 16000, format="WAV", subtype="FLOAT")
    assert "NaN" in assert_error(post(url, content=buffer.getvalue()), 400, "invalid_audio", "file")
    assert "too short" in assert_error(post(url, content=wav_bytes(0.02)), 400, "invalid_audio", "file")
    no_file = httpx.post(url + "/v1/audio/transcriptions", files={"audio": ("clip.wav", wav_bytes())})
    assert "`file`" in assert_error(no_file, 400, "missing_file", "file")
    as_json = httpx.post(url + "/v1/audio/transcriptions", json={"file": "clip.wav"})
    assert "multipart/form-data" in assert_error(as_json, 400, "invalid_content_type", "file")
    assert "verbose_json" in assert_error(post(url, data={"response_format": "mp3"}), 400, "invalid_value",
                                          "response_format")
    assert_error(post(url, data={"temperature": "hot"}), 400, "invalid_value", "temperature")
    assert "English" in assert_error(post(url, data={"language": "fr"}), 400, "unsupported_language", "language")


def test_a_recording_over_max_seconds_is_400_saying_what_to_do(model):
    with running(create_app(model, settings=settings(max_seconds=2.0))) as base:
        message = assert_error(post(base, content=wav_bytes(3.0)), 400, "audio_too_long", "file")
        assert post(base, content=wav_bytes(1.5)).status_code == 200
    assert "3.0 s" in message and "2 s (--max-seconds)" in message and "cut it into parts" in message


def test_unknown_model_route_and_method_are_404_and_405(url):
    assert "`whisper-1`" in assert_error(post(url, data={"model": "whisper-1"}), 404, "model_not_found", "model")
    assert_error(httpx.get(url + "/v1/audio/nowhere"), 404, "not_found")
    assert_error(httpx.get(url + "/v1/audio/transcriptions"), 405, "method_not_allowed")


def test_uploads_over_the_limit_are_413_with_or_without_a_length(model):
    limit_mb = 0.5
    app = create_app(model, settings=settings(max_upload_mb=limit_mb))
    with running(app) as base:
        big = b"\x00" * int(5 * limit_mb * 1024 * 1024)
        announced = post(base, content=big)  # Content-Length: refused before the body is read
        assert "--max-upload-mb" in assert_error(announced, 413, "file_too_large", "file")
        streamed = httpx.post(base + "/v1/audio/transcriptions", content=multipart_chunks(len(big)), timeout=60,
                              headers={"Content-Type": "multipart/form-data; boundary=----harmonifuse"})
        assert "0.5 MB" in assert_error(streamed, 413, "file_too_large", "file")
        assert post(base).status_code == 200  # and the server goes on
        assert app.state.service.worker.arriving == 0  # refused uploads are not waited for
        assert not list(Path(tempfile.gettempdir()).glob("harmonifuse-serve-*/upload-*"))  # nothing left behind


def test_an_api_key_guards_everything_but_health(model):
    with running(create_app(model, settings=settings(api_key=KEY))) as base:
        guarded = [("GET", "/v1/models", {}), ("GET", "/v1/models/tiny", {}), ("GET", "/v1/nowhere", {}),
                   ("POST", "/v1/audio/transcriptions", {"files": {"file": ("a.wav", wav_bytes())}}),
                   ("POST", "/v1/audio/analyze", {"files": {"file": ("a.wav", wav_bytes())}})]
        for method, path, extra in guarded:
            missing = httpx.request(method, base + path, **extra)
            assert "Authorization: Bearer" in assert_error(missing, 401, "invalid_api_key")
            assert missing.headers["www-authenticate"] == "Bearer"
            wrong = httpx.request(method, base + path, headers={"Authorization": "Bearer nope"}, **extra)
            assert assert_error(wrong, 401, "invalid_api_key") == "incorrect API key"
            right = httpx.request(method, base + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, **extra)
            assert right.status_code == (404 if "nowhere" in path else 200)
        assert httpx.get(base + "/health").status_code == 200 and httpx.get(base + "/health/ready").status_code == 200
        page = httpx.get(base + "/")  # the static page, which asks for the key and sends it with its calls
        assert page.status_code == 200 and '"auth": true' in page.text and KEY not in page.text


def test_readiness_is_503_while_the_model_loads(model):
    release = threading.Event()

    def loader():
        release.wait(30)
        return model

    with running(create_app(loader=loader, settings=settings())) as base:
        assert httpx.get(base + "/health").status_code == 200
        loading = httpx.get(base + "/health/ready")
        assert loading.status_code == 503 and loading.json()["status"] == "loading" and loading.headers["retry-after"]
        early = post(base)
        assert "loading" in assert_error(early, 503, "model_loading") and early.headers["retry-after"] == "5"
        release.set()
        deadline = time.monotonic() + 10
        while httpx.get(base + "/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(base + "/health/ready").status_code == 200
        assert post(base).status_code == 200


def test_a_model_that_fails_to_load_stops_the_server():
    def loader():
        raise RuntimeError("weights are corrupt")

    app = create_app(loader=loader, settings=settings())
    with running(app):
        _wait_until(lambda: app.state.server.should_exit)
        assert app.state.service.load_error == "RuntimeError: weights are corrupt"
        assert app.state.service.status() == "failed"


# -- the queue -------------------------------------------------------------------------------------

def _in_thread(fn, *args, **kwargs):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("response", fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, out


def _wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _raw_request(base: str, body: bytes = None) -> socket.socket:
    """An analyze request sent on a raw socket, left waiting for its answer."""
    boundary = "rawboundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="raw.wav"\r\n\r\n'.encode()
            + (body or wav_bytes()) + f"\r\n--{boundary}--\r\n".encode())
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v1/audio/analyze HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
                 f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_a_full_queue_is_503_with_retry_after_and_a_disconnect_frees_its_slot(model):
    gated = GatedModel(model, open=False)
    app = create_app(gated, settings=settings(max_batch=1, max_queue=1))
    worker = app.state.service.worker
    with running(app) as base:
        first, first_out = _in_thread(post, base, "/v1/audio/analyze")
        assert gated.entered.wait(10)  # answering, the queue empty
        queued = _raw_request(base)
        _wait_until(lambda: worker.waiting == 1)
        full = post(base)
        message = assert_error(full, 503, "server_overloaded")
        assert "busy" in message and int(full.headers["retry-after"]) >= 1
        queued.close()  # its client goes away: the slot frees
        _wait_until(lambda: worker.waiting == 0)
        second, second_out = _in_thread(post, base, "/v1/audio/analyze")
        _wait_until(lambda: worker.waiting == 1)
        gated.gate.set()
        first.join(60), second.join(60)
    assert first_out["response"].status_code == 200 and second_out["response"].status_code == 200
    assert gated.batches == [1, 1]  # the abandoned request never ran
    assert worker.arriving == 0 and worker.waiting == 0


def test_requests_past_the_deadline_are_504_and_leave_the_queue(model):
    gated = GatedModel(model, open=False)
    app = create_app(gated, settings=settings(max_batch=1, timeout=0.5))
    with running(app) as base:
        first, first_out = _in_thread(post, base)
        assert gated.entered.wait(10)
        began = time.monotonic()
        late = post(base)
        assert "0.5 s deadline (--timeout)" in assert_error(late, 504, "timeout")
        assert time.monotonic() - began < 5 and app.state.service.worker.waiting == 0
        first.join(10)
        assert_error(first_out["response"], 504, "timeout")  # answering, but not in time
        gated.gate.set()
        _wait_until(lambda: app.state.service.worker.running == 0)
        assert post(base).status_code == 200
    assert gated.batches == [1, 1]  # the one that timed out in the queue never ran


def test_waiting_requests_are_answered_in_one_batch(model):
    gated = GatedModel(model, open=False)
    app = create_app(gated, settings=settings(max_batch=4))
    with running(app) as base:
        first, first_out = _in_thread(post, base, "/v1/audio/analyze")
        assert gated.entered.wait(10)
        rest = [_in_thread(post, base, "/v1/audio/analyze", wav_bytes(seed=i)) for i in range(4)]
        _wait_until(lambda: app.state.service.worker.waiting == 4)
        gated.gate.set()
        for thread, _ in [(first, None), *rest]:
            thread.join(60)
    assert gated.batches == [1, 4]
    assert [out["response"].json()["timings"]["batch_size"] for _, out in rest] == [4, 4, 4, 4]


class _Echo:
    def __init__(self):
        self.batches = []

    def analyze(self, audio, **options):
        self.batches.append(list(audio))
        return [{"transcript": item} for item in audio]


def test_the_worker_waits_briefly_for_a_request_still_uploading():
    from harmonifuse.serve.worker import InferenceWorker

    model = _Echo()
    worker = InferenceWorker(max_batch=4, batch_wait=0.001, arrival_wait=2.0)
    worker.start(model)
    deadline = time.monotonic() + 60
    worker.arrive(), worker.arrive()  # two uploads under way
    first = worker.submit("a", "a", deadline, arrived=True)
    time.sleep(0.2)
    second = worker.submit("b", "b", deadline, arrived=True)
    assert first.future.result(10) == {"transcript": "a"} and second.future.result(10) == {"transcript": "b"}
    worker.arrive(), worker.arrive()
    third = worker.submit("c", "c", deadline, arrived=True)
    began = time.monotonic()
    worker.depart()  # the other one was refused: nothing more to wait for
    assert third.future.result(10) == {"transcript": "c"} and time.monotonic() - began < 1.0
    alone = worker.submit("d", "d", deadline)  # nothing arriving: only batch_wait
    assert alone.future.result(10) == {"transcript": "d"}
    worker.close(10)
    assert model.batches == [["a", "b"], ["c"], ["d"]] and worker.arriving == 0


# -- binding -----------------------------------------------------------------------------------------

def test_only_loopback_without_a_key_unless_insecure():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        check_bind(host, 8000, None, False)
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        assert not is_loopback(host)
        with pytest.raises(BindRefused, match=r"--api-key KEY .*--insecure"):
            check_bind(host, 8000, None, False)
        check_bind(host, 8000, KEY, False)
        check_bind(host, 8000, None, True)


def test_the_command_refuses_a_public_address_before_loading_anything(capsys, monkeypatch):
    from harmonifuse import cli

    monkeypatch.delenv("HARMONIFUSE_API_KEY", raising=False)
    began = time.monotonic()
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert time.monotonic() - began < 5
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0:1 without an API key" in err and "--insecure" in err
