"""Configs: YAML + dotted overrides, unknown keys and bad values rejected with the field's name."""
from pathlib import Path

import pytest

from harmonifuse.cli import DEMO_MODEL
from harmonifuse.config import ConfigError, ModelConfig, load_config, parse_overrides, to_dict
from harmonifuse.config.run import RunConfig

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def test_defaults_are_the_paper_setup():
    config = ModelConfig()
    assert (config.fusion.mode, config.gate.mode, config.prompt.vector) == ("prompt", "content", "mean_embedding")
    assert config.encoder.trainable is False and config.projector.stack == 5


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  fusion: {mode: task}\ntrain:\n  max_steps: 10\n")
    config = load_config(RunConfig, path, ["train.max_steps=20", "optim.lr=1e-3", "model.llm.lora_targets=[q_proj]"])
    assert config.model.fusion.mode == "task"
    assert config.train.max_steps == 20 and config.optim.lr == 1e-3
    assert config.model.llm.lora_targets == ["q_proj"]
    assert config.model.gate.mode == "content"  # untouched defaults stay


def test_the_shipped_demo_config_loads():
    config = load_config(RunConfig, DEMO_RECIPE)
    assert config.model.llm.source == "smollm2-135m-instruct"


def test_the_shipped_model_is_the_model_the_shipped_recipe_builds():
    recipe = to_dict(load_config(RunConfig, DEMO_RECIPE).model)
    shipped = to_dict(load_config(ModelConfig, DEMO_MODEL / "config.yaml"))
    # the SER temperature is fitted on dev after training (harmonifuse calibrate), not set by the recipe
    assert shipped.pop("calibration")["ser_temperature"] != 1.0
    recipe.pop("calibration")
    assert shipped == recipe


@pytest.mark.parametrize("override, field, problem", [
    ("model.fusion.mode=layerwise", "model.fusion.mode", "is not one of"),
    ("model.fusion.temperature=0", "model.fusion.temperature", "must be > 0"),
    ("model.projector.stack=two", "model.projector.stack", "expected an integer"),
    ("model.projector.context_layers=-1", "model.projector.context_layers", "must be >= 0"),
    ("model.projector.context_kernel=4", "model.projector.context_kernel", "must be an odd number >= 1"),
    ("train.max_steps=-1", "train.max_steps", "must be >= 0"),
    ("train.max_steps=0", "train.max_steps", "is 0 and so is align.max_steps: nothing would train"),
    ("train.max_step=3", "train.max_step", "is unknown"),
    ("model.encoder.trainable=maybe", "model.encoder.trainable", "expected true or false"),
    ("data.fraction.asr=1.5", "data.fraction.asr", "must be in (0, 1]"),
    ("data.synthetic_voices=many", "data.synthetic_voices", "is not one of ['standard', 'wide', 'wider', 'neural']"),
    ("data.synthetic_size=huge", "data.synthetic_size", "is not one of ['tiny', 'small', 'default', 'large']"),
    ("model.tasks.emotion_labels=[sad]", "model.tasks.emotion_labels", "at least two"),
    ("model.tasks.train_prompts={asr: [Say it.], sr: [Feel it.]}", "model.tasks.train_prompts", "['sr']"),
    ("model.tasks.train_prompts={asr: ['  ']}", "model.tasks.train_prompts", "empty phrasing"),
    ("model.tasks.prompts={asr: '', ser: Feel it.}", "model.tasks.prompts", "has an empty prompt"),
    ("model.tasks.train_prompts={asr: Say it.}", "model.tasks.train_prompts.asr", "expected a list"),
])
def test_bad_values_name_the_field(override, field, problem):
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, None, [override])
    assert f"'{field}'" in str(error.value) and problem in str(error.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["train.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RunConfig, bad)


def test_mapping_override_replaces_the_mapping(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train: {asr: a.jsonl, ser: s.jsonl}\n  batch_size: 4\n")
    config = load_config(RunConfig, path, ["data.train={asr: only.jsonl}", "data.fraction.asr=0.25"])
    assert config.data.train == {"asr": "only.jsonl"}  # replaced, not merged with ser
    assert config.data.fraction == {"asr": 0.25} and config.data.batch_size == 4
    with pytest.raises(ConfigError, match="'data.batch_size' is not a mapping"):
        load_config(RunConfig, path, ["data.batch_size.x=1"])


def test_a_recipe_extends_a_frozen_one_and_changes_only_what_it_names(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "base.yaml").write_text(
        "model:\n  fusion: {mode: task, temperature: 2.0}\n  llm: {lora_targets: [q_proj, v_proj]}\n"
        "train:\n  max_steps: 10\n  eval_every: 5\n")
    (tmp_path / "recipes" / "middle.yaml").write_text("extends: base.yaml\ntrain: {max_steps: 20}\n")
    top = tmp_path / "top.yaml"
    top.write_text("extends: recipes/middle.yaml\nmodel:\n  fusion: {mode: prompt}\n  llm: {lora_targets: [o_proj]}\n")
    config = load_config(RunConfig, top, ["train.eval_every=7"])
    assert (config.model.fusion.mode, config.model.fusion.temperature) == ("prompt", 2.0)  # mappings merge
    assert config.model.llm.lora_targets == ["o_proj"]  # lists are replaced
    assert (config.train.max_steps, config.train.eval_every) == (20, 7)


def test_extends_names_a_missing_parent_or_a_cycle(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(RunConfig, a)
    a.write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"'extends' of .*a\.yaml: .*gone\.yaml does not exist"):
        load_config(RunConfig, a)


def test_the_shipped_recipes_load_and_the_fine_tune_builds_on_the_frozen_one():
    recipes = DEMO_RECIPE.parent / "recipes"
    wide = load_config(RunConfig, recipes / "wide-voices.yaml")
    demo = load_config(RunConfig, DEMO_RECIPE)
    trained_with = load_config(RunConfig, DEMO_MODEL / "train_config.yaml")
    assert to_dict(wide.model) == to_dict(trained_with.model) and wide.data == trained_with.data
    real = load_config(RunConfig, recipes / "real-audio.yaml", ["train.init_from=harmonifuse-demo"])
    assert real.data.augment.enabled and real.data.synthetic_voices == "neural"
    assert real.model.decoding.beam_size == 4 and real.align.max_steps == 0
    assert to_dict(real.model) == to_dict(demo.model)  # the default recipe describes the model it ends in
    # the shipped model averages two halves of the real-audio recipe: augmentation alone, neural voice alone
    start = ["train.init_from=harmonifuse-demo"]  # runs/wide-voices/best once trained
    augment = load_config(RunConfig, recipes / "real-audio-augment.yaml", start)
    neural = load_config(RunConfig, recipes / "real-audio-neural.yaml", start)
    assert augment.data.augment.enabled and augment.data.synthetic_voices == "wide"
    assert not neural.data.augment.enabled and neural.data.synthetic_voices == "neural"
    assert augment.data.root == wide.data.root
    assert to_dict(augment.model) == to_dict(neural.model) == to_dict(real.model)
    assert augment.train.output_dir != neural.train.output_dir


def test_init_from_must_name_a_model_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.init_from'.*is no model folder"):
        load_config(RunConfig, None, [f"train.init_from={tmp_path}"])
