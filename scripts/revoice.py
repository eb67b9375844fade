"""Re-read a split of a built synthetic corpus with other voices: the same sentences, prosody and
channel (a research helper: it separates what a model does not generalise to, the voices, from
the rest; docs/research/training-log.md, "voice swap").

    python scripts/revoice.py data/synthetic data/revoiced --voice flite-rms=flite-slt \\
        --voice espeak-en-us+m7=espeak-en-us+m1 --voice espeak-en-gb-x-rp+f5=espeak-en-gb-x-rp+f3
    harmonifuse evaluate --model harmonifuse-demo --manifest data/revoiced/asr_test.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harmonifuse.data import synthetic


def revoice(corpus: Path, out: Path, voices: dict[str, str], *, task: str = "asr", split: str = "test",
            limit: int | None = None, progress: bool = True) -> Path:
    """Re-read a split of a built corpus with other voices: the same sentences, prosody and channel.

    Separates what a model does not generalise to: scored on ``corpus``'s split and on this copy,
    the difference is the voices' alone (for example the test voices against training voices).

    Args:
        corpus: a folder written by :func:`harmonifuse.data.synthetic.prepare` (its ``synthesis.jsonl``
            holds the plan).
        out: output folder for ``{task}_{split}.jsonl`` and its audio.
        voices: voice name -> voice name (``harmonifuse.data.synthetic.VOICES`` names, e.g.
            ``{"flite-rms": "flite-slt"}``); every voice of the split must be mapped.
        limit: only the first ``limit`` utterances of the split, in manifest order.

    Returns:
        the manifest path.
    """
    corpus, out = Path(corpus), Path(out)
    if out.resolve() == corpus.resolve():
        raise ValueError(f"revoice writes a copy: give an output folder other than the corpus {corpus}")
    plan_file = corpus / "synthesis.jsonl"
    if not plan_file.is_file():
        raise FileNotFoundError(f"{plan_file} is missing: revoice needs a corpus written by "
                                f"`harmonifuse prepare synthetic`")
    unknown = sorted(set(voices.values()) - set(synthetic._VOICE_BY_NAME))
    if unknown:
        raise ValueError(f"unknown voice(s) {unknown}; choose from {sorted(synthetic._VOICE_BY_NAME)}")
    items = [json.loads(line) for line in plan_file.read_text().splitlines() if line.strip()]
    items = [it for it in items if it["task"] == task and it["split"] == split][:limit]
    if not items:
        raise ValueError(f"{plan_file} has no {task} utterances in split {split!r}")
    unmapped = sorted({it["speaker"] for it in items} - set(voices))
    if unmapped:
        raise ValueError(f"voices {unmapped} of {task}_{split} have no replacement in `voices`")
    items = [{**it, "speaker": voices[it["speaker"]]} for it in items]
    bar = synthetic.tqdm(items, desc="revoice", unit="utt", disable=not progress)
    frames = dict(synthetic._render((it, str(out))) for it in bar)
    path = out / synthetic.manifest_name(task, split)
    synthetic.write_manifest(path, synthetic._manifest_rows(items, out, frames))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", help="a folder written by `harmonifuse prepare synthetic`")
    parser.add_argument("out", help="output folder for the manifest and its audio")
    parser.add_argument("--voice", action="append", default=[], metavar="OLD=NEW", required=True,
                        help="a voice of the split and the voice that reads it instead (repeat for each voice)")
    parser.add_argument("--task", default="asr")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    voices = dict(item.split("=", 1) for item in args.voice)
    print(revoice(Path(args.corpus), Path(args.out), voices, task=args.task, split=args.split, limit=args.limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
