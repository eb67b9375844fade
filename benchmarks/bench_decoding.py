"""Benchmark: how ASR answers are decoded, with the shipped model, variants side by side in one process.

The encoder runs once per batch; every variant then decodes the same hidden states
(``analyze_hidden``, ASR only). Variants take turns (A B C A B C ...) for ``--repeats`` rounds, so a
busy machine slows them alike; the report gives per variant the median time of a round, its ratio
to the first variant (of the medians, and the median of the ratios within a round), the WER, how
many transcripts equal those of its reference variant, and the LLM forward passes with, for CTC
drafts, their acceptance rate and tokens per forward pass.

Variants (``--variants``, comma-separated; the first is the baseline of the ratios):

- ``beam4``: the shipped decoding, beam 4 with CTC weight 0.3; ``greedy-ctc``: beam 1 with CTC
  weight 0.3; ``greedy``: the LLM alone;
- then any of ``-loop``: the CTC prefix scorer's loop over frames and the search's loop over
  candidates as they were (tests/decoding_oracle.py); ``-draft[N]``: CTC drafts, up to N tokens per
  forward pass (default 4; greedy only); ``-int8``: the LLM and projector in dynamic int8
  (``model.decoding.int8``).

A variant and the one without its ``-draft[N]`` / ``-int8`` (or with ``-loop``) are compared
transcript by transcript.

    .venv/bin/python benchmarks/bench_decoding.py [--clips 16] [--batch-size 8] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DECODINGS = {  # name: model.decoding overrides
    "beam4": {"beam_size": 4, "ctc_weight": 0.3},
    "greedy-ctc": {"beam_size": 1, "ctc_weight": 0.3},
    "greedy": {"beam_size": 1, "ctc_weight": 0.0},
}


def parse_variant(name: str) -> dict:
    """``greedy-ctc-draft4-int8`` -> {"decoding": "greedy-ctc", "loop": False, "draft": 4, "int8": True}:
    a decoding of :data:`DECODINGS`, then any of ``-loop``, ``-draft[N]`` (N draft tokens, default 4),
    ``-int8``."""
    base = next((d for d in sorted(DECODINGS, key=len, reverse=True) if name == d or name.startswith(d + "-")), None)
    if base is None:
        raise SystemExit(f"unknown variant {name!r}; decodings: {', '.join(DECODINGS)} (+ -loop, -draft[N], -int8)")
    variant = {"decoding": base, "loop": False, "draft": 0, "int8": False}
    for part in filter(None, name[len(base):].split("-")):
        if part in ("loop", "int8"):
            variant[part] = True
        elif part.startswith("draft"):
            variant["draft"] = int(part[5:] or 4)
        else:
            raise SystemExit(f"unknown part {part!r} of variant {name!r}")
    return variant


def reference_of(name: str, names: list[str]) -> str | None:
    """The variant that must answer alike (exact: drafts, the loop search) or nearly (int8): the same
    name without -draft[N], -int8 or with -loop instead of the vectorised search."""
    parts = name.split("-")
    for i, part in enumerate(parts):
        if part.startswith("draft") or part == "int8":
            other = "-".join(parts[:i] + parts[i + 1:])
            if other in names:
                return other
    if "loop" not in parts and name + "-loop" in names:
        return name + "-loop"
    return None


@contextlib.contextmanager
def loop_search(enabled: bool):
    """harmonifuse.modules.llm's beam search replaced by the loop version it had (the test oracle)."""
    if not enabled:
        yield
        return
    sys.path.insert(0, str(REPO / "tests"))
    from decoding_oracle import loop_beam_search

    import harmonifuse.modules.llm as llm

    kept = llm.beam_search
    llm.beam_search = loop_beam_search
    try:
        yield
    finally:
        llm.beam_search = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--manifest", default=str(REPO / "data" / "synthetic-wide" / "asr_test.jsonl"))
    parser.add_argument("--variants", default="beam4,beam4-loop,beam4-int8,greedy-ctc,greedy-ctc-draft,"
                                               "greedy-ctc-int8,greedy,greedy-draft2,greedy-draft,greedy-int8")
    parser.add_argument("--out", help="also write the report here (JSON)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from harmonifuse import HarmoniFuse
    from harmonifuse.data.manifest import read_manifest
    from harmonifuse.decoding import DraftStats
    from harmonifuse.evaluation.metrics import asr_metrics

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    parsed = {name: parse_variant(name) for name in names}
    model = HarmoniFuse.from_pretrained().eval()
    utterances = read_manifest(args.manifest)[: args.clips]
    batches = []
    with torch.no_grad():
        for start in range(0, len(utterances), args.batch_size):
            chunk = utterances[start:start + args.batch_size]
            encoded = model.encode(*model.load_waveforms([u.audio for u in chunk]))
            batches.append((encoded.hidden_states, encoded.lengths))
    references = [u.text for u in utterances]
    times: dict[str, list[float]] = {name: [] for name in names}
    answers: dict[str, list[str]] = {}
    stats: dict[str, DraftStats] = {}
    with torch.no_grad():  # warm-up, untimed: the first decoding call pays for allocations and lazy set-up
        model.analyze_hidden(*batches[0], tasks=["asr"])
    for _ in range(args.repeats):
        for name in names:
            v = parsed[name]
            settings = {**DECODINGS[v["decoding"]], "draft": "ctc" if v["draft"] else "none",
                        "draft_tokens": v["draft"] or 8, "int8": v["int8"]}
            for key, value in settings.items():
                setattr(model.config.decoding, key, value)
            model.decode_stats = DraftStats()
            texts = []
            with loop_search(v["loop"]), torch.no_grad():
                if v["int8"]:
                    model.int8_parts()  # made once, outside the timing
                start = time.perf_counter()
                for hidden, lengths in batches:
                    texts += [r["transcript"] for r in model.analyze_hidden(hidden, lengths, tasks=["asr"])]
                times[name].append(time.perf_counter() - start)
            print(f"  {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
            answers[name], stats[name] = texts, model.decode_stats
    base = statistics.median(times[names[0]])
    report = {"clips": len(utterances), "batch_size": args.batch_size, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "variants": {}}
    for name in names:
        median = statistics.median(times[name])
        reference = reference_of(name, names)
        # the ratio within each round (the same machine load), then its median over the rounds
        paired = statistics.median(a / b for a, b in zip(times[names[0]], times[name]))
        row = {"seconds": round(median, 3), "speed_vs_first": round(base / median, 3),
               "speed_vs_first_paired": round(paired, 3), "rounds": [round(t, 3) for t in times[name]],
               "wer": round(asr_metrics(references, answers[name])["wer"], 4), **stats[name].as_dict()}
        if reference:
            row["same_as"] = reference
            row["same_transcripts"] = sum(a == b for a, b in zip(answers[name], answers[reference]))
        report["variants"][name] = row
        print(f"{name:24s} {median:7.2f} s  x{base / median:5.2f} (paired x{paired:5.2f})  WER {row['wer']:.3f}  "
              f"forwards {row['forwards']:4d}  tokens/forward {row['tokens_per_forward']:.2f}  "
              f"acceptance {row['acceptance_rate']:.2f}"
              + (f"  same as {reference}: {row['same_transcripts']}/{len(utterances)}" if reference else ""),
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
