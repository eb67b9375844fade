"""`harmonifuse serve` against hostile clients, each attack a real request to a running server:
audio bombs as real FLAC files, slow and idle clients on raw sockets, work nobody waits for,
cross-site and rebinding requests, and the key's edge cases."""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from serve_tiny import GatedModel, multipart_body, running, wav_bytes, write_header_bomb
from test_serve import assert_error, post, settings
from tiny import tiny_harmonifuse

from harmonifuse.audio import AudioTooLarge, HeaderLimits, load_audio
from harmonifuse.cancellation import Cancelled, cancel_when, checkpoint
from harmonifuse.segments import AudioSource
from harmonifuse.serve.app import create_app
from harmonifuse.serve.command import read_api_key
from harmonifuse.serve.worker import InferenceWorker, QueueFull


@pytest.fixture(scope="module")
def model():
    return tiny_harmonifuse(seed=0).eval()


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bombs")
    return {"rate": write_header_bomb(folder / "rate.flac", 655_350, 8, 29.0),
            "channels": write_header_bomb(folder / "channels.wav", 8_000, 16, 1.0),  # FLAC stops at 8
            "long": write_header_bomb(folder / "long.flac", 16_000, 1, 60.0)}


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict, dict | None]:
    """(status, headers, JSON body) of one response, read until the server closes or the body ends."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


def closed_by_server(sock: socket.socket, within: float = 5.0) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


# -- audio bombs -------------------------------------------------------------------------------------

def test_header_bombs_are_refused_before_decoding_naming_the_limit(model, bombs):
    with running(create_app(model, settings=settings(max_decoded_mb=2.0))) as base:
        rate = post(base, "/v1/audio/analyze", content=bombs["rate"].read_bytes(), name="rate.flac")
        message = assert_error(rate, 400, "sample_rate_too_high", "file")
        assert "rate.flac" in message and "655,350 Hz" in message and "--max-sample-rate" in message
        channels = post(base, content=bombs["channels"].read_bytes(), name="many.wav")
        assert "16 channels" in assert_error(channels, 400, "too_many_channels", "file")
        # 60 s of 16 kHz mono is 3.7 MB of float32, over 2 MB; it would take the long-recording path
        long = post(base, "/v1/audio/analyze", content=bombs["long"].read_bytes(), name="long.flac")
        assert "--max-decoded-mb" in assert_error(long, 400, "audio_too_large", "file")
        assert post(base).status_code == 200  # and ordinary audio still goes through


def test_a_users_own_bomb_gets_a_clear_error_from_the_python_api(model, bombs):
    with pytest.raises(AudioTooLarge, match=r"rate\.flac: the header declares a sample rate of 655,350 Hz"):
        load_audio(bombs["rate"], max_seconds=None)
    with pytest.raises(AudioTooLarge, match="16 channels") as error:
        AudioSource(bombs["channels"])
    assert error.value.limit == "channels"
    with pytest.raises(AudioTooLarge, match="sample rate of 655,350 Hz"):
        model.analyze(str(bombs["rate"]))  # 29 s: the short path, refused from the header alone
    with pytest.raises(AudioTooLarge, match="decoded it would be 4 MB"):
        HeaderLimits(max_decoded_mb=1.0).check("x.flac", 16_000, 1, 60 * 16_000)
    HeaderLimits().check("studio.flac", 192_000, 8, 60 * 192_000)  # real recordings pass


def test_a_full_queue_refuses_before_the_body_is_read(model):
    gated = GatedModel(model, open=False)
    app = create_app(gated, settings=settings(max_batch=1, max_queue=1))
    worker = app.state.service.worker
    with running(app) as base:
        first = threading.Thread(target=post, args=(base,), daemon=True)
        first.start()
        assert gated.entered.wait(10)
        queued = threading.Thread(target=post, args=(base,), daemon=True)
        queued.start()
        deadline = time.monotonic() + 10
        while worker.waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sock = connect(base)  # announces 20 MB and sends none of it
        sock.sendall(b"POST /v1/audio/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 20000000\r\n"
                     b"Content-Type: multipart/form-data; boundary=x\r\n\r\n")
        status, headers, body = read_response(sock)
        assert status == 503 and body["error"]["code"] == "server_overloaded" and int(headers["retry-after"]) >= 1
        gated.gate.set()
        first.join(30), queued.join(30)
    assert worker.arriving == 0 and worker.waiting == 0


def test_long_recordings_are_charged_one_slot_per_window():
    worker = InferenceWorker(max_batch=1, max_queue=4)
    big = worker.submit("a.wav", "a", time.monotonic() + 60, cost=3)
    assert worker.load == 3
    with pytest.raises(QueueFull):
        worker.submit("b.wav", "b", time.monotonic() + 60, cost=2)
    small = worker.submit("c.wav", "c", time.monotonic() + 60)  # one slot is left
    with pytest.raises(QueueFull):
        worker.arrive()  # and now none, for the next upload either
    assert worker.cancel(big) and worker.load == 1
    assert worker.cancel(worker.submit("e.wav", "e", time.monotonic() + 60, cost=3)) and worker.load == 1
    worker.cancel(small)
    assert worker.submit("d.wav", "d", time.monotonic() + 60, cost=100).cost == 4  # never more than the queue


def test_decodes_run_at_most_decode_concurrency_at_once(model):
    active, peak, lock = [0], [0], threading.Lock()

    class SlowDecoding(GatedModel):
        def load_arrays(self, audio):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.3)
            with lock:
                active[0] -= 1
            return self.model.load_arrays(audio)

    app = create_app(SlowDecoding(model), settings=settings(decode_concurrency=2))
    with running(app) as base:
        threads = [threading.Thread(target=post, args=(base,), daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert peak[0] == 2


# -- slow and idle clients ---------------------------------------------------------------------------

SLOW = dict(header_timeout=1.0, idle_timeout=1.0, upload_timeout=3.0)


def test_an_idle_connection_and_trickled_headers_get_408_and_are_closed(model):
    with running(create_app(model, settings=settings(**SLOW))) as base:
        idle = connect(base)
        began = time.monotonic()
        status, headers, body = read_response(idle)
        assert status == 408 and body["error"]["code"] == "header_timeout" and headers["connection"] == "close"
        assert "nothing was sent" in body["error"]["message"] and 0.9 < time.monotonic() - began < 5
        assert closed_by_server(idle)
        slow = connect(base)
        began = time.monotonic()
        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n":
            try:
                slow.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)  # 4 s of headers against a 1 s timeout
        status, _, body = read_response(slow)
        assert status == 408 and "still arriving" in body["error"]["message"]
        assert time.monotonic() - began < 5
        assert httpx.get(base + "/health").status_code == 200


def test_a_stalled_or_trickled_body_is_408_and_the_connection_closed(model):
    with running(create_app(model, settings=settings(**SLOW))) as base:
        content, content_type = multipart_body(wav_bytes())
        stalled = connect(base)  # a Content-Length that promises more than is sent
        stalled.sendall(f"POST /v1/audio/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                        f"Content-Length: {len(content) + 1000}\r\n\r\n".encode() + content)
        status, headers, body = read_response(stalled)
        assert status == 408 and body["error"]["code"] == "upload_timeout" and "--idle-timeout" in body["error"]["message"]
        assert headers["connection"] == "close" and closed_by_server(stalled)

        trickle = connect(base)  # a chunk every 0.3 s: never idle, but over the 3 s upload deadline
        trickle.sendall(f"POST /v1/audio/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                        f"Content-Length: {len(content)}\r\n\r\n".encode())
        began = time.monotonic()
        for start in range(0, len(content), 3):
            try:
                trickle.sendall(content[start:start + 3])
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.3)
            if time.monotonic() - began > 6:
                break
        status, _, body = read_response(trickle)
        assert status == 408 and "--upload-timeout" in body["error"]["message"]
        assert post(base).status_code == 200


def test_connections_past_the_cap_get_503_at_once(model):
    with running(create_app(model, settings=settings(max_connections=3, header_timeout=30))) as base:
        held = [connect(base) for _ in range(3)]
        time.sleep(0.2)
        extra = connect(base)
        status, headers, body = read_response(extra)
        assert status == 503 and body["error"]["code"] == "too_many_connections" and headers["retry-after"] == "1"
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert post(base).status_code == 200


def test_bad_http_gets_openais_shape_too(model):
    with running(create_app(model, settings=settings())) as base:
        large = connect(base)  # h11 bounds a head still arriving: sent in pieces, as a slow attacker would
        large.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        try:
            for _ in range(6):
                time.sleep(0.05)
                large.sendall(b"a" * 4000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = read_response(large)
        assert status == 431 and body["error"]["code"] == "headers_too_large" and "16 KB" in body["error"]["message"]
        broken = connect(base)
        broken.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, _, body = read_response(broken)
        assert status == 400 and body["error"]["code"] == "invalid_http_request"
        prompt = post(base, data={"prompt": "x" * 100_000})
        assert "64 KB" in assert_error(prompt, 413, "fields_too_large")


# -- work nobody waits for ---------------------------------------------------------------------------

class EndlessModel(GatedModel):
    """Answers only when stopped: counts how far it got, passing a checkpoint every 10 ms."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.steps, self.stopped = 0, threading.Event()

    def analyze(self, audio, **options):
        self.entered.set()
        try:
            for _ in range(6000):
                checkpoint()
                self.steps += 1
                time.sleep(0.01)
        except Cancelled:
            self.stopped.set()
            raise
        return self.model.analyze(audio, **options)


@pytest.mark.parametrize("how", ["deadline", "disconnect"])
def test_work_nobody_waits_for_stops_at_the_next_checkpoint(model, how):
    endless = EndlessModel(model)
    app = create_app(endless, settings=settings(timeout=1.0 if how == "deadline" else 60.0))
    with running(app) as base:
        if how == "deadline":
            assert_error(post(base), 504, "timeout")
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(base + "/v1/audio/analyze", files={"file": ("a.wav", wav_bytes())}, timeout=1.0)
        assert endless.stopped.wait(10)  # the thread is free long before the 60 s of work
        assert endless.steps < 1000
        assert app.state.service.worker.running == 0


def test_checkpoints_stop_the_real_model_between_decoding_steps(model):
    calls = []

    def stop_after(n):
        def check():
            calls.append(1)
            return "enough" if len(calls) >= n else None
        return check

    with cancel_when(stop_after(10**9)):
        model.analyze(wav_bytes_array())
    passed = len(calls)
    assert passed > 4  # batches, tasks and every token of the beam search pass one
    calls.clear()
    with pytest.raises(Cancelled, match="enough"), cancel_when(stop_after(passed - 1)):
        model.analyze(wav_bytes_array())
    checkpoint()  # outside cancel_when nothing stops


def wav_bytes_array() -> np.ndarray:
    import io

    samples, _ = sf.read(io.BytesIO(wav_bytes(seconds=1.0)), dtype="float32")
    return samples


# -- cross-site requests and the key -----------------------------------------------------------------

def test_without_a_key_host_and_origin_must_name_this_server(model):
    app = create_app(model, settings=settings(allowed_hosts=("proxy.example",),
                                              allowed_origins=("https://app.example",)))
    with running(app) as base:
        port = base.rsplit(":", 1)[1]
        assert post(base, headers={"Origin": base}).status_code == 200  # the page's own calls
        assert post(base, headers={"Origin": f"http://localhost:{port}"}).status_code == 200
        rebound = post(base, headers={"Host": f"evil.example:{port}"})
        assert "--allowed-host" in assert_error(rebound, 403, "host_not_allowed")
        assert_error(post(base, headers={"Origin": "https://evil.example"}), 403, "origin_not_allowed")
        assert_error(post(base, headers={"Origin": "null"}), 403, "origin_not_allowed")
        assert_error(post(base, headers={"Host": f"127.0.0.1:{int(port) + 1}"}), 403, "host_not_allowed")
        assert post(base, headers={"Host": "proxy.example", "Origin": "https://proxy.example"}).status_code == 200
        assert post(base, headers={"Origin": "https://app.example"}).status_code == 200
        assert httpx.get(base + "/health", headers={"Host": "evil.example"}).status_code == 200  # probes pass


def test_the_key_one_header_utf8_and_the_page_cannot_be_framed(model):
    key = "clé-ключ-🔑"
    with running(create_app(model, settings=settings(api_key=key))) as base:
        auth = b"Bearer " + key.encode("utf-8")
        assert post(base, headers={"Authorization": auth}).status_code == 200
        assert post(base, headers={"Origin": "https://elsewhere.example", "Authorization": auth}).status_code == 200
        assert_error(post(base, headers={"Authorization": b"Bearer " + "cle".encode()}), 401, "invalid_api_key")
        content, content_type = multipart_body(wav_bytes())
        sock = connect(base)
        sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong\r\n"
                     b"Authorization: " + auth + f"\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(content)}\r\n\r\n".encode() + content)
        status, _, body = read_response(sock)
        assert status == 400 and body["error"]["code"] == "duplicate_authorization"
        page = httpx.get(base + "/")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"


def test_the_key_from_a_file_or_the_environment_and_a_warning_for_the_command_line(tmp_path, monkeypatch, capsys):
    def args(**kw):
        return argparse.Namespace(**{"api_key": None, "api_key_file": None, **kw})

    secret = tmp_path / "key"
    secret.write_text("sk-from-file\n", encoding="utf-8")
    monkeypatch.setenv("HARMONIFUSE_API_KEY", "sk-from-env")
    assert read_api_key(args(api_key_file=secret)) == "sk-from-file"
    assert read_api_key(args()) == "sk-from-env"
    assert read_api_key(args(api_key="sk-argv")) == "sk-argv"
    assert "ps" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_api_key(args(api_key_file=tmp_path / "empty"))
    with pytest.raises(ValueError, match="No such file"):
        read_api_key(args(api_key_file=tmp_path / "missing"))
