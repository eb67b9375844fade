"""Typed configuration: the loader (YAML, ``extends``, dotted overrides, checks) in ``loading``,
the model's config in ``model``, a training run's config in ``run``, old keys and where they went
in ``renames``."""
from harmonifuse.config.loading import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    load_yaml,
    load_yaml_extends,
    parse_overrides,
    to_dict,
    to_yaml,
    validate,
)
from harmonifuse.config.model import (
    DEFAULT_PROMPTS,
    DEFAULT_TRAIN_PROMPTS,
    CalibrationConfig,
    CTCConfig,
    DecodingConfig,
    EncoderConfig,
    FeatureMaskingConfig,
    FusionConfig,
    GateConfig,
    LLMConfig,
    ModelConfig,
    ProjectorConfig,
    PromptConfig,
    TasksConfig,
    VADConfig,
)
from harmonifuse.config.renames import ConfigRenamedWarning

__all__ = ["ConfigError", "apply_overrides", "from_dict", "load_config", "load_yaml", "load_yaml_extends",
           "parse_overrides", "to_dict", "to_yaml", "validate", "DEFAULT_PROMPTS", "DEFAULT_TRAIN_PROMPTS",
           "CalibrationConfig", "ConfigRenamedWarning", "CTCConfig", "DecodingConfig", "EncoderConfig",
           "FeatureMaskingConfig", "FusionConfig", "GateConfig", "LLMConfig", "ModelConfig",
           "PromptConfig", "ProjectorConfig", "TasksConfig", "VADConfig"]
