"""The service as its own process (tiny model): SIGTERM drains the requests in flight and exits 0;
an upload of 10x the limit is refused with 413 without the server's memory growing by the limit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serve_tiny import free_socket, multipart_chunks, wav_bytes

pytestmark = pytest.mark.multiprocess

psutil = pytest.importorskip("psutil")
SCRIPT = Path(__file__).resolve().parent / "serve_tiny.py"


def start(*args: str) -> tuple[subprocess.Popen, str]:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--port", str(port), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(base + "/health/ready", timeout=2).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError("the server did not get ready")


def analyze(base: str, seed: int = 0, **kwargs) -> httpx.Response:
    return httpx.post(base + "/v1/audio/analyze", files={"file": ("clip.wav", wav_bytes(seed=seed))}, timeout=120,
                      **kwargs)


def test_sigterm_answers_the_requests_in_flight_refuses_later_ones_and_exits_0():
    process, base = start("--delay", "1.0", "--max-batch", "2")
    try:
        with ThreadPoolExecutor(6) as pool:
            in_flight = [pool.submit(analyze, base, i) for i in range(6)]
            deadline = time.monotonic() + 30
            while True:  # all six accepted: one or two answering, the rest waiting
                ready = httpx.get(base + "/health/ready").json()
                if ready["waiting"] + ready["running"] == 6:
                    break
                assert time.monotonic() < deadline, ready
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # the listening socket is closed
                analyze(base)
            answers = [f.result(timeout=60) for f in in_flight]
        assert [a.status_code for a in answers] == [200] * 6
        # Every job queued behind the first batch goes in a full batch of 2 (the last one may be left
        # alone). The first batch may start with one job when the second upload arrives late under
        # load: batches 1, 2, 2, 1 give four answers from a batch of 2, and 2, 2, 2 give six.
        sizes = [a.json()["timings"]["batch_size"] for a in answers]
        assert max(sizes) == 2 and sizes.count(2) >= 4, sizes
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read()
    assert "Traceback" not in output, output


def test_an_upload_of_ten_times_the_limit_is_413_and_never_held_in_memory():
    limit_mb = 8
    process, base = start("--max-upload-mb", str(limit_mb))
    server = psutil.Process(process.pid)
    headers = {"Content-Type": "multipart/form-data; boundary=----harmonifuse"}
    try:
        assert analyze(base).status_code == 200  # warm: imports, first inference, first refusal
        body = multipart_chunks(2 * limit_mb * 2**20, fill=b"\x01")
        assert httpx.post(base + "/v1/audio/analyze", content=body, headers=headers, timeout=120).status_code == 413
        before = server.memory_info().rss
        peak, stop = [before], threading.Event()

        def sample():
            while not stop.is_set():
                peak.append(server.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            huge = multipart_chunks(10 * limit_mb * 2**20, fill=b"\x01")
            streamed = httpx.post(base + "/v1/audio/analyze", content=huge,
                                  headers=headers, timeout=120)  # no Content-Length: counted as it arrives
            announced = httpx.post(base + "/v1/audio/analyze", timeout=120,
                                   files={"file": ("big.wav", os.urandom(10 * limit_mb * 2**20))})
        finally:
            stop.set()
            sampler.join()
        assert streamed.status_code == 413 and announced.status_code == 413
        assert streamed.json()["error"]["code"] == "file_too_large"
        growth = max(peak) - before
        assert growth < limit_mb * 2**20, f"resident memory grew by {growth / 2**20:.1f} MB"
        assert analyze(base).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
