"""Helpers for the service tests: a server in a thread, a gated model, WAV bytes; and, run as a
script, a tiny-model server in its own process (for SIGTERM and memory tests):

    python tests/serve_tiny.py --port 8123 [--delay 0.5] [--max-upload-mb 4] [--max-batch 2]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))


def wav_bytes(seconds: float = 1.0, rate: int = 16000, seed: int = 0) -> bytes:
    """A tone with a little noise, as 16-bit WAV bytes."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * (180 + 40 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    buffer = io.BytesIO()
    sf.write(buffer, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


class GatedModel:
    """A model whose ``analyze`` waits while ``gate`` is closed (and sleeps ``delay``), recording batch sizes."""

    def __init__(self, model, delay: float = 0.0, open: bool = True) -> None:
        self.model, self.delay = model, delay
        self.gate = threading.Event()
        if open:
            self.gate.set()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def analyze(self, audio, **options):
        self.batches.append(len(audio))
        self.entered.set()
        self.gate.wait(60)
        if self.delay:
            time.sleep(self.delay)
        return self.model.analyze(audio, **options)


def write_header_bomb(path, rate: int = 655_350, channels: int = 8, seconds: float = 29.0) -> Path:
    """A real FLAC (or WAV, by the suffix) whose header declares ``rate`` Hz x ``channels`` x ``seconds`` of silence: a few
    hundred KB on disk (FLAC stores a constant block in a few bytes) that would decode to gigabytes."""
    path = Path(path)
    block = np.zeros((rate, channels), dtype=np.int16)
    with sf.SoundFile(path, "w", samplerate=rate, channels=channels, subtype="PCM_16") as out:  # format: the suffix
        whole, rest = divmod(seconds, 1.0)
        for _ in range(int(whole)):
            out.write(block)
        out.write(block[:int(rest * rate)])
    return path


def multipart_body(content: bytes, name: str = "clip.wav", boundary: str = "rawboundary",
                   fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body with ``content`` as the ``file`` field: (body, content type)."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
             for key, value in (fields or {}).items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
                 + content + f"\r\n--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def multipart_chunks(total: int, size: int = 256 * 1024, fill: bytes = b"\x00"):
    """A multipart/form-data body with one ``file`` field of ``total`` bytes, yielded in chunks
    (httpx streams it without a Content-Length)."""
    boundary = b"----harmonifuse"
    yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'
    for _ in range(total // size):
        yield fill * size
    yield b"\r\n--" + boundary + b"--\r\n"


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@contextlib.contextmanager
def running(app):
    """``app`` served by uvicorn (with the service's own server class) in a thread; yields its URL."""
    from harmonifuse.serve.server import server_for

    sock = free_socket()
    port = sock.getsockname()[1]
    server = app.state.server = server_for(app, port=port, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def main() -> int:
    from tiny import tiny_harmonifuse

    from harmonifuse.serve.app import ServeSettings, create_app
    from harmonifuse.serve.server import run

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.0, help="seconds each batch sleeps before it is answered")
    p.add_argument("--max-upload-mb", type=float, default=25.0)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    settings = ServeSettings(model_id="tiny", max_batch=args.max_batch, max_queue=args.max_queue,
                             max_upload_mb=args.max_upload_mb, timeout=args.timeout)
    app = create_app(loader=lambda: GatedModel(tiny_harmonifuse(seed=0), delay=args.delay), settings=settings)
    return run(app, port=args.port, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
