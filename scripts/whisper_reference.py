"""Whisper tiny.en's own decoder on a manifest, for scale: the encoder HarmoniFuse is built on,
with the decoder trained on 680k hours, scored with HarmoniFuse's normalisation.

    python scripts/whisper_reference.py data/real/pocketsphinx_real.jsonl
    python scripts/whisper_reference.py data/real/pocketsphinx_real.jsonl --encoder-from harmonifuse-demo

Greedy decoding over Whisper's 30 s window, as transformers' ``generate`` does by default
(harmonifuse/evaluation/whisper_reference.py, which ``make demo`` uses too).
``--encoder-from MODEL`` swaps in a HarmoniFuse model's fine-tuned Whisper encoder under Whisper's
own decoder: how much of Whisper's real-speech skill the encoder kept through fine-tuning.
HarmoniFuse fine-tunes the encoder on each utterance's own length, not a 30 s window, so compare
such an encoder with ``--varlen`` (the encoder run as HarmoniFuse runs it, one utterance at a time,
its last hidden states handed to Whisper's decoder), against the original encoder run the same way.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoder-from", metavar="MODEL",
                        help="a HarmoniFuse model (folder or name) whose fine-tuned Whisper encoder to decode with")
    parser.add_argument("--varlen", action="store_true",
                        help="run the encoder on each utterance's own length, as HarmoniFuse does (batch size 1)")
    args = parser.parse_args(argv)

    from harmonifuse.audio import load_audio
    from harmonifuse.data.manifest import read_manifest
    from harmonifuse.evaluation.metrics import asr_metrics
    from harmonifuse.evaluation.whisper_reference import WhisperReference

    whisper = WhisperReference()
    if args.encoder_from:
        try:
            print(f"encoder: {whisper.load_encoder(args.encoder_from)} tensors from {args.encoder_from}")
        except ValueError as error:
            raise SystemExit(f"--encoder-from: {error}") from error
    utterances = [u for u in read_manifest(args.manifest) if u.text]
    waves = [load_audio(u.audio) for u in utterances]
    hypotheses = (whisper.transcribe_varlen(waves) if args.varlen
                  else whisper.transcribe(waves, batch_size=args.batch_size))
    for utt, hyp in zip(utterances, hypotheses):
        print(f"{utt.id}\n  reference: {utt.text}\n  whisper:   {hyp}")
    metrics = asr_metrics([u.text for u in utterances], hypotheses)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
