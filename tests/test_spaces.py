"""Every search space in tune_spaces/ loads and is checked against the config before any trial."""

import pytest

from fsynth.errors import ConfigError
from fsynth.spaces import SPACE_DIR, list_spaces, load_space, space_path


@pytest.mark.parametrize("name", list_spaces())
def test_every_space_file_loads_and_has_a_header(name):
    path = SPACE_DIR / f"{name}.yaml"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("python -m fsynth.tune" in line for line in header), "the header gives the run command"
    assert any(line.startswith("# Expect") for line in header), "the header says what to expect"
    space = load_space(path)
    assert space.tune.metric.startswith("val/"), "select on validation, never test"
    assert space.sample or name in ("ablation", "evidence"), "only fixed-budget spaces search nothing (final seeds)"
    space.base_config()


def test_default_is_the_papers_grid():
    space = load_space(SPACE_DIR / "default.yaml")
    grid = {s.keys: s.values for s in space.sample}
    assert grid[("training.lr",)] == (2e-4, 1e-4, 1e-5, 1e-6)
    assert grid[("training.weight_decay",)] == (1e-3, 5e-4, 1e-4)
    assert grid[("loss.lambda_discrepancy", "loss.lambda_robustness")] == (
        (0.1, 1.0), (2.0, 20.0), (20.0, 200.0), (50.0, 500.0))
    assert grid[("partition.mode", "partition.cluster_multiple")] == (
        ("static", 1.0), ("static", 2.0), ("static", 4.0), ("single", 1.0))
    assert space.base_config().loss.preset == "protoaug"


def test_dataset_file_is_picked_and_inherits():
    assert space_path("stanford_cars").name == "stanford_cars.yaml"
    assert space_path("fashion-mnist").name == "fashion-mnist.yaml"
    assert load_space(space_path("fashion-mnist")).sample == load_space(SPACE_DIR / "demo.yaml").sample
    assert space_path("dtd").name == "default.yaml"
    assert space_path("dtd", "lightweight").name == "lightweight.yaml"
    cars = load_space(space_path("stanford_cars"))
    assert cars.base_config().loss.ce_real_weight == 1.0 and len(cars.sample) == 4


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("sample:\n  training.lrr: {grid: [1]}\n", "'training.lrr' is not a config key; valid keys here: training."),
        ("fixed:\n  loss.nope: 1\n", "'loss.nope' is not a config key"),
        ("sample:\n  training.lr: {grid: [abc]}\n", "config key 'training.lr' must be float, got 'abc'"),
        ("sample:\n  training.lr: {normal: [0, 1]}\n", "needs exactly one of grid, choice, uniform"),
        ("sample:\n  training.lr: {uniform: [1]}\n", "takes one key and [low, high]"),
        ("sample:\n  loss.lambda_discrepancy,loss.lambda_robustness: {grid: [1, 2]}\n",
         "samples 2 keys together: every value must be a list of 2"),
        ("tune:\n  metric_name: x\n", "unknown config key 'tune.metric_name'"),
        ("search: {}\n", "unknown section 'search'"),
    ],
)
def test_bad_spaces_fail_before_any_trial(tmp_path, body, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_missing_space_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; choose one of ablation, default, demo, evidence, "
                                          "evidence-lambda, fashion-mnist, lightweight, smoke, stanford_cars"):
        load_space(tmp_path / "nope.yaml")
