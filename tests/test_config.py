"""Configs: YAML + dotted overrides, unknown keys and bad values rejected with the field's name."""
from pathlib import Path

import warnings

import pytest
import yaml

from harmonifuse.cli import DEMO_MODEL
from harmonifuse.config import (ConfigError, ConfigRenamedWarning, ModelConfig, from_dict, load_config,
                                parse_overrides, to_dict)
from harmonifuse.config.run import RunConfig

TESTS = Path(__file__).resolve().parent
DEMO_RECIPE = TESTS.parent / "configs" / "demo.yaml"


def test_defaults_are_the_paper_setup():
    config = ModelConfig()
    assert (config.fusion.mode, config.gate.mode, config.prompt.vector) == ("prompt", "content", "mean_embedding")
    assert config.encoder.trainable is True and config.projector.stack == 5


def test_the_defaults_are_the_shipped_recipe_and_build_the_shipped_model():
    """ModelConfig() is configs/demo.yaml's model and the shipped model's config, but for the SER
    temperature fitted after training (harmonifuse calibrate)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigRenamedWarning)  # the shipped folder is in the new form
        shipped = load_config(ModelConfig, DEMO_MODEL / "config.yaml")
    assert load_config(RunConfig, DEMO_RECIPE).model == ModelConfig()
    assert shipped.calibration.ser_temperature != 1.0
    shipped.calibration = ModelConfig().calibration
    assert shipped == ModelConfig()


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
    ("model.ctc.loss_weight=-1", "model.ctc.loss_weight", "must be >= 0"),
    ("model.ctc.scale=0", "model.ctc.scale", "must be > 0"),
    ("model.ctc.tasks=[asr, speaker]", "model.ctc.tasks", "must list some of"),
    ("model.feature_masking.time_width=0", "model.feature_masking.time_width", "must be >= 1"),
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
    # the shipped folder's train_config.yaml keeps its old keys and predates the decoding section
    # (greedy then, the default of the time)
    with pytest.warns(ConfigRenamedWarning):
        trained_with = load_config(RunConfig, DEMO_MODEL / "train_config.yaml",
                                   ["model.decoding.beam_size=1", "model.decoding.ctc_weight=0"])
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


# -- old keys (harmonifuse/config/renames.py) ----------------------------------------------------

RENAMED = {"augment": "feature_masking", "projector.ctc_weight": "ctc.loss_weight", "projector.ctc_tasks": "ctc.tasks",
           "projector.ctc_scale": "ctc.scale", "projector.ctc_learn_scale": "ctc.learn_scale",
           "projector.ctc_learned_blank": "ctc.learned_blank"}
REMOVED_AT_DEFAULT = ["projector.context_layers", "projector.context_heads", "projector.context_kernel",
                      "projector.token_mixture"]


def test_the_shipped_model_folder_as_it_was_loads_with_one_warning_per_old_key(tmp_path):
    """The shipped folder's config.yaml as it was before the renames (tests/data; the folder now holds
    the new form): one warning naming each old key and its new one, one for each removed probe
    setting at its default, and the same config as the new form and the shipped folder."""
    import shutil

    from harmonifuse.config.renames import migrate
    from harmonifuse.model import read_folder_config

    old = tmp_path / "config.yaml"
    shutil.copy(TESTS / "data" / "shipped_config_before.yaml", old)  # the shipped folder's config before the renames
    text = old.read_text()
    assert "ctc_weight" in text and "context_layers" in text and "\naugment:" in text  # still the old form
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = read_folder_config(old, None)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigRenamedWarning)]
    for key, new in RENAMED.items():
        named = [m for m in messages if f"'{key}' is now '{new}'" in m]
        assert len(named) == 1, (key, messages)
    for key in REMOVED_AT_DEFAULT:
        assert len([m for m in messages if f"'{key}' was removed" in m]) == 1, (key, messages)
    assert len(messages) == len(RENAMED) + len(REMOVED_AT_DEFAULT)
    new = tmp_path / "new.yaml"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigRenamedWarning)
        new.write_text(yaml.safe_dump(migrate(yaml.safe_load(text)), sort_keys=False))
    assert "ctc:" in new.read_text() and "feature_masking:" in new.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigRenamedWarning)  # the new form loads without a warning
        assert read_folder_config(new, None) == loaded
        assert read_folder_config(DEMO_MODEL / "config.yaml", None) == loaded
    assert loaded.ctc.loss_weight == 0.3 and loaded.ctc.tasks == ["asr", "ser"] and loaded.ctc.learned_blank
    assert loaded.feature_masking.channel_width == 32 and loaded.decoding.ctc_weight == 0.3


def test_old_keys_in_overrides_and_dicts_move_and_removed_probe_settings_are_refused(tmp_path):
    with pytest.warns(ConfigRenamedWarning, match=r"'model.projector.ctc_weight' is now 'model.ctc.loss_weight'"):
        config = load_config(RunConfig, None, ["model.projector.ctc_weight=0.7"])
    assert config.model.ctc.loss_weight == 0.7
    with pytest.warns(ConfigRenamedWarning, match=r"'model.augment.time_masks' is now "
                                                  r"'model.feature_masking.time_masks'"):
        assert load_config(RunConfig, None, ["model.augment.time_masks=5"]).model.feature_masking.time_masks == 5
    with pytest.warns(ConfigRenamedWarning, match=r"'projector.ctc_vocab_chunk' is now 'ctc.vocab_chunk'"):
        assert from_dict(ModelConfig, {"projector": {"ctc_vocab_chunk": 64}}).ctc.vocab_chunk == 64
    # a new-style file under an old-style override: the override wins, no conflict
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  ctc: {loss_weight: 0.2}\n")
    with pytest.warns(ConfigRenamedWarning):
        assert load_config(RunConfig, path, ["model.projector.ctc_weight=0.5"]).model.ctc.loss_weight == 0.5
    # an old-style file extended by a new-style one: each file renamed, then merged
    (tmp_path / "old.yaml").write_text("model:\n  projector: {ctc_weight: 0.1, ctc_scale: 2.0}\n")
    (tmp_path / "top.yaml").write_text("extends: old.yaml\nmodel:\n  ctc: {loss_weight: 0.4}\n")
    with pytest.warns(ConfigRenamedWarning):
        top = load_config(RunConfig, tmp_path / "top.yaml")
    assert (top.model.ctc.loss_weight, top.model.ctc.scale) == (0.4, 2.0)
    # both names in one file: which one is meant is unclear
    path.write_text("model:\n  projector: {ctc_weight: 0.1}\n  ctc: {loss_weight: 0.4}\n")
    with pytest.raises(ConfigError, match=r"'model.projector.ctc_weight' is the old name of 'model.ctc.loss_weight'"):
        load_config(RunConfig, path)
    # removed probe settings: an error when they ask for the probe, a warning at their old default
    for override, key in [("model.projector.context_layers=2", "model.projector.context_layers"),
                          ("model.projector.context_kernel=3", "model.projector.context_kernel"),
                          ("model.projector.token_mixture=true", "model.projector.token_mixture"),
                          ("optim.fusion_lr_scale=20", "optim.fusion_lr_scale")]:
        with pytest.raises(ConfigError, match=rf"'{key}' was removed"):
            load_config(RunConfig, None, [override])
    path.write_text("optim:\n  fusion_lr_scale: 20\n")
    with pytest.raises(ConfigError, match=r"'optim.fusion_lr_scale' was removed.*set to 20"):
        load_config(RunConfig, path)
    path.write_text("optim:\n  fusion_lr_scale: 1.0\n  lr: 0.01\nmodel:\n  projector: {context_heads: 8}\n")
    with pytest.warns(ConfigRenamedWarning, match=r"'optim.fusion_lr_scale' was removed"):
        assert load_config(RunConfig, path).optim.lr == 0.01


def test_the_frozen_recipes_are_complete_and_mean_what_they_meant(monkeypatch):
    """Each recipe as the old loader resolved it (every field, old keys: tests/data/recipes_before.yaml),
    renamed by the table, is the stored file; the stored files extend nothing and set every field, so a
    changed default cannot reach them."""
    import harmonifuse.pretrained
    from harmonifuse.config.renames import migrate
    from harmonifuse.config.resolve import resolved_yaml

    monkeypatch.setattr(harmonifuse.pretrained, "find_model_folder", lambda name: name)  # runs/... of a fine-tune
    configs = DEMO_RECIPE.parent
    before = yaml.safe_load((Path(__file__).parent / "data" / "recipes_before.yaml").read_text())
    stored = sorted(str(p.relative_to(configs)) for p in [DEMO_RECIPE, *configs.glob("recipes/*.yaml")])
    assert sorted(before) == stored
    full = to_dict(RunConfig())
    for name, old in before.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigRenamedWarning)
            meant = from_dict(RunConfig, migrate(old))
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigRenamedWarning)  # stored in the new form
            assert load_config(RunConfig, configs / name) == meant, name
        text = (configs / name).read_text()
        raw = yaml.safe_load(text)
        assert "extends" not in raw, name
        assert resolved_yaml(RunConfig, configs / name) == text, f"{name}: not as `harmonifuse resolve` writes it"

        def keys(d, prefix=""):
            return {prefix + k for k, v in d.items()} | {x for k, v in d.items() if isinstance(v, dict) and v
                                                         and k not in ("train", "dev", "test", "limit", "fraction",
                                                                       "schedule_options", "mix", "prompts",
                                                                       "train_prompts")
                                                         for x in keys(v, prefix + k + ".")}
        assert keys(full) <= keys(raw), (name, sorted(keys(full) - keys(raw)))


def test_resolve_writes_a_complete_file_that_loads_the_same_and_keeps_the_comments(tmp_path):
    from harmonifuse.cli import main

    (tmp_path / "base.yaml").write_text("# the base\nmodel:\n  projector: {ctc_weight: 0.1}  # old key\n"
                                        "train:\n  # a comment on max_steps\n  max_steps: 10\n")
    (tmp_path / "top.yaml").write_text("# the top recipe\nextends: base.yaml\ntrain:\n  eval_every: 5  # often\n")
    out = tmp_path / "resolved.yaml"
    with pytest.warns(ConfigRenamedWarning):
        assert main(["resolve", str(tmp_path / "top.yaml"), "optim.lr=0.01", "-o", str(out), "--note", "resolved"]) == 0
        expected = load_config(RunConfig, tmp_path / "top.yaml", ["optim.lr=0.01"])
    text = out.read_text()
    assert text.startswith("# the top recipe\n# resolved\n") and "extends" not in text
    assert "  eval_every: 5  # often" not in text and "  # often\n  eval_every: 5\n" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigRenamedWarning)
        assert load_config(RunConfig, out) == expected
    assert to_dict(expected)["model"]["ctc"]["loss_weight"] == 0.1
