"""The speech encoder interface every backbone implements.

An encoder maps a padded batch of 16 kHz waveforms to *all* of its hidden states, so that the
prompt-adaptive fusion can weight them. Lengths travel with the features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EncoderOutput:
    """hidden_states: (L+1, B, T, D), the embedding output then every layer's output.
    lengths: (B,) number of valid frames per utterance (frames past it are padding)."""

    hidden_states: torch.Tensor
    lengths: torch.Tensor


class SpeechEncoder(nn.Module):
    """Base class: ``forward(waveforms (B, S), lengths (B,)) -> EncoderOutput``.

    Subclasses set ``num_layers`` (L, transformer layers; L+1 hidden states come out),
    ``hidden_size`` (D), ``frame_rate`` (frames per second) and ``identity`` (a string that
    changes whenever the weights or the way features are computed change: feature caches key on it).
    """

    sample_rate: int = 16_000
    num_layers: int
    hidden_size: int
    frame_rate: float
    identity: str

    def __init__(self, trainable: bool = False) -> None:
        super().__init__()
        self.trainable = trainable

    @property
    def num_hidden_states(self) -> int:
        return self.num_layers + 1

    @property
    def downsample_rate(self) -> int:
        """Waveform samples per output frame."""
        return round(self.sample_rate / self.frame_rate)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) sample counts -> (B,) valid frame counts."""
        raise NotImplementedError

    def freeze_unless_trainable(self) -> None:
        if not self.trainable:
            for parameter in self.parameters():
                parameter.requires_grad_(False)
            self.eval()

    def gradient_checkpointing_enable(self) -> bool:
        """Recompute each transformer layer's activations in the backward pass instead of keeping
        them (a trainable encoder: WavLM Large keeps ~25 layers x (B, T, 1024) and their attention
        otherwise). Returns whether it took effect: a frozen encoder has no backward pass to save for."""
        from transformers import PreTrainedModel
        from transformers.modeling_layers import GradientCheckpointingLayer

        if not self.trainable:
            return False
        layers = [m for m in self.modules() if isinstance(m, GradientCheckpointingLayer)]
        for owner in self.modules():  # the transformers model(s) holding the layers
            if isinstance(owner, PreTrainedModel):
                # non-reentrant: the first layer's input need not require a gradient
                if hasattr(owner, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns
                    owner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    owner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return bool(layers) and all(layer.gradient_checkpointing for layer in layers)

    def train(self, mode: bool = True):  # a frozen encoder stays in eval mode (no dropout)
        return super().train(mode and self.trainable)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        raise NotImplementedError
