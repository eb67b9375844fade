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
                   help=f"require `Authorization: Bearer KEY` on all but /health (default: ${API_KEY_ENV}); "
                        "any process list shows it, so prefer the variable or --api-key-file")
    p.add_argument("--api-key-file", type=Path, help="read the API key from this file (its first line)")
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
    limits = p.add_argument_group("limits against hostile or broken clients (see docs/serve.md)")
    limits.add_argument("--max-sample-rate", type=_positive(int), default=192_000,
                        help="highest sample rate a file's header may declare, refused with 400 before decoding "
                             "(default 192000)")
    limits.add_argument("--max-channels", type=_positive(int), default=8,
                        help="most channels a file's header may declare (default 8)")
    limits.add_argument("--max-decoded-mb", type=_not_negative, default=350.0,
                        help="largest decoded size, frames x channels x 4 bytes, a file's header may declare "
                             "(default 350: 15 min of 48 kHz stereo fits; 0: no limit)")
    limits.add_argument("--decode-concurrency", type=_positive(int), default=2,
                        help="uploads decoded at once (default 2)")
    limits.add_argument("--header-timeout", type=_positive(float), default=10.0,
                        help="seconds for a request's line and headers to arrive, else 408 (default 10)")
    limits.add_argument("--idle-timeout", type=_positive(float), default=15.0,
                        help="seconds a body may stall between two pieces, else 408 (default 15)")
    limits.add_argument("--upload-timeout", type=_positive(float), default=120.0,
                        help="seconds for a whole body to arrive, else 408 (default 120)")
    limits.add_argument("--keep-alive", type=_positive(float), default=5.0,
                        help="seconds an idle kept-alive connection stays open (default 5)")
    limits.add_argument("--max-connections", type=_positive(int), default=128,
                        help="open connections; more are answered 503 and closed (default 128)")
    limits.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="without an API key, a Host (name or name:port) accepted besides this server's "
                             "address, e.g. a proxy's public name; repeat for more ('*': any)")
    limits.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                        help="without an API key, a page origin (https://name) allowed to call the API; "
                             "repeat for more")
    limits.add_argument("--io-nice", type=int, choices=range(0, 20), default=10, metavar="N",
                        help="run the network and decoding threads N nice levels below inference, so a flood "
                             "of connections takes CPU from them, not from the answers (default 10; 0: off)")
    p.add_argument("--threads", type=_positive(int), help="torch threads for inference (default: torch's)")
    p.add_argument("--bf16", action="store_true", help="run the LLM in bf16 (faster on CPUs with bf16 units)")
    p.add_argument("--device", default="auto",
                   help="auto (default: the GPU when CUDA is available, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def read_api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, --api-key or $HARMONIFUSE_API_KEY (in that order), or None."""
    if args.api_key_file is not None:
        try:
            text = args.api_key_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--api-key-file {args.api_key_file}: cannot be read as UTF-8 text ({error})") from None
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file}: the file is empty; write the key on its first line")
        return key
    if args.api_key:
        print("warning: --api-key shows the key to anyone who can list processes (ps); prefer "
              f"${API_KEY_ENV} or --api-key-file", file=sys.stderr)
        return args.api_key
    return os.environ.get(API_KEY_ENV) or None


def model_name(model_dir: str) -> str:
    path = Path(model_dir)
    return path.stem if path.is_file() else path.resolve().name


def serve(args: argparse.Namespace) -> int:
    from harmonifuse.pretrained import resolve_model
    from harmonifuse.serve.server import BindRefused, check_bind

    try:
        api_key = read_api_key(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        check_bind(args.host, args.port, api_key, args.insecure)
    except BindRefused as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model_dir = resolve_model(args.model)
    if not Path(model_dir).exists():
        raise FileNotFoundError(f"no model folder or config file at {model_dir}")
    from harmonifuse.device import choose_device, env_local_rank

    device = str(choose_device(args.device, env_local_rank()))  # an unusable one fails now, not in the loader

    from harmonifuse.serve.app import ServeSettings, create_app
    from harmonifuse.serve.server import run

    logging.getLogger("harmonifuse.serve").setLevel(args.log_level.upper())
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = ServeSettings(model_id=model_name(model_dir), api_key=api_key, max_batch=args.max_batch,
                             max_queue=args.max_queue, max_upload_mb=args.max_upload_mb,
                             max_seconds=args.max_seconds or None, timeout=args.timeout, threads=args.threads,
                             max_sample_rate=args.max_sample_rate, max_channels=args.max_channels,
                             max_decoded_mb=args.max_decoded_mb or None, decode_concurrency=args.decode_concurrency,
                             header_timeout=args.header_timeout, idle_timeout=args.idle_timeout,
                             upload_timeout=args.upload_timeout, keep_alive=args.keep_alive,
                             max_connections=args.max_connections, allowed_hosts=tuple(args.allowed_host),
                             allowed_origins=tuple(args.allowed_origin), io_nice=args.io_nice)

    def loader():
        from harmonifuse.inference.loading import load_model

        model = load_model(model_dir, bf16=args.bf16, device=device)
        model.eval()
        return model

    print(f"serving {settings.model_id} on http://{args.host}:{args.port}/ (loading the model; "
          f"GET /health/ready says when it is ready)", file=sys.stderr, flush=True)
    return run(create_app(loader=loader, settings=settings), host=args.host, port=args.port, log_level=args.log_level)
