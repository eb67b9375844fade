"""Command line: ``harmonifuse analyze | prepare | train | cache | evaluate | calibrate | average |
experiment | plan | resolve | serve``.

Each subcommand is a small function registered in ``COMMANDS``; heavy imports happen inside them
so ``harmonifuse --help`` stays instant.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from harmonifuse.config import ConfigError
from harmonifuse.config.run import SYNTHETIC_SIZES, SYNTHETIC_VOICE_SETS
from harmonifuse.inference.batching import duration_batches, header_duration
from harmonifuse.inference.loading import load_model  # noqa: F401 (re-exported)
from harmonifuse.pretrained import DEMO_MODEL, MODEL_ENV, default_model, resolve_model  # noqa: F401 (re-exported)

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}
log = logging.getLogger("harmonifuse")
DEBUG_HELP = "show the full traceback of an error (default: one line saying what went wrong and what to do)"
BF16_HELP = "run the LLM in bf16 (faster on CPUs with bf16 matrix units and on GPUs; bf16 rounding)"
DEVICE_HELP = "auto (default: the GPU when CUDA is available, else the CPU), cpu, cuda or cuda:N"


def expand_audio_paths(items: list[str]) -> list[Path]:
    """Files as given; folders expanded to the audio files inside them (sorted, recursive)."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
            paths.extend(found or [path])  # a folder without audio is reported like a bad file
        else:
            paths.append(path)
    return paths


def cmd_analyze(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    paths = expand_audio_paths(args.files)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model = load_model(resolve_model(args.model), bf16=args.bf16, device=args.device)
    model.eval()
    unknown = set(tasks) - set(model.task_names)
    if unknown:
        raise SystemExit(f"error: --tasks has unknown task(s) {sorted(unknown)}; choose from {model.task_names}")
    if args.format in ("srt", "vtt") and not args.json and len(paths) > 1 and not args.output_dir:
        raise SystemExit(f"error: --format {args.format} with {len(paths)} files needs --output-dir DIR "
                         "(one subtitle file each)")
    failures = 0
    bar = tqdm(total=len(paths), unit="file", disable=len(paths) < 4 or args.quiet, file=sys.stderr)
    for window in duration_batches([header_duration(p) for p in paths], args.batch_size):
        results: dict[int, dict] = {}
        for batch in window:
            for index, result in zip(batch, _analyze_batch(model, [paths[i] for i in batch], tasks,
                                                           progress=not args.quiet, debug=args.debug)):
                results[index] = result
            bar.update(len(batch))
        for index in sorted(results):  # input order, printed once per window so little waits unprinted
            failures += "error" in results[index]
            _emit(paths[index], results[index], "json" if args.json else args.format, args.output_dir)
    bar.close()
    if failures:
        print(f"{failures} of {len(paths)} file(s) failed; their errors are above, the other files were answered",
              file=sys.stderr)
    return 1 if failures else 0


def _analyze_batch(model, batch: list[Path], tasks: list[str], progress: bool = False,
                   debug: bool = False) -> list[dict]:
    """Answers for a batch; when one file fails, each file alone, so the good ones are still answered
    and every bad one gets its own error (an unexpected one too, unless ``debug`` wants the traceback)."""
    from harmonifuse.audio import AudioError
    from harmonifuse.inference.fallback import answer_batch

    def answer(paths: list[Path]) -> list[dict]:
        for path in paths:
            if path.is_dir():
                raise AudioError(path, f"folder holds no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})",
                                 "point at a folder with audio files, or at the files themselves")
        return model.analyze([str(p) for p in paths], tasks=tasks, progress=progress)

    def failed(path: Path, error: Exception) -> dict:
        if isinstance(error, AudioError):
            return {"error": str(error)}
        if debug:
            raise error
        return {"error": f"{path}: unexpected {type(error).__name__}: {error} (run with --debug for the traceback, "
                         "and please report it)"}

    return answer_batch(answer, batch, failed)


def _emit(path: Path, result: dict, form: str, output_dir: str | None) -> None:
    """Print one file's answer as ``form``; subtitles go to OUTPUT_DIR/<name>.srt|.vtt when given."""
    from harmonifuse import formats

    if form in ("json", "text") or "error" in result:
        _print_result(path, result, form == "json")
        return
    text = formats.to_srt(result) if form == "srt" else formats.to_vtt(result)
    if output_dir:
        from harmonifuse.atomic import atomic_write_text

        target = Path(output_dir) / f"{path.stem}.{form}"
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, text)
        print(f"{path}: {target}", flush=True)
    else:
        print(text, end="" if text.endswith("\n") else "\n", flush=True)


def _print_result(path: Path, result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"file": str(path), **result}), flush=True)
        return
    if "error" in result:
        print(f"{path}\n  error: {result['error']}", flush=True)
        return
    lines = [str(path) + (f"  ({result['duration']:.1f} s, {len(result['segments'])} segments)"
                          if "segments" in result else "")]
    if result.get("no_speech"):
        lines.append("  no speech detected")
    elif "transcript" in result:
        lines.append(f"  transcript: {result['transcript']}  (confidence {result['transcript_confidence']:.2f})")
    if result.get("emotion") is not None:
        probs = ", ".join(f"{k} {v:.2f}" for k, v in sorted(result["emotion_probs"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  emotion:    {result['emotion']}  ({probs})")
    print("\n".join(lines), flush=True)


def cmd_prepare(args: argparse.Namespace) -> int:
    from harmonifuse.data.importers import IMPORTERS

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
    elif args.corpus == "real-speech":  # fetches its own sources (two Debian game packages)
        written = IMPORTERS[args.corpus](Path(args.src if args.out is None else args.out))
    else:
        if args.out is None:
            raise SystemExit(f"error: usage: harmonifuse prepare {args.corpus} SRC OUT")
        written = IMPORTERS[args.corpus](Path(args.src), Path(args.out))
    for name, path in sorted(written.items()):
        print(f"{name}: {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from harmonifuse.training.run import load_run_config, train

    config = load_run_config(args.config, args.overrides)
    summary = train(config, resume=args.resume, progress=not args.quiet, device=args.device)
    # one write per line: under torchrun every rank prints its summary into one pipe at the same moment,
    # and print() writes the text and its newline separately, so two ranks' lines could run together
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from harmonifuse.training.feature_cache_build import cache_command, format_summary
    from harmonifuse.training.run import load_run_config

    config = load_run_config(args.config, args.overrides)
    summary = cache_command(config, device=args.device, progress=not args.quiet, batch_size=args.batch_size)
    if summary.pop("rank") == 0:  # every rank's counts reached rank 0 (an all-reduce)
        print(format_summary(summary))
        print(json.dumps(summary))
    return 0  # unreadable audio is counted (failed) and logged: data.bad_samples decides about it in training


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
    from harmonifuse.evaluation.model_report import run_evaluation

    prompts = parse_prompts(args.prompt or [])
    model = load_model(resolve_model(args.model), bf16=args.bf16, overrides=args.set, device=args.device)
    try:
        model.task_ids(list(prompts))
    except ValueError as error:
        raise ConfigError(f"--prompt: {error}") from error
    prompts = prompts or None
    summary = run_evaluation(model, [Path(m) for m in args.manifest], Path(args.out) if args.out else None,
                             batch_size=args.batch_size, folds=args.folds, progress=not args.quiet,
                             log_file=Path(args.log) if args.log else None, prompts=prompts,
                             nonspeech=args.nonspeech)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("confusion", "per_manifest", "per_speaker")}))
    else:
        from harmonifuse.evaluation.model_report import SCALARS

        for key in SCALARS:
            if key in summary:
                spread = f" ± {summary[key + '_std']:.4f}" if key + "_std" in summary else ""
                print(f"{key:>9}: {summary[key]:.4f}{spread}")
        if args.out:
            print(f"report: {Path(args.out) / 'summary.md'}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from harmonifuse.data.manifest import read_manifest
    from harmonifuse.evaluation.calibration import calibrate

    model_dir = resolve_model(args.model)
    model = load_model(model_dir)
    utterances = [u for m in args.manifest for u in read_manifest(m, labels=model.config.tasks.emotion_labels)
                  if u.emotion is not None]
    report = calibrate(model, utterances, fit_on=args.fit_on, batch_size=args.batch_size, progress=not args.quiet)
    model.save_config(model_dir)
    print(json.dumps(report, indent=2))
    print(f"model.calibration.ser_temperature = {report['ser_temperature']} written to {Path(model_dir) / 'config.yaml'}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from harmonifuse.training.averaging import average_models

    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ConfigError(f"--weights {args.weights!r}: give comma separated numbers, e.g. 0.5,0.5") from None
    out = average_models(args.models, args.out, weights)
    print(f"averaged model written to {out}; its emotion temperature is 1 (uncalibrated): run "
          f"`harmonifuse calibrate --model {out} --manifest DEV.jsonl`")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from harmonifuse.experiments.runner import ExperimentInterrupted, ExperimentRunner
    from harmonifuse.experiments.spec import load_experiment

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


def cmd_plan(args: argparse.Namespace) -> int:
    from harmonifuse.plan import PlanError, format_plan, make_plan
    from harmonifuse.training.run import load_run_config

    config = load_run_config(args.config, args.overrides)
    try:
        plan = make_plan(config, gpus=args.gpus, gpu_memory_gb=args.gpu_memory, seconds=args.seconds)
    except PlanError as error:
        raise SystemExit(f"error: {error}") from None
    print(format_plan(plan))
    return 0 if plan.fits is not False else 4


def cmd_resolve(args: argparse.Namespace) -> int:
    from harmonifuse.atomic import atomic_write_text
    from harmonifuse.config.resolve import resolved_yaml
    from harmonifuse.config.run import RunConfig

    text = resolved_yaml(RunConfig, args.config, args.overrides, note=args.note)
    if args.output:
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from harmonifuse.serve.command import serve

    return serve(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "analyze": cmd_analyze,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "cache": cmd_cache,
    "evaluate": cmd_evaluate,
    "experiment": cmd_experiment,
    "calibrate": cmd_calibrate,
    "average": cmd_average,
    "serve": cmd_serve,
    "plan": cmd_plan,
    "resolve": cmd_resolve,
}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harmonifuse", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("analyze", help="transcribe and recognise the emotion of audio files")
    p.add_argument("files", nargs="+", help="audio files or folders")
    p.add_argument("--model", help=f"trained model folder (default: ${MODEL_ENV}, else the shipped model)")
    p.add_argument("--tasks", default="asr,ser", help="comma separated tasks (default: asr,ser)")
    p.add_argument("--json", action="store_true", help="one JSON object per line and file (--format json)")
    p.add_argument("--format", choices=("json", "text", "srt", "vtt"), default="text",
                   help="text (default), json (one object per line and file), or srt/vtt subtitles from the "
                        "segments of long recordings (one cue for a short one)")
    p.add_argument("--output-dir", help="with --format srt|vtt: write OUTPUT_DIR/<file name>.srt|.vtt per file")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--bf16", action="store_true", help=BF16_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("prepare", help="write manifests for a corpus (or synthesise the built-in one)")
    p.add_argument("corpus", help="librispeech | iemocap | cremad | ravdess | kaldi | pocketsphinx | amazon-queen | "
                                  "drascula | synthetic | real-speech")
    p.add_argument("src", help="corpus folder (for synthetic and real-speech: the output folder)")
    p.add_argument("out", nargs="?", help="output folder for the manifests")
    p.add_argument("--seed", type=int, default=0, help="synthetic only")
    p.add_argument("--size", choices=SYNTHETIC_SIZES, help="synthetic only (default: default)")
    p.add_argument("--voices", choices=SYNTHETIC_VOICE_SETS,
                   help="synthetic only: the training voices: 11, 40 or 46 (default: standard)")

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: train.device, auto: the GPU when CUDA is "
                                     "available, else the CPU); under torchrun each rank takes cuda:$LOCAL_RANK")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("cache", help="build the frozen encoder's feature cache of a run config's train and dev "
                                     "utterances (under torchrun each process its share)")
    p.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.feature_cache=/shared/features")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: train.device, as train chooses it); under "
                                     "torchrun each rank takes cuda:$LOCAL_RANK")
    p.add_argument("--batch-size", type=positive_int, default=8, help="utterances per encoder pass (default: 8)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("evaluate", help="WER/CER and WA/UA/macro-F1 of a model on manifests")
    p.add_argument("--model", help=f"trained model folder (default: ${MODEL_ENV}, else the shipped model)")
    p.add_argument("--manifest", action="append", required=True, help="JSONL manifest (repeatable)")
    p.add_argument("--folds", action="store_true", help="score each manifest separately, report mean and std")
    p.add_argument("--out", help="folder for metrics.json, summary.md and plots")
    p.add_argument("--log", help="a run's log.jsonl, for the training-curve plot")
    p.add_argument("--prompt", action="append", help="task=prompt to evaluate with another prompt (repeatable)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--bf16", action="store_true", help=BF16_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object with the metrics")
    p.add_argument("--nonspeech", action="store_true",
                   help="also score the built-in non-speech clips (share answered as no speech)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a model config field, e.g. --set decoding.ctc_weight=0.3 (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("calibrate", help="fit the emotion probabilities' temperature on dev, store it in the model")
    p.add_argument("--model", help=f"trained model folder (default: ${MODEL_ENV}, else the shipped model)")
    p.add_argument("--manifest", action="append", required=True, help="dev manifest with emotion labels (repeatable)")
    p.add_argument("--fit-on", choices=("dev", "drift", "dev+drift"), default="dev",
                   help="fit on the dev clips (default), on perturbed copies of them (noise, reverberation, "
                        "codecs, speed: for audio less like dev), or on both")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("average", help="one model whose trained weights are the mean of several models' "
                                        "(a model soup of fine-tunes from one start)")
    p.add_argument("models", nargs="+", help="model folders (two or more) of one architecture")
    p.add_argument("--out", required=True, help="new folder for the averaged model (never overwritten)")
    p.add_argument("--weights", help="comma separated weight per model (default: equal), e.g. 0.5,0.25,0.25")

    p = sub.add_parser("experiment", help="run an experiment's arms x seeds (resumable), write its table and plots")
    p.add_argument("spec", help="experiment file, e.g. configs/experiments/quick.yaml")
    p.add_argument("--arms", help="comma separated arm names (default: all)")
    p.add_argument("--seeds", help="comma separated seeds (default: the file's)")
    p.add_argument("--report-only", action="store_true", help="redraw table and plots from finished runs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("plan", help="parameters, memory per GPU and disk of a run config, and whether it fits "
                                    "(offline, without loading weights)")
    p.add_argument("config", help="YAML run config, e.g. configs/recipes/paper-wavlm-large.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.batch_size=4")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (processes) the run uses; 0: a CPU process (default: 1)")
    p.add_argument("--gpu-memory", type=float, metavar="GB",
                   help="memory per GPU (per process with --gpus 0), to say whether it fits; exit status 4 if not")
    p.add_argument("--seconds", type=float,
                   help="utterance length that sizes a batch (default: the longest training utterance, else "
                        "data.max_seconds)")
    p = sub.add_parser("resolve", help="a run config written out complete: extends merged, old keys renamed, "
                                       "every field set, comments kept (how frozen recipes are stored)")
    p.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=200")
    p.add_argument("-o", "--output", help="write here (may be the config itself) instead of to stdout")
    p.add_argument("--note", help="a comment line added under the file's header")

    from harmonifuse.serve.command import add_arguments as add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="an OpenAI-compatible HTTP service and a browser page"))
    for command in sub.choices.values():  # accepted before or after the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line, not a stack trace, unless --debug
        if args.debug:
            raise
        # HarmoniFuse's own errors (AudioError, ConfigError, ManifestError, WeightsError, DiskFullError, ...)
        # and the operating system's already say what and where; anything else is named by its type
        ours = type(error).__module__.startswith("harmonifuse.") or isinstance(error, OSError)
        print(f"error: {error}" if ours else
              f"error: {error} ({type(error).__name__}; run again with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
