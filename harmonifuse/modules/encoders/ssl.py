"""Self-supervised speech encoders from transformers (WavLM, HuBERT, wav2vec2) via the Auto classes."""
from __future__ import annotations

import torch
from torch import nn

from harmonifuse.lengths import lengths_to_mask
from harmonifuse.modules.encoders.base import EncoderOutput, SpeechEncoder


class SSLSpeechEncoder(SpeechEncoder):
    """Any transformers audio model that returns ``hidden_states`` (L+1 of them, (B, T, D)).

    Waveforms are normalised per utterance (zero mean, unit variance over the valid samples),
    which is what WavLM Large and HuBERT Large expect; the frame rate comes from the conv stack.
    """

    def __init__(self, model: nn.Module, *, name: str, normalize: bool = True, trainable: bool = False) -> None:
        super().__init__(trainable=trainable)
        self.model = model
        config = model.config
        # LayerDrop skips layers in training, and a skipped layer returns no hidden state: the layer
        # fusion needs all L+1 of them at every step
        config.layerdrop = 0.0
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        stride = 1
        for s in config.conv_stride:
            stride *= s
        self._stride = stride
        self.frame_rate = self.sample_rate / stride
        self.normalize = normalize
        self.identity = f"ssl:{name}:{config.model_type}:v1"
        self.freeze_unless_trainable()

    @classmethod
    def from_pretrained(cls, path: str, *, name: str | None = None, trainable: bool = False) -> "SSLSpeechEncoder":
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_pretrained(path, config=config)
        return cls(model, name=name or str(path),
                   normalize=getattr(config, "feat_extract_norm", "layer") == "layer", trainable=trainable)

    @classmethod
    def from_config(cls, config, *, name: str = "random", trainable: bool = False) -> "SSLSpeechEncoder":
        """Random weights from a transformers config (tests, or training from scratch)."""
        from transformers import AutoModel

        return cls(AutoModel.from_config(config), name=name, trainable=trainable)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.model._get_feat_extract_output_lengths(lengths).long()

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        """waveforms (B, S) float32 at 16 kHz, lengths (B,) -> hidden states (L+1, B, T, D)."""
        valid = lengths_to_mask(lengths, waveforms.shape[1])
        if self.normalize:
            count = lengths.clamp(min=1)[:, None].to(waveforms.dtype)
            mean = (waveforms * valid).sum(1, keepdim=True) / count
            var = (((waveforms - mean) * valid) ** 2).sum(1, keepdim=True) / count
            waveforms = ((waveforms - mean) / torch.sqrt(var + 1e-7)) * valid
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.model(waveforms, attention_mask=valid.long(), output_hidden_states=True)
        hidden = torch.stack(out.hidden_states)
        frame_lengths = self.frame_lengths(lengths).clamp(max=hidden.shape[2])
        mask = lengths_to_mask(frame_lengths, hidden.shape[2])
        return EncoderOutput(hidden * mask[None, :, :, None], frame_lengths)
