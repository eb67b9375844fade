"""HarmoniFuse: component-selective, prompt-adaptive multi-task speech language models (ASR + SER)."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["HarmoniFuse", "ModelConfig", "__version__"]


def __getattr__(name: str):
    # lazy: `import harmonifuse` (and the CLI's --help) must not pay for torch and transformers
    if name == "HarmoniFuse":
        from harmonifuse.model import HarmoniFuse

        return HarmoniFuse
    if name == "ModelConfig":
        from harmonifuse.config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'harmonifuse' has no attribute {name!r}")
