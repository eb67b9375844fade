"""`harmonifuse serve` under attack: ordinary clients' latency beside hostile connections and audio bombs.

    python benchmarks/bench_hostile.py                      # the shipped model (about 10-20 min on 2 cores)
    python benchmarks/bench_hostile.py --tiny --rounds 2    # the tiny test model: the server's own overhead

The benchmark starts the server itself on a free loopback port (the CLI with the shipped model,
or ``tests/serve_tiny.py`` with ``--tiny``), with its default limits, and runs ``--rounds`` pairs
of rounds side by side, alternating:

- quiet: ``--clients`` ordinary clients send test-split clips of the built-in corpus to
  ``POST /v1/audio/analyze``, one after another, ``--requests`` each;
- hostile: the same, while ``--hostile`` connections attack for the whole round (in turn: idle,
  headers at one byte a second, a body at three bytes a second, a Content-Length that promises
  more than is sent; each reconnects when the server drops it) and ``--bombs`` clients keep
  uploading audio bombs (real FLAC files declaring 655,350 Hz x 8 channels, 29 s and 120 s long).

It reports the ordinary clients' p50/p95 latency in each kind of round and their ratio (goal:
p95 hostile <= 1.5 x quiet), the server's peak resident memory in each (bound: hostile <= quiet +
``--memory-margin-mb``), how the attacks were answered, whether the server stayed up and whether it
answers afterwards. Prints a table and writes every figure to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_serve import Server, clips  # noqa: E402
from serve_tiny import multipart_body, write_header_bomb  # noqa: E402


class MemoryWatch:
    """The server's peak resident memory while it runs, sampled every 50 ms."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak, self.stop = server, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, self.server.rss())
            except psutil.Error:
                return
            time.sleep(0.05)

    def done(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def ordinary(url: str, work: list, clients: int) -> list[dict]:
    """``clients`` threads, each sending its share of ``work`` one after another."""
    results: list[dict] = []
    lock = threading.Lock()

    def run(share: list) -> None:
        with httpx.Client(timeout=600) as client:
            for name, data, _ in share:
                began = time.monotonic()
                try:
                    status = client.post(url + "/v1/audio/analyze", files={"file": (name, data, "audio/wav")}).status_code
                except httpx.HTTPError as error:
                    status = type(error).__name__
                with lock:
                    results.append({"status": status, "latency": time.monotonic() - began})

    threads = [threading.Thread(target=run, args=(work[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


ATTACKS = ("idle", "slow-headers", "slow-body", "overstated-length")


def attacker(url: str, kind: str, stop: threading.Event, outcomes: Counter, lock: threading.Lock) -> None:
    """One hostile connection of ``kind``, reopened whenever the server drops it, until ``stop``."""
    host, port = url.removeprefix("http://").split(":")
    body, content_type = multipart_body(b"RIFF" + b"\0" * 4000)
    head = (f"POST /v1/audio/analyze HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) + (10_000 if kind == 'overstated-length' else 0)}\r\n\r\n").encode()
    while not stop.is_set():
        try:
            with socket.create_connection((host, int(port)), timeout=120) as sock:
                try:
                    if kind == "slow-headers":
                        for byte in head:
                            if stop.is_set():
                                break
                            sock.sendall(bytes([byte]))
                            time.sleep(1.0)
                    elif kind == "slow-body":
                        sock.sendall(head)
                        for start in range(0, len(body), 3):
                            if stop.is_set():
                                break
                            sock.sendall(body[start:start + 3])
                            time.sleep(1.0)
                    elif kind == "overstated-length":
                        sock.sendall(head + body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server answered and closed while we were still sending: read what it said
                reply = b""
                sock.settimeout(1.0)
                while not stop.is_set():  # wait for the server's answer (or its close)
                    try:
                        chunk = sock.recv(4096)
                    except socket.timeout:
                        continue
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    reply += chunk
                status = reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/") else "closed"
        except (OSError, IndexError) as error:
            status = type(error).__name__
        if not stop.is_set():
            with lock:
                outcomes[f"{kind}: {status}"] += 1


def bomber(url: str, files: list[Path], stop: threading.Event, outcomes: Counter, lock: threading.Lock,
           index: int) -> None:
    path = files[index % len(files)]
    data = path.read_bytes()
    with httpx.Client(timeout=600) as client:
        while not stop.is_set():
            try:
                response = client.post(url + "/v1/audio/analyze", files={"file": (path.name, data, "audio/flac")})
                status = f"{response.status_code} {response.json()['error']['code']}" \
                    if response.status_code != 200 else "200"
            except (httpx.HTTPError, ValueError, KeyError) as error:
                status = type(error).__name__
            with lock:
                outcomes[f"bomb {path.name}: {status}"] += 1
            time.sleep(0.2)


def round_(server: Server, work: list, clients: int, hostile: int, bombs: int, files: list[Path]) -> dict:
    stop, lock, outcomes = threading.Event(), threading.Lock(), Counter()
    threads = [threading.Thread(target=attacker, args=(server.url, ATTACKS[i % len(ATTACKS)], stop, outcomes, lock),
                                daemon=True) for i in range(hostile)]
    threads += [threading.Thread(target=bomber, args=(server.url, files, stop, outcomes, lock, i), daemon=True)
                for i in range(bombs)]
    watch = MemoryWatch(server)
    for t in threads:
        t.start()
    if threads:
        time.sleep(2.0)  # the attack is under way before the ordinary clients arrive
    began = time.monotonic()
    results = ordinary(server.url, work, clients)
    seconds = time.monotonic() - began
    stop.set()
    peak = watch.done()
    for t in threads:
        t.join(10)
    return {"results": results, "seconds": seconds, "peak_rss": peak, "outcomes": dict(outcomes)}


def p(latencies: list[float], q: float) -> float:
    return statistics.quantiles(latencies, n=100, method="inclusive")[q - 1] if len(latencies) > 1 else latencies[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="serve the tiny test model (the server's own overhead)")
    parser.add_argument("--clients", type=int, default=8, help="ordinary clients (default 8)")
    parser.add_argument("--requests", type=int, default=4, help="requests per ordinary client per round (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of quiet and hostile rounds (default 2)")
    parser.add_argument("--hostile", type=int, default=20, help="hostile connections (default 20)")
    parser.add_argument("--bombs", type=int, default=5, help="clients uploading audio bombs (default 5)")
    parser.add_argument("--memory-margin-mb", type=float, default=300.0,
                        help="bound: hostile peak memory <= quiet peak + this (default 300)")
    parser.add_argument("--threads", type=int, help="torch threads of the server")
    parser.add_argument("--out", default=str(ROOT / "results" / "serve" / "bench_hostile.json"))
    args = parser.parse_args()

    work = clips(args.clients * args.requests)
    folder = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    files = [write_header_bomb(folder / "bomb-29s.flac", 655_350, 8, 29.0),
             write_header_bomb(folder / "bomb-120s.flac", 655_350, 8, 120.0)]
    print(f"bombs: {', '.join(f'{f.name} {f.stat().st_size / 1024:.0f} KB' for f in files)}", file=sys.stderr)
    if args.tiny:
        server = Server([], command=[sys.executable, str(ROOT / "tests" / "serve_tiny.py")], name="hostile-tiny")
    else:
        server = Server(["--log-level", "warning"] + (["--threads", str(args.threads)] if args.threads else []),
                        name="hostile")
    print(f"server ready on {server.url} (resident {server.rss() / 2**20:.0f} MB)", file=sys.stderr)
    ordinary(server.url, work[:args.clients], args.clients)  # warm-up, untimed
    rounds = {"quiet": [], "hostile": []}
    for r in range(args.rounds):
        for kind in ("quiet", "hostile"):
            print(f"round {r + 1}/{args.rounds}: {kind}", file=sys.stderr, flush=True)
            hostile, bombs = (args.hostile, args.bombs) if kind == "hostile" else (0, 0)
            rounds[kind].append(round_(server, work, args.clients, hostile, bombs, files))
    alive = server.process.poll() is None
    after = {"ready": None, "analyze": None}
    if alive:
        after["ready"] = httpx.get(server.url + "/health/ready", timeout=30).status_code
        name, data, _ = work[0]
        after["analyze"] = httpx.post(server.url + "/v1/audio/analyze", files={"file": (name, data)},
                                      timeout=600).status_code
    exit_code = server.stop() if alive else server.process.returncode
    shutil.rmtree(folder, ignore_errors=True)

    summary = {}
    for kind, runs in rounds.items():
        latencies = [x["latency"] for run in runs for x in run["results"] if x["status"] == 200]
        failed = sum(1 for run in runs for x in run["results"] if x["status"] != 200)
        outcomes = Counter()
        for run in runs:
            outcomes.update(run["outcomes"])
        summary[kind] = {"requests": sum(len(run["results"]) for run in runs), "failed": failed,
                         "p50_s": round(p(latencies, 50), 3), "p95_s": round(p(latencies, 95), 3),
                         "p95_per_round_s": [round(p([x["latency"] for x in run["results"] if x["status"] == 200], 95), 3)
                                             for run in runs],
                         "peak_rss_mb": round(max(run["peak_rss"] for run in runs) / 2**20),
                         "attacks_answered": dict(sorted(outcomes.items()))}
    ratio = summary["hostile"]["p95_s"] / summary["quiet"]["p95_s"]
    memory_ok = summary["hostile"]["peak_rss_mb"] <= summary["quiet"]["peak_rss_mb"] + args.memory_margin_mb
    report = {"model": "tiny" if args.tiny else "shipped", "clients": args.clients, "requests": args.requests,
              "rounds": args.rounds, "hostile": args.hostile, "bombs": args.bombs, **summary,
              "p95_ratio": round(ratio, 3), "memory_bound_mb": args.memory_margin_mb, "memory_ok": memory_ok,
              "server_alive": alive, "after": after, "exit_code": exit_code}
    print(f"\n{'':24}{'quiet':>12}{'hostile':>12}")
    for key in ("requests", "failed", "p50_s", "p95_s", "peak_rss_mb"):
        print(f"{key:24}{summary['quiet'][key]:>12}{summary['hostile'][key]:>12}")
    print(f"p95 per round (s): quiet {summary['quiet']['p95_per_round_s']}, hostile {summary['hostile']['p95_per_round_s']}")
    print(f"\np95 hostile / quiet: {ratio:.2f}x (goal <= 1.5x)")
    print(f"peak memory: {summary['hostile']['peak_rss_mb']} MB under attack vs {summary['quiet']['peak_rss_mb']} MB "
          f"quiet (bound: + {args.memory_margin_mb:g} MB): {'within' if memory_ok else 'OVER'}")
    print(f"server alive: {alive}; afterwards /health/ready {after['ready']}, analyze {after['analyze']}; "
          f"SIGTERM exit {exit_code}")
    print("attacks answered:")
    for key, count in summary["hostile"]["attacks_answered"].items():
        print(f"  {count:5d}  {key}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    ok = ratio <= 1.5 and memory_ok and alive and after == {"ready": 200, "analyze": 200} and not (
        summary["quiet"]["failed"] or summary["hostile"]["failed"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
