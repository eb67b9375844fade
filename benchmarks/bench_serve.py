"""`harmonifuse serve` under load, overload and a soak, with the shipped model on 127.0.0.1.

    python benchmarks/bench_serve.py                       # the full run (about 25-40 min on 2 cores)
    python benchmarks/bench_serve.py --requests 64 --soak 200 --compare-requests 24   # a quick one

The benchmark starts the server itself (``python -m harmonifuse.cli serve`` on a free loopback
port), sends test-split clips of the built-in corpus (data/synthetic/asr_test.jsonl and
ser_test.jsonl, interleaved) to ``POST /v1/audio/analyze`` and stops it with SIGTERM:

1. load: ``--clients`` concurrent clients, ``--requests`` requests: failures, p50/p95/p99 latency,
   requests per second, audio seconds per second, mean batch size;
2. overload: ``--overload-factor`` x ``--max-queue`` requests at once: every one must be answered
   200, or 503 with Retry-After, within the client timeout, and the server must answer afterwards;
3. soak: ``--soak`` requests from ``--soak-clients`` clients: resident memory of the server at the
   end against after the first 100;
4. batching: ``--compare-clients`` clients, ``--compare-requests`` requests against this server
   (dynamic batching up to ``--max-batch``) and against a second one started with ``--max-batch 1``,
   in ``--compare-rounds`` alternating rounds: the throughput ratio, measured in one run.

Prints a table and writes every figure to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "synthetic"


def clips(limit: int | None = None) -> list[tuple[str, bytes, float]]:
    """(name, WAV bytes, duration) of the test split, ASR and SER clips interleaved."""
    rows = []
    for task in ("asr", "ser"):
        manifest = CORPUS / f"{task}_test.jsonl"
        if not manifest.is_file():
            raise SystemExit(f"error: {manifest} is missing; build the corpus with "
                             "`harmonifuse prepare synthetic data/synthetic` (or `make demo`)")
        rows.append([json.loads(line) for line in manifest.read_text().splitlines() if line.strip()])
    mixed = [row for pair in zip(*rows) for row in pair] + rows[0][len(rows[1]):] + rows[1][len(rows[0]):]
    return [(Path(r["audio"]).name, (CORPUS / r["audio"]).read_bytes(), float(r["duration"])) for r in mixed[:limit]]


class Server:
    """A server started in its own process on a free loopback port, waited for until ready.

    ``options``: ``harmonifuse serve``'s options; ``command``: another command instead (its port given
    as ``--port``)."""

    def __init__(self, options: list[str], command: list[str] | None = None, name: str = "serve") -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = (command or [sys.executable, "-m", "harmonifuse.cli", "serve"]) + ["--port", str(self.port), *options]
        began = time.monotonic()
        self.log = tempfile.NamedTemporaryFile("w", prefix=f"bench-{name}-", suffix=".log",
                                               delete=False)  # the server's output, named if it fails
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - began > 600:
                self.process.kill()
                raise SystemExit("the server did not get ready in 600 s")
            time.sleep(0.2)
        self.load_seconds = time.monotonic() - began

    @classmethod
    def shipped(cls, max_batch: int, max_queue: int, threads: int | None, bf16: bool, timeout: float) -> "Server":
        options = ["--max-batch", str(max_batch), "--max-queue", str(max_queue), "--timeout", str(timeout),
                   "--log-level", "warning"] + (["--threads", str(threads)] if threads else []) + (["--bf16"] if bf16
                                                                                                   else [])
        return cls(options, name=f"serve-batch{max_batch}")

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=600)
        self.log.close()
        return code


def send(client: httpx.Client, url: str, clip: tuple[str, bytes, float]) -> dict:
    name, data, duration = clip
    began = time.monotonic()
    try:
        response = client.post(url + "/v1/audio/analyze", files={"file": (name, data, "audio/wav")})
    except httpx.HTTPError as error:
        return {"status": None, "error": type(error).__name__, "latency": time.monotonic() - began,
                "duration": duration}
    out = {"status": response.status_code, "latency": time.monotonic() - began, "duration": duration,
           "retry_after": response.headers.get("retry-after")}
    if response.status_code == 200:
        out["batch_size"] = response.json()["timings"]["batch_size"]
    return out


def load(url: str, work: list, clients: int, timeout: float, progress: str = "", on_done=None) -> tuple[list, float]:
    """``work`` sent by ``clients`` threads (each with its own keep-alive connection)."""
    results: list = [None] * len(work)
    lock = threading.Lock()
    state = {"next": 0, "done": 0}

    def run() -> None:
        with httpx.Client(timeout=timeout) as client:
            while True:
                with lock:
                    i = state["next"]
                    state["next"] += 1
                if i >= len(work):
                    return
                results[i] = send(client, url, work[i])
                with lock:
                    state["done"] += 1
                    done = state["done"]
                if on_done:
                    on_done(done)
                if progress and done % 25 == 0:
                    print(f"  {progress}: {done}/{len(work)}", file=sys.stderr, flush=True)

    began = time.monotonic()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.monotonic() - began


def summary(results: list, wall: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    latencies = sorted(r["latency"] for r in ok)

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None

    return {"requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
            "p50_s": pct(0.50), "p95_s": pct(0.95), "p99_s": pct(0.99), "wall_s": round(wall, 2),
            "requests_per_s": round(len(ok) / wall, 3),
            "audio_s_per_s": round(sum(r["duration"] for r in ok) / wall, 3),
            "mean_batch": round(statistics.mean(r["batch_size"] for r in ok), 2) if ok else None}


def overload(url: str, work: list, timeout: float) -> dict:
    """All of ``work`` at once, each on its own connection."""
    barrier = threading.Barrier(len(work))
    results: list = [None] * len(work)

    def one(i: int) -> None:
        with httpx.Client(timeout=timeout) as client:
            barrier.wait()
            results[i] = send(client, url, work[i])

    began = time.monotonic()
    with ThreadPoolExecutor(len(work)) as pool:
        list(pool.map(one, range(len(work))))
    wall = time.monotonic() - began
    statuses = [r["status"] for r in results]
    refused = [r for r in results if r["status"] == 503]
    after = send(httpx.Client(timeout=timeout), url, work[0])
    return {"sent": len(work), "ok": statuses.count(200), "refused_503": len(refused),
            "refused_with_retry_after": sum(1 for r in refused if r["retry_after"]),
            "other": sum(1 for s in statuses if s not in (200, 503)),
            "slowest_s": round(max(r["latency"] for r in results), 2), "wall_s": round(wall, 2),
            "max_503_latency_s": round(max((r["latency"] for r in refused), default=0.0), 3),
            "answered_after": after["status"]}


def machine() -> dict:
    load1, load5, _ = os.getloadavg()
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "load_average_1m_5m": [round(load1, 2), round(load5, 2)]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=256, help="load phase: requests (default 256)")
    p.add_argument("--clients", type=int, default=32, help="load phase: concurrent clients (default 32)")
    p.add_argument("--compare-requests", type=int, default=64,
                   help="batching vs --max-batch 1: requests per server (default 64)")
    p.add_argument("--compare-clients", type=int, default=8, help="default 8")
    p.add_argument("--compare-rounds", type=int, default=2,
                   help="alternating rounds of the batching comparison (default 2)")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default 8)")
    p.add_argument("--max-queue", type=int, default=32, help="the server's --max-queue (default 32)")
    p.add_argument("--overload-factor", type=int, default=4, help="overload: this many times the queue (default 4)")
    p.add_argument("--soak", type=int, default=1000, help="soak: requests (default 1000)")
    p.add_argument("--soak-clients", type=int, default=8, help="default 8")
    p.add_argument("--threads", type=int, help="the server's --threads (default: torch's)")
    p.add_argument("--bf16", action="store_true", help="the server's --bf16")
    p.add_argument("--client-timeout", type=float, default=900.0, help="seconds a client waits (a hang past it fails)")
    p.add_argument("--out", default=str(ROOT / "results" / "serve" / "bench.json"))
    args = p.parse_args()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pool = clips()
    work = lambda n, start=0: [pool[(start + i) % len(pool)] for i in range(n)]  # noqa: E731
    report: dict = {"args": vars(args), "machine_before": machine(), "clips_in_pool": len(pool)}
    began = time.monotonic()

    print(f"starting the server (--max-batch {args.max_batch}, --max-queue {args.max_queue})", file=sys.stderr)
    server = Server.shipped(args.max_batch, args.max_queue, args.threads, args.bf16, args.client_timeout)
    report["load_seconds"] = round(server.load_seconds, 1)
    load(server.url, work(4), 4, args.client_timeout)  # warm-up

    results, wall = load(server.url, work(args.requests), args.clients, args.client_timeout, "load")
    report["load"] = {"clients": args.clients, **summary(results, wall)}
    print(json.dumps(report["load"]), file=sys.stderr)

    report["overload"] = {"max_queue": args.max_queue,
                          **overload(server.url, work(args.overload_factor * args.max_queue, 7), args.client_timeout)}
    print(json.dumps(report["overload"]), file=sys.stderr)

    rss: dict[int, int] = {}

    def sample(done: int) -> None:
        if done == 100 or done % 100 == 0 or done == args.soak:
            rss[done] = server.rss()

    results, wall = load(server.url, work(args.soak, 11), args.soak_clients, args.client_timeout, "soak", sample)
    rss[args.soak] = server.rss()
    first = rss.get(100, rss[min(rss)])
    report["soak"] = {"clients": args.soak_clients, **summary(results, wall),
                      "rss_after_100_mb": round(first / 2**20, 1), "rss_end_mb": round(rss[args.soak] / 2**20, 1),
                      "rss_growth_pct": round(100 * (rss[args.soak] - first) / first, 2),
                      "rss_every_100_mb": {k: round(v / 2**20, 1) for k, v in sorted(rss.items())}}
    print(json.dumps(report["soak"]), file=sys.stderr)

    # batching against --max-batch 1: a second server, both loaded, sent the same requests in
    # alternating rounds, so a change in the machine's other load falls on both alike
    print("starting a second server with --max-batch 1", file=sys.stderr)
    single = Server.shipped(1, args.max_queue, args.threads, args.bf16, args.client_timeout)
    report["load_seconds_unbatched"] = round(single.load_seconds, 1)
    load(single.url, work(2), 2, args.client_timeout)
    runs: dict[str, list] = {"batched": [], "unbatched": []}
    walls = {"batched": 0.0, "unbatched": 0.0}
    per_round = max(1, args.compare_requests // args.compare_rounds)
    for r in range(args.compare_rounds):
        for label, target in (("batched", server), ("unbatched", single)):
            results, wall = load(target.url, work(per_round, 23 + r * per_round), args.compare_clients,
                                 args.client_timeout)
            runs[label] += results
            walls[label] += wall
            print(f"  round {r + 1}/{args.compare_rounds} {label}: {per_round / wall:.3f} requests/s", file=sys.stderr)
    report["batched"] = {"clients": args.compare_clients, "max_batch": args.max_batch,
                         **summary(runs["batched"], walls["batched"])}
    report["unbatched"] = {"clients": args.compare_clients, "max_batch": 1, **summary(runs["unbatched"],
                                                                                     walls["unbatched"])}
    report["batching_ratio"] = round(report["batched"]["requests_per_s"] / report["unbatched"]["requests_per_s"], 2)
    print(json.dumps({k: report[k] for k in ("batched", "unbatched", "batching_ratio")}), file=sys.stderr)
    report["exit_status"] = server.stop()
    report["exit_status_unbatched"] = single.stop()
    report["machine_after"] = machine()
    report["total_minutes"] = round((time.monotonic() - began) / 60, 1)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    L, B, U, V, S = (report[k] for k in ("load", "batched", "unbatched", "overload", "soak"))
    print("\n| what | measured |\n|---|---|")
    print(f"| load: {L['clients']} clients x {L['requests']} requests | {L['failed']} failed; "
          f"latency p50 {L['p50_s']} s, p95 {L['p95_s']} s, p99 {L['p99_s']} s; {L['requests_per_s']} requests/s; "
          f"{L['audio_s_per_s']} audio s/s; mean batch {L['mean_batch']} |")
    print(f"| dynamic batching (--max-batch {B['max_batch']}) vs --max-batch 1, {B['clients']} clients x "
          f"{B['requests']} requests | {B['requests_per_s']} vs {U['requests_per_s']} requests/s = "
          f"**{report['batching_ratio']}x** (mean batch {B['mean_batch']}) |")
    print(f"| overload: {V['sent']} requests at once ({args.overload_factor} x --max-queue {V['max_queue']}) | "
          f"{V['ok']} x 200, "
          f"{V['refused_503']} x 503 ({V['refused_with_retry_after']} with Retry-After), {V['other']} other; "
          f"slowest answer {V['slowest_s']} s; answered afterwards: {V['answered_after']} |")
    print(f"| soak: {S['requests']} requests, {S['clients']} clients | {S['failed']} failed; resident memory "
          f"{S['rss_after_100_mb']} MB after 100, {S['rss_end_mb']} MB at the end ({S['rss_growth_pct']:+.1f} %) |")
    print(f"| SIGTERM | exit status {report['exit_status']} (and {report['exit_status_unbatched']}) |")
    print(f"\nmodel load {report['load_seconds']} s; total {report['total_minutes']} min; machine load average "
          f"{report['machine_before']['load_average_1m_5m']} before, {report['machine_after']['load_average_1m_5m']} "
          f"after; figures in {args.out}")
    ok = (L["failed"] == 0 and V["other"] == 0 and V["refused_503"] == V["refused_with_retry_after"]
          and V["answered_after"] == 200 and report["exit_status"] == 0 and S["failed"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
