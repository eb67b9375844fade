"""Speech encoders: one interface (:class:`SpeechEncoder`), built from a source string."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from harmonifuse.modules.encoders.base import EncoderOutput, SpeechEncoder

__all__ = ["EncoderOutput", "SpeechEncoder", "build_encoder", "ENCODER_BUILDERS"]


def _whisper(path: str, name: str, pad_to_30s: bool, trainable: bool) -> SpeechEncoder:
    from harmonifuse.modules.encoders.whisper import WhisperSpeechEncoder

    return WhisperSpeechEncoder.from_pretrained(path, name=name, pad_to_30s=pad_to_30s, trainable=trainable)


def _ssl(path: str, name: str, pad_to_30s: bool, trainable: bool) -> SpeechEncoder:
    from harmonifuse.modules.encoders.ssl import SSLSpeechEncoder

    return SSLSpeechEncoder.from_pretrained(path, name=name, trainable=trainable)


# transformers ``model_type`` -> builder; every other audio model goes through the Auto classes.
ENCODER_BUILDERS: dict[str, Callable[..., SpeechEncoder]] = {"whisper": _whisper}


def _model_type(path: str) -> str:
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text()).get("model_type", "")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).model_type


def build_encoder(source: str, *, pad_to_30s: bool = False, trainable: bool = False) -> SpeechEncoder:
    """Built-in name (``whisper-tiny.en``), local folder or hub id -> a SpeechEncoder."""
    from harmonifuse.assets import resolve_source

    path = resolve_source(source)
    builder = ENCODER_BUILDERS.get(_model_type(path), _ssl)
    return builder(path, source, pad_to_30s, trainable)
