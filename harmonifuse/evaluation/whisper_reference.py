"""Whisper tiny.en's own decoder, for scale: the encoder HarmoniFuse is built on with the decoder
OpenAI trained on 680k hours, run offline from the same package and scored with HarmoniFuse's
normalisation. ``make demo`` puts it beside the shipped model on the real-speech test split;
``scripts/whisper_reference.py`` runs it on any manifest.

Greedy decoding over Whisper's 30 s window, as transformers' ``generate`` does by default.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ENCODER_PREFIX = "encoder.encoder."  # HarmoniFuse's WhisperSpeechEncoder wraps transformers' WhisperEncoder
MAX_TOKENS_PER_SECOND = 4  # read speech: about 2.5-3 words, 3-4 of Whisper's tokens per second


class WhisperReference:
    """Whisper tiny.en (encoder and decoder) from the offline model package."""

    def __init__(self, folder: str | Path | None = None) -> None:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        from harmonifuse.assets import whisper_tiny_en_dir

        self.folder = Path(folder) if folder is not None else whisper_tiny_en_dir()
        self.model = WhisperForConditionalGeneration.from_pretrained(self.folder).eval()
        self.processor = WhisperProcessor.from_pretrained(self.folder)

    @torch.no_grad()
    def transcribe(self, waves: Sequence[np.ndarray], batch_size: int = 8) -> list[str]:
        """16 kHz mono waves (each up to 30 s) -> greedy transcripts, in Whisper's 30 s window."""
        hypotheses = []
        for start in range(0, len(waves), batch_size):
            inputs = self.processor(list(waves[start:start + batch_size]), sampling_rate=16_000,
                                    return_tensors="pt", return_attention_mask=True)
            tokens = self.model.generate(inputs.input_features, attention_mask=inputs.attention_mask,
                                         do_sample=False, num_beams=1)
            hypotheses += [h.strip() for h in self.processor.batch_decode(tokens, skip_special_tokens=True)]
        return hypotheses

    @torch.no_grad()
    def transcribe_varlen(self, waves: Sequence[np.ndarray]) -> list[str]:
        """Greedy decoding over encoder states computed on each wave's own length (no 30 s window),
        as HarmoniFuse runs the encoder; one wave at a time (no padding may reach the encoder)."""
        from transformers.modeling_outputs import BaseModelOutput

        from harmonifuse.modules.encoders.whisper import WhisperSpeechEncoder

        mel = torch.as_tensor(self.processor.feature_extractor.mel_filters).T
        encoder = WhisperSpeechEncoder(self.model.model.encoder, mel, name=str(self.folder)).eval()
        hypotheses = []
        for wave in waves:
            wave = torch.as_tensor(wave, dtype=torch.float32)[None]
            # Without the 30 s window's silence the decoder may not find the end and repeat itself:
            # the answer is bounded at MAX_TOKENS_PER_SECOND for either encoder.
            limit = int(MAX_TOKENS_PER_SECOND * wave.shape[1] / 16_000) + 2
            states = encoder(wave, torch.tensor([wave.shape[1]])).hidden_states[-1]  # (1, T, D)
            tokens = self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states),
                                         do_sample=False, num_beams=1, max_new_tokens=limit)
            hypotheses.append(self.processor.batch_decode(tokens, skip_special_tokens=True)[0].strip())
        return hypotheses

    def load_encoder(self, model: str) -> int:
        """Swap in a HarmoniFuse model's fine-tuned Whisper encoder (folder or name); returns the
        number of tensors copied. A model without a trained encoder is a ValueError naming it."""
        from safetensors.torch import load_file

        from harmonifuse.pretrained import WEIGHTS_NAME, find_model_folder

        folder = find_model_folder(model)
        if folder is None:
            raise ValueError(f"no HarmoniFuse model folder at {model!r}")
        weights = {k[len(ENCODER_PREFIX):]: v for k, v in load_file(folder / WEIGHTS_NAME).items()
                   if k.startswith(ENCODER_PREFIX)}
        if not weights:
            raise ValueError(f"{folder} holds no trained encoder (it was trained with Whisper frozen)")
        encoder = self.model.model.encoder
        missing = set(encoder.state_dict()) - set(weights)
        if missing:
            raise ValueError(f"{folder} lacks encoder weights {sorted(missing)[:3]}...")
        encoder.load_state_dict(weights)
        return len(weights)
