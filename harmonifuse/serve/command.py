"""``harmonifuse serve``'s options and command (FastAPI and uvicorn load only when it runs)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

API_KEY_ENV = "HARMONIFUSE_API_KEY"


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _not_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="trained model folder (default: $HARMONIFUSE_MODEL, else the shipped model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; another address needs --api-key or --insecure)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key",
                   help=f"require `Authorization: Bearer KEY` on all but /health (default: ${API_KEY_ENV})")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--max-batch", type=_positive(int), default=8,
                   help="requests answered together in one batch (default 8)")
    p.add_argument("--max-queue", type=_positive(int), default=64,
                   help="requests that may wait; more are answered 503 with Retry-After (default 64)")
    p.add_argument("--max-upload-mb", type=_positive(float), default=25.0,
                   help="largest upload in MB of 2^20 bytes, refused with 413 while it streams in (default 25)")
    p.add_argument("--max-seconds", type=_not_negative, default=900.0,
                   help="longest recording in seconds, refused with 400 (default 900; 0: no limit; recordings over "
                        "the encoder's 30 s are cut at pauses)")
    p.add_argument("--timeout", type=_positive(float), default=300.0,
                   help="seconds from the end of an upload to its answer, else 504 (default 300)")
    p.add_argument("--threads", type=_positive(int), help="torch threads for inference (default: torch's)")
    p.add_argument("--bf16", action="store_true", help="run the LLM in bf16 (faster on CPUs with bf16 units)")
    p.add_argument("--device", default="auto",
                   help="auto (default: the GPU when CUDA is available, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def model_name(model_dir: str) -> str:
    path = Path(model_dir)
    return path.stem if path.is_file() else path.resolve().name


def serve(args: argparse.Namespace) -> int:
    from harmonifuse.pretrained import resolve_model
    from harmonifuse.serve.server import BindRefused, check_bind

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        check_bind(args.host, args.port, api_key, args.insecure)
    except BindRefused as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model_dir = resolve_model(args.model)
    if not Path(model_dir).exists():
        raise FileNotFoundError(f"no model folder or config file at {model_dir}")
    from harmonifuse.training.hardware import choose_device, env_local_rank

    device = str(choose_device(args.device, env_local_rank()))  # an unusable one fails now, not in the loader

    from harmonifuse.serve.app import ServeSettings, create_app
    from harmonifuse.serve.server import run

    logging.getLogger("harmonifuse.serve").setLevel(args.log_level.upper())
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = ServeSettings(model_id=model_name(model_dir), api_key=api_key, max_batch=args.max_batch,
                             max_queue=args.max_queue, max_upload_mb=args.max_upload_mb,
                             max_seconds=args.max_seconds or None, timeout=args.timeout, threads=args.threads)

    def loader():
        from harmonifuse.cli import load_model

        model = load_model(model_dir, bf16=args.bf16, device=device)
        model.eval()
        return model

    print(f"serving {settings.model_id} on http://{args.host}:{args.port}/ (loading the model; "
          f"GET /health/ready says when it is ready)", file=sys.stderr, flush=True)
    return run(create_app(loader=loader, settings=settings), host=args.host, port=args.port, log_level=args.log_level)
