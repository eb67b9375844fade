"""Whisper tiny.en's own decoder on a manifest, for scale: the encoder HarmoniFuse is built on,
with the decoder trained on 680k hours, scored with HarmoniFuse's normalisation.

    python scripts/whisper_reference.py data/real/pocketsphinx_real.jsonl

Greedy decoding over Whisper's 30 s window, as transformers' ``generate`` does by default.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from harmonifuse.assets import whisper_tiny_en_dir
    from harmonifuse.audio import load_audio
    from harmonifuse.data.manifest import read_manifest
    from harmonifuse.evaluation.metrics import asr_metrics

    folder = whisper_tiny_en_dir()
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperProcessor.from_pretrained(folder)
    utterances = [u for u in read_manifest(args.manifest) if u.text]
    hypotheses = []
    for start in range(0, len(utterances), args.batch_size):
        chunk = utterances[start:start + args.batch_size]
        inputs = processor([load_audio(u.audio) for u in chunk], sampling_rate=16_000, return_tensors="pt",
                           return_attention_mask=True)
        with torch.no_grad():
            tokens = model.generate(inputs.input_features, attention_mask=inputs.attention_mask, do_sample=False,
                                    num_beams=1)
        hypotheses += [h.strip() for h in processor.batch_decode(tokens, skip_special_tokens=True)]
    for utt, hyp in zip(utterances, hypotheses):
        print(f"{utt.id}\n  reference: {utt.text}\n  whisper:   {hyp}")
    metrics = asr_metrics([u.text for u in utterances], hypotheses)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
