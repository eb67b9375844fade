"""A trained model for inference: from its folder (or the shipped one), on the chosen device."""
from __future__ import annotations

import sys

from harmonifuse.pretrained import MODEL_ENV


def load_model(model_dir: str | None, *, bf16: bool = False, overrides: list[str] | None = None,
               device: str | None = None):
    """The model in ``model_dir``; ``device`` (a --device value) moves it there (None: stays on the CPU).

    The device is chosen before anything loads, so an unusable one fails at once (DeviceError)."""
    import torch

    where = None
    if device is not None:
        from harmonifuse.device import choose_device, env_local_rank

        where = choose_device(device, env_local_rank())

    from harmonifuse.config import ModelConfig
    from harmonifuse.model import HarmoniFuse

    if model_dir is None:
        print(f"note: no trained model found (pass --model FOLDER or set {MODEL_ENV}); using an UNTRAINED "
              "HarmoniFuse on the default pretrained parts: its answers are not meaningful", file=sys.stderr)
        from harmonifuse.config import apply_overrides, from_dict

        model = HarmoniFuse.from_pretrained(from_dict(ModelConfig, apply_overrides({}, overrides or []), "model"),
                                            device=where)
    else:
        model = HarmoniFuse.from_pretrained(model_dir, overrides, device=where)
    if where is not None:
        model.to(where)
    return model.llm_in(torch.bfloat16) if bf16 else model
