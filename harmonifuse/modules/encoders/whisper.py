"""Whisper's encoder as a HarmoniFuse speech encoder, run on the real input length.

transformers' ``WhisperEncoder`` insists on 3000 mel frames (30 s). Whisper's positions are
absolute and its attention is global, so running its layers on the first T positions with the
padding masked out gives nearly the same speech frames for a tenth of the compute on 3 s clips
(tests pin the agreement). ``pad_to_30s=True`` keeps the exact training-time behaviour.
"""
from __future__ import annotations

import torch
from torch import nn

from harmonifuse.lengths import lengths_to_mask
from harmonifuse.modules.encoders.base import EncoderOutput, SpeechEncoder

HOP_LENGTH = 160
N_FFT = 400
CHUNK_SAMPLES = 30 * 16_000


class WhisperSpeechEncoder(SpeechEncoder):
    """Wraps a transformers ``WhisperEncoder``; hidden states are (L+1, B, T, D) at 50 frames/s.

    H_0 is the convolutional front end plus positions; H_l the output of layer l; the last one
    has Whisper's final layer norm applied (what Whisper's own decoder reads).
    """

    frame_rate = 50.0

    def __init__(self, whisper_encoder: nn.Module, mel_filters: torch.Tensor, *, name: str,
                 pad_to_30s: bool = False, trainable: bool = False) -> None:
        super().__init__(trainable=trainable)
        self.encoder = whisper_encoder
        self.register_buffer("mel_filters", mel_filters.float(), persistent=False)  # (n_mels, n_freq)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.pad_to_30s = pad_to_30s
        self.num_layers = len(whisper_encoder.layers)
        self.hidden_size = whisper_encoder.config.d_model
        self.identity = f"whisper:{name}:{'pad30' if pad_to_30s else 'varlen'}:v1"
        self.freeze_unless_trainable()

    @classmethod
    def from_pretrained(cls, path: str, *, name: str | None = None, pad_to_30s: bool = False,
                        trainable: bool = False) -> "WhisperSpeechEncoder":
        from transformers import WhisperFeatureExtractor, WhisperModel

        model = WhisperModel.from_pretrained(path, attn_implementation="sdpa")
        extractor = WhisperFeatureExtractor.from_pretrained(path)
        # (n_freq, n_mels) in the extractor -> (n_mels, n_freq)
        filters = torch.as_tensor(extractor.mel_filters, dtype=torch.float32).T
        return cls(model.get_encoder(), filters, name=name or str(path), pad_to_30s=pad_to_30s,
                   trainable=trainable)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        mel_frames = lengths // HOP_LENGTH
        return (mel_frames + 1) // 2

    def log_mel(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, S) waveforms -> (B, n_mels, S // 160) normalised log-mel, as Whisper computes it.

        Each utterance is transformed on its own length (so batching never changes a result) and
        normalised over its own frames; padding frames are 0, what conv1's zero padding sees.
        """
        frames = lengths // HOP_LENGTH
        out = waveforms.new_zeros(waveforms.shape[0], self.mel_filters.shape[0], waveforms.shape[1] // HOP_LENGTH)
        for i, n in enumerate(lengths.tolist()):
            stft = torch.stft(waveforms[i, :n], N_FFT, HOP_LENGTH, window=self.window, return_complex=True)
            log_spec = torch.clamp(self.mel_filters @ (stft[..., :-1].abs() ** 2), min=1e-10).log10()
            log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
            out[i, :, : int(frames[i])] = (log_spec + 4.0) / 4.0
        return out

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        """waveforms (B, S) float32 at 16 kHz, lengths (B,) -> hidden states (L+1, B, T, D)."""
        frame_lengths = self.frame_lengths(lengths)
        if self.pad_to_30s:
            if waveforms.shape[1] > CHUNK_SAMPLES:
                raise ValueError("pad_to_30s handles at most 30 s of audio per utterance")
            waveforms = nn.functional.pad(waveforms, (0, CHUNK_SAMPLES - waveforms.shape[1]))
            # Whisper normalises over the whole zero-padded 30 s window.
            mel = self.log_mel(waveforms, torch.full_like(lengths, CHUNK_SAMPLES))
        else:
            mel = self.log_mel(waveforms, lengths)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            states = self._run_layers(mel, lengths // HOP_LENGTH, frame_lengths)
        keep = int(frame_lengths.max())
        hidden = torch.stack([h[:, :keep] for h in states])
        mask = lengths_to_mask(frame_lengths, keep)
        hidden = hidden * mask[None, :, :, None]
        return EncoderOutput(hidden, frame_lengths)

    def _run_layers(self, mel: torch.Tensor, mel_frames: torch.Tensor, frame_lengths: torch.Tensor) -> list[torch.Tensor]:
        enc = self.encoder
        x = nn.functional.gelu(enc.conv1(mel))
        if not self.pad_to_30s:  # what conv2's zero padding would see past each utterance's end
            mel_valid = lengths_to_mask(mel_frames, x.shape[-1])
            x = x * mel_valid[:, None, :]
        x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)  # (B, T, D)
        T = x.shape[1]
        if T > enc.embed_positions.num_embeddings:
            raise ValueError(f"audio too long for Whisper: {T} frames > {enc.embed_positions.num_embeddings}")
        x = x + enc.embed_positions.weight[:T]
        attention_mask = None
        if not self.pad_to_30s:
            valid = lengths_to_mask(frame_lengths, T)  # (B, T)
            attention_mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
            attention_mask = attention_mask.masked_fill(~valid, torch.finfo(x.dtype).min)[:, None, None, :]
        states = [x]
        for layer in enc.layers:
            x = layer(x, attention_mask)
            states.append(x)
        states[-1] = enc.layer_norm(x)
        return states
