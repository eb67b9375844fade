"""Parameter groups and learning-rate schedules of the training stages."""
from __future__ import annotations

import math


def parameter_groups(model, optim, lr: float | None = None) -> list[dict]:
    """HarmoniFuse parts (at ``lr``, default ``optim.lr``), LoRA adapters and (if unfrozen) the
    encoder learn at their own rates."""
    lr = optim.lr if lr is None else lr
    groups: dict[str, list] = {"harmonifuse": [], "lora": [], "encoder": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "lora" if name.startswith("llm.") else "encoder" if name.startswith("encoder.") else "harmonifuse"
        groups[key].append(p)
    rates = {"harmonifuse": lr, "lora": optim.lora_lr, "encoder": optim.encoder_lr}
    return [{"name": k, "params": v, "lr": rates[k], "weight_decay": optim.weight_decay}
            for k, v in groups.items() if v]


def lr_lambda(optim, max_steps: int):
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor
