"""Command line: ``harmonifuse analyze | prepare | train | evaluate | experiment``.

Each subcommand is a small function registered in ``COMMANDS``; heavy imports happen inside them
so ``harmonifuse --help`` stays instant.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from .config import ConfigError
from .training.config import SYNTHETIC_SIZES, SYNTHETIC_VOICE_SETS

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}
REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO_ROOT / "models" / "harmonifuse-demo"
log = logging.getLogger("harmonifuse")
BF16_HELP = "run the LLM in bf16 (faster on CPUs with bf16 matrix units and on GPUs; bf16 rounding)"


def default_model() -> str | None:
    """$HARMONIFUSE_MODEL, else the shipped demo model when present."""
    if os.environ.get("HARMONIFUSE_MODEL"):
        return os.environ["HARMONIFUSE_MODEL"]
    return str(DEMO_MODEL) if (DEMO_MODEL / "config.yaml").is_file() else None


def expand_audio_paths(items: list[str]) -> list[Path]:
    """Files as given; folders expanded to the audio files inside them (sorted, recursive)."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise SystemExit(f"error: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in folder {path}")
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def load_model(model_dir: str | None, *, bf16: bool = False):
    import torch

    from .config import ModelConfig
    from .model import HarmoniFuse

    if model_dir is None:
        print("note: no trained model found (models/harmonifuse-demo or --model); using an UNTRAINED "
              "HarmoniFuse on the default pretrained parts: its answers are not meaningful", file=sys.stderr)
        model = HarmoniFuse.from_pretrained(ModelConfig())
    else:
        model = HarmoniFuse.from_pretrained(model_dir)
    return model.llm_in(torch.bfloat16) if bf16 else model


def cmd_analyze(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    paths = expand_audio_paths(args.files)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model = load_model(args.model or default_model(), bf16=args.bf16)
    model.eval()
    unknown = set(tasks) - set(model.task_names)
    if unknown:
        raise SystemExit(f"error: --tasks has unknown task(s) {sorted(unknown)}; choose from {model.task_names}")
    failures = 0
    bar = tqdm(total=len(paths), unit="file", disable=len(paths) < 4 or args.quiet, file=sys.stderr)
    for window in duration_batches([header_duration(p) for p in paths], args.batch_size):
        results: dict[int, dict] = {}
        for batch in window:
            for index, result in zip(batch, _analyze_batch(model, [paths[i] for i in batch], tasks)):
                results[index] = result
            bar.update(len(batch))
        for index in sorted(results):  # input order, printed once per window so little waits unprinted
            failures += "error" in results[index]
            _print_result(paths[index], results[index], args.json)
    bar.close()
    return 1 if failures else 0


def header_duration(path: Path) -> float:
    """Seconds from the file's header (0 when unusable: decoding reports the error later)."""
    from .audio import AudioError
    from .data.importers._common import audio_duration

    try:
        return audio_duration(path)
    except AudioError:
        return 0.0


def duration_batches(durations: list[float], batch_size: int, window_batches: int = 8) -> list[list[list[int]]]:
    """Indices in windows of ``batch_size * window_batches`` consecutive files, each window cut into
    batches of similar duration: a short clip batched with a long one would be padded to its length
    through the encoder and the LLM. Windows keep results flowing out in input order."""
    window = batch_size * window_batches
    plan = []
    for start in range(0, len(durations), window):
        index = sorted(range(start, min(start + window, len(durations))), key=lambda i: durations[i])
        plan.append([index[i:i + batch_size] for i in range(0, len(index), batch_size)])
    return plan


def _analyze_batch(model, batch: list[Path], tasks: list[str]) -> list[dict]:
    from .audio import AudioError

    try:
        return model.analyze([str(p) for p in batch], tasks=tasks)
    except AudioError:
        # find the bad file(s) without losing the good ones
        results = []
        for path in batch:
            try:
                results.append(model.analyze([str(path)], tasks=tasks)[0])
            except AudioError as error:
                results.append({"error": str(error)})
        return results


def _print_result(path: Path, result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"file": str(path), **result}), flush=True)
        return
    if "error" in result:
        print(f"{path}\n  error: {result['error']}", flush=True)
        return
    lines = [str(path)]
    if "transcript" in result:
        lines.append(f"  transcript: {result['transcript']}")
    if "emotion" in result:
        probs = ", ".join(f"{k} {v:.2f}" for k, v in sorted(result["emotion_probs"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  emotion:    {result['emotion']}  ({probs})")
    print("\n".join(lines), flush=True)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.importers import IMPORTERS

    if args.corpus not in IMPORTERS:
        raise SystemExit(f"error: unknown corpus {args.corpus!r}; choose from {sorted(IMPORTERS)}")
    if args.corpus == "synthetic":
        out = Path(args.src if args.out is None else args.out)
        options = {"seed": args.seed}
        if args.size:
            options["size"] = args.size
        if args.voices:
            options["voices"] = args.voices
        written = IMPORTERS["synthetic"](out, **options)
    else:
        if args.out is None:
            raise SystemExit(f"error: usage: harmonifuse prepare {args.corpus} SRC OUT")
        written = IMPORTERS[args.corpus](Path(args.src), Path(args.out))
    for name, path in sorted(written.items()):
        print(f"{name}: {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training.run import load_run_config, train

    config = load_run_config(args.config, args.overrides)
    summary = train(config, resume=args.resume, progress=not args.quiet)
    print(json.dumps(summary))
    return 0


def parse_prompts(items: list[str]) -> dict[str, str]:
    """``["asr=Write down what is said."]`` -> ``{"asr": "Write down what is said."}``."""
    prompts = {}
    for item in items:
        task, sep, text = item.partition("=")
        if not sep or not task.strip() or not text.strip():
            raise ConfigError(f"--prompt {item!r} is not of the form task=TEXT, "
                              "e.g. --prompt 'asr=Write down what is said.'")
        prompts[task.strip()] = text.strip()
    return prompts


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.report import run_evaluation

    prompts = parse_prompts(args.prompt or [])
    model = load_model(args.model or default_model(), bf16=args.bf16)
    try:
        model.task_ids(list(prompts))
    except ValueError as error:
        raise ConfigError(f"--prompt: {error}") from error
    prompts = prompts or None
    summary = run_evaluation(model, [Path(m) for m in args.manifest], Path(args.out) if args.out else None,
                             batch_size=args.batch_size, folds=args.folds, progress=not args.quiet,
                             log_file=Path(args.log) if args.log else None, prompts=prompts)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("confusion", "per_manifest", "per_speaker")}))
    else:
        from .evaluation.report import SCALARS

        for key in SCALARS:
            if key in summary:
                spread = f" ± {summary[key + '_std']:.4f}" if key + "_std" in summary else ""
                print(f"{key:>9}: {summary[key]:.4f}{spread}")
        if args.out:
            print(f"report: {Path(args.out) / 'summary.md'}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments.runner import ExperimentInterrupted, ExperimentRunner
    from .experiments.spec import load_experiment

    spec, base = load_experiment(args.spec)
    runner = ExperimentRunner(spec, base, source=args.spec, progress=not args.quiet)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    try:
        runner.select(arms, seeds)
        table = runner.report() if args.report_only else runner.run(arms, seeds)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    except ExperimentInterrupted as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 3
    print(table.read_text())
    print(f"table: {table}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "analyze": cmd_analyze,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "experiment": cmd_experiment,
}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harmonifuse", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="transcribe and recognise the emotion of audio files")
    p.add_argument("files", nargs="+", help="audio files or folders")
    p.add_argument("--model", help="trained model folder (default: $HARMONIFUSE_MODEL or the shipped demo model)")
    p.add_argument("--tasks", default="asr,ser", help="comma separated tasks (default: asr,ser)")
    p.add_argument("--json", action="store_true", help="one JSON object per line and file")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--bf16", action="store_true", help=BF16_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("prepare", help="write manifests for a corpus (or synthesise the built-in one)")
    p.add_argument("corpus", help="librispeech | iemocap | cremad | ravdess | kaldi | synthetic")
    p.add_argument("src", help="corpus folder (for synthetic: the output folder)")
    p.add_argument("out", nargs="?", help="output folder for the manifests")
    p.add_argument("--seed", type=int, default=0, help="synthetic only")
    p.add_argument("--size", choices=SYNTHETIC_SIZES, help="synthetic only (default: default)")
    p.add_argument("--voices", choices=SYNTHETIC_VOICE_SETS,
                   help="synthetic only: the training voices: 11, 40 or 46 (default: standard)")

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("evaluate", help="WER/CER and WA/UA/macro-F1 of a model on manifests")
    p.add_argument("--model", help="trained model folder (default: the shipped demo model)")
    p.add_argument("--manifest", action="append", required=True, help="JSONL manifest (repeatable)")
    p.add_argument("--folds", action="store_true", help="score each manifest separately, report mean and std")
    p.add_argument("--out", help="folder for metrics.json, summary.md and plots")
    p.add_argument("--log", help="a run's log.jsonl, for the training-curve plot")
    p.add_argument("--prompt", action="append", help="task=prompt to evaluate with another prompt (repeatable)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--bf16", action="store_true", help=BF16_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object with the metrics")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("experiment", help="run an experiment's arms x seeds (resumable), write its table and plots")
    p.add_argument("spec", help="experiment file, e.g. configs/experiments/quick.yaml")
    p.add_argument("--arms", help="comma separated arm names (default: all)")
    p.add_argument("--seeds", help="comma separated seeds (default: the file's)")
    p.add_argument("--report-only", action="store_true", help="redraw table and plots from finished runs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from .audio import AudioError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, AudioError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
