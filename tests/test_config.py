"""The strict config loader, overrides, presets and the write/read round trip."""

import dataclasses

import pytest

from fsynth.config import (
    ExperimentConfig,
    available_presets,
    build_config,
    config_from_dict,
    config_from_params,
    config_to_dict,
    flatten_config,
    load_config,
    parse_override,
    save_config,
    valid_keys,
    with_values,
)
from fsynth.errors import ConfigError


def test_presets_exist_and_differ():
    assert {"full", "lightweight", "embedded"} <= set(available_presets())
    full, light, embedded = (build_config(p) for p in ("full", "lightweight", "embedded"))
    assert full.generator.finetune.enabled and full.generator.images_per_class == 500
    assert full.partition.mode == "static" and full.training.epochs == 50
    assert not light.generator.finetune.enabled and light.generator.images_per_class == 64
    assert light.generator.negative_prompt == "distorted, unrealistic, blurry, out of frame"
    assert light.partition.mode == "online" and light.training.epochs == 150
    # Each preset's loss units are those of the reference it follows (its header); full's λ is the Aircraft recipe's.
    assert (full.loss.preset, full.loss.lambda_discrepancy, full.loss.lambda_robustness) == ("protoaug", 20, 200)
    assert (light.loss.preset, light.loss.lambda_discrepancy, light.loss.lambda_robustness) == (
        "protoaug-lightweight", 0.1, 1)
    assert embedded.loss.preset == "paper"
    assert embedded.data.dataset == "fashion-mnist" and embedded.generator.backend == "ddpm"
    assert embedded.model.head == "prototype" and embedded.model.arch == "efficientnet-lite0"


@pytest.mark.parametrize("preset", ["full", "lightweight", "embedded", None])
def test_round_trip_is_identical(tmp_path, preset):
    cfg = build_config(preset, overrides=["training.lr=2e-4", "model.lora.targets=[mlp]", "data.root=/x"])
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


def test_overrides_apply_in_order_and_parse_types(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("training:\n  lr: 1e-3\n  epochs: 7\n")
    cfg = build_config("full", files=[user], overrides=["training.epochs=9", "training.mixed_precision=false"])
    assert cfg.training.lr == pytest.approx(1e-3)  # PyYAML reads `1e-3` as a string; the loader makes it float
    assert cfg.training.epochs == 9 and cfg.training.mixed_precision is False
    assert cfg.generator.images_per_class == 500  # from the preset
    assert isinstance(build_config(overrides=["loss.ce_real_weight=1"]).loss.ce_real_weight, float)


def test_frozen():
    cfg = ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.lr = 1.0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.lrr=1", "unknown config key 'training.lrr'; valid keys in training: use_real"),
        ("trainin.lr=1", "unknown config key 'trainin'; valid keys in the top level: name, data"),
        ("training.lr=abc", "config key 'training.lr' must be float, got 'abc'"),
        ("training.epochs=1.5", "config key 'training.epochs' must be int, got 1.5"),
        ("training.epochs=true", "config key 'training.epochs' must be int, got True"),
        ("loss.preset=foo", "config key 'loss.preset' must be one of 'paper', 'protoaug', 'protoaug-lightweight', "
                            "got 'foo'"),
        ("model.lora.targets=mlp", "config key 'model.lora.targets' must be a list of str, got 'mlp'"),
        ("training=3", "config section 'training' must be a mapping, got 3"),
        ("data.shots=0", "data.shots must be at least 1, got 0"),
        ("training.lrr=1", "checkpoint_every, evaluate_test; did you mean 'training.lr'?"),
        ("loss.lambda_robustness=-1", "loss.lambda_robustness must be 0 or positive, got -1.0; pass 0 to switch"),
        ("partition.cluster_multiple=-2", "partition.cluster_multiple must be positive, got -2.0"),
        ("partition.iterations=0", "partition.iterations must be at least 1, got 0; set --set"),
        ("training.lr=0", "training.lr must be positive, got 0.0"),
        ("training.batch_size=0", "training.batch_size must be at least 1, got 0"),
        ("resources.num_workers=0", "resources.num_workers must be at least 1, got 0"),
        ("resources.gpus_per_worker=-1", "resources.gpus_per_worker must be 0 or positive, got -1.0"),
        ("nonsense", "is not of the form key=value"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        build_config(overrides=[override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_key_lists_every_valid_one():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"loss": {"lambda_1": 0.1}})
    for key in ("preset", "ce_real_weight", "ce_synth_weight", "lambda_discrepancy", "lambda_robustness"):
        assert key in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(files=[tmp_path / "missing.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(files=[broken])
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        build_config(files=[listy])
    with pytest.raises(ConfigError, match="unknown preset 'nope'; valid presets: embedded, full, lightweight"):
        build_config("nope")


def test_parse_override_nests_and_reads_yaml():
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert parse_override("name=") == {"name": ""}


def test_flatten_and_with_values():
    flat = flatten_config(ExperimentConfig())
    assert flat["training.lr"] == 1e-4 and flat["model.lora.rank"] == 16
    assert sorted(flat) == valid_keys()
    cfg = with_values(ExperimentConfig(), {"training.lr": 1e-5, "partition.cluster_multiple": 4})
    assert cfg.training.lr == 1e-5 and cfg.partition.cluster_multiple == 4.0
    with pytest.raises(ConfigError, match="unknown config key 'training.nope'"):
        with_values(cfg, {"training.nope": 1})


@pytest.mark.parametrize("preset", ["full", "lightweight", "embedded", None])
def test_params_read_back_to_the_same_config(preset):
    from fsynth.jobs.tracking import flat_params  # the strings a run's params hold, as the tune job logs them

    cfg = with_values(build_config(preset, overrides=["training.lr=2e-4", "model.lora.targets=[mlp]"]),
                      {"data.root": "1e-3", "generator.negative_prompt": "yes, no: [maybe]", "name": "123"})
    params = flat_params(cfg)
    assert all(isinstance(v, str) for v in params.values()) and params["training.lr"] == "0.0002"
    assert config_from_params(params) == cfg  # text fields stay text however YAML would read them


def test_params_read_back_ignore_unknown_keys_and_default_missing_ones():
    params = {"data.shots": "4", "loss.lambda_1": "0.1", "gone.section": "x", "partition.mode": "single"}
    cfg = config_from_params(params)  # keys an older fsynth logged and this one lacks are skipped, not an error
    assert cfg == with_values(ExperimentConfig(), {"data.shots": 4, "partition.mode": "single"})
    assert config_from_params({}) == ExperimentConfig()
    with pytest.raises(ConfigError, match="config key 'data.shots' must be int, got 'four'"):
        config_from_params({"data.shots": "four"})  # a known key's value is checked like a --set value


def test_concurrent_save_config_writers_do_not_collide(tmp_path):
    import threading

    configs = [build_config(p) for p in ("full", "lightweight")]
    path, errors = tmp_path / "config.yaml", []

    def writer(cfg):
        try:
            for _ in range(20):
                save_config(cfg, path)
        except Exception as exc:  # noqa: BLE001 - any failure of a writer fails the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(cfg,)) for cfg in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and load_config(path) in configs  # one whole file, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temp file left
