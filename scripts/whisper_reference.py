"""Whisper tiny.en's own decoder on a manifest, for scale: the encoder HarmoniFuse is built on,
with the decoder trained on 680k hours, scored with HarmoniFuse's normalisation.

    python scripts/whisper_reference.py data/real/pocketsphinx_real.jsonl
    python scripts/whisper_reference.py data/real/pocketsphinx_real.jsonl --encoder-from harmonifuse-demo

Greedy decoding over Whisper's 30 s window, as transformers' ``generate`` does by default.
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

    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from harmonifuse.assets import whisper_tiny_en_dir
    from harmonifuse.audio import load_audio
    from harmonifuse.data.manifest import read_manifest
    from harmonifuse.evaluation.metrics import asr_metrics

    folder = whisper_tiny_en_dir()
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    if args.encoder_from:
        load_encoder(model, args.encoder_from)
    processor = WhisperProcessor.from_pretrained(folder)
    utterances = [u for u in read_manifest(args.manifest) if u.text]
    waves = [load_audio(u.audio) for u in utterances]
    decode = decode_varlen if args.varlen else decode_window
    hypotheses = decode(model, processor, folder, waves, batch_size=args.batch_size)
    for utt, hyp in zip(utterances, hypotheses):
        print(f"{utt.id}\n  reference: {utt.text}\n  whisper:   {hyp}")
    metrics = asr_metrics([u.text for u in utterances], hypotheses)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    return 0


def decode_window(whisper, processor, folder, waves, batch_size: int = 8) -> list[str]:
    """Greedy Whisper decoding in its 30 s window, as transformers' ``generate`` does by default."""
    import torch

    hypotheses = []
    for start in range(0, len(waves), batch_size):
        inputs = processor(waves[start:start + batch_size], sampling_rate=16_000, return_tensors="pt",
                           return_attention_mask=True)
        with torch.no_grad():
            tokens = whisper.generate(inputs.input_features, attention_mask=inputs.attention_mask, do_sample=False,
                                      num_beams=1)
        hypotheses += [h.strip() for h in processor.batch_decode(tokens, skip_special_tokens=True)]
    return hypotheses


MAX_TOKENS_PER_SECOND = 4  # read speech: about 2.5-3 words, 3-4 of Whisper's tokens per second


def decode_varlen(whisper, processor, folder, waves, batch_size: int = 1) -> list[str]:
    """Greedy Whisper decoding over encoder states computed on each wave's own length (no 30 s
    window), one wave at a time (``batch_size`` is ignored: no padding may reach the encoder)."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    from harmonifuse.modules.encoders.whisper import WhisperSpeechEncoder

    extractor = processor.feature_extractor
    encoder = WhisperSpeechEncoder(whisper.model.encoder, torch.as_tensor(extractor.mel_filters).T,
                                   name=str(folder)).eval()
    hypotheses = []
    for wave in waves:
        wave = torch.as_tensor(wave, dtype=torch.float32)[None]
        # Without the 30 s window's silence Whisper's decoder may not find the end and repeat itself:
        # the answer is bounded at MAX_TOKENS_PER_SECOND for either encoder.
        limit = int(MAX_TOKENS_PER_SECOND * wave.shape[1] / 16_000) + 2
        with torch.no_grad():
            states = encoder(wave, torch.tensor([wave.shape[1]])).hidden_states[-1]  # (1, T, D)
            tokens = whisper.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states), do_sample=False,
                                      num_beams=1, max_new_tokens=limit)
        hypotheses.append(processor.batch_decode(tokens, skip_special_tokens=True)[0].strip())
    return hypotheses


ENCODER_PREFIX = "encoder.encoder."  # HarmoniFuse's WhisperSpeechEncoder wraps transformers' WhisperEncoder


def load_encoder(whisper, model: str) -> None:
    """Copy a HarmoniFuse model's trained Whisper encoder weights into ``whisper``'s encoder."""
    from safetensors.torch import load_file

    from harmonifuse.pretrained import WEIGHTS_NAME, find_model_folder

    folder = find_model_folder(model)
    if folder is None:
        raise SystemExit(f"--encoder-from: no HarmoniFuse model folder at {model!r}")
    weights = {k[len(ENCODER_PREFIX):]: v for k, v in load_file(folder / WEIGHTS_NAME).items()
               if k.startswith(ENCODER_PREFIX)}
    if not weights:
        raise SystemExit(f"--encoder-from: {folder} holds no trained encoder (it was trained with Whisper frozen)")
    encoder = whisper.model.encoder
    missing = set(encoder.state_dict()) - set(weights)
    if missing:
        raise SystemExit(f"--encoder-from: {folder} lacks encoder weights {sorted(missing)[:3]}...")
    encoder.load_state_dict(weights)
    print(f"encoder: {len(weights)} tensors from {folder}")


if __name__ == "__main__":
    sys.exit(main())
