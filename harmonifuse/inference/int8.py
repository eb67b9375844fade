"""Lean weights for CPU inference: the LLM (LoRA merged) and the projector in dynamic int8.

``model.decoding.int8`` asks for them; the model keeps its float weights for training and saving.
"""
from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from harmonifuse.model import HarmoniFuse
    from harmonifuse.modules.llm import SpeechLLM


def int8_parts(model: "HarmoniFuse") -> tuple["SpeechLLM", nn.Module]:
    """The LLM (LoRA merged) and the projector with their Linear layers in dynamic int8
    (harmonifuse.modules.llm.quantize_linears). Copies, made on first use and again once any weight
    has changed. Held outside the module tree: no state_dict entries."""
    from harmonifuse.modules.llm import quantize_linears

    # every in-place change of a parameter (an optimiser step, load_state_dict) bumps its version
    stamp = sum(p._version for part in (model.llm, model.projector) for p in part.parameters())
    made = model.__dict__.get("_int8")
    if made is None or made[0] != stamp:
        with torch.no_grad():
            projector = quantize_linears(copy.deepcopy(model.projector).float().eval())
            made = (stamp, model.llm.int8_copy(), projector)
        model.__dict__["_int8"] = made
    return made[1], made[2]


@contextlib.contextmanager
def inference_parts(model: "HarmoniFuse"):
    """Within: ``model.llm`` and ``model.projector`` are their int8 copies when ``model.decoding.int8``
    asks for them (in eval mode on a CPU), else themselves."""
    if not model.config.decoding.int8 or model.training or model.llm.device.type != "cpu":
        yield
        return
    llm, projector = int8_parts(model)
    kept = model.llm, model.projector
    model.llm, model.projector = llm, projector
    try:
        yield
    finally:
        model.llm, model.projector = kept
