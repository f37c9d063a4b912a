"""fsynth.jobs.plan: the config, space, seeds and paths a `python -m fsynth.tune` command resolves to,
bad input refused before Ray starts, and the summary's regions line."""

from pathlib import Path

import pytest

from fsynth import tune
from fsynth.config import build_config
from fsynth.errors import ConfigError
from fsynth.jobs import plan as plan_module


def resolve(*argv: str) -> plan_module.Plan:
    return plan_module.resolve(tune.build_parser().parse_args(["--out", "/tmp/fsynth-test-out", *argv]))


def test_the_dataset_space_and_preset_are_picked_and_flags_win():
    plan = resolve("--dataset", "fashion-mnist")
    assert Path(plan.space.path).name == "fashion-mnist.yaml" and plan.cfg.model.arch == "efficientnet-lite0"
    assert plan.cfg.training.epochs == 3 and plan.cfg.data.test_per_class == 200  # demo.yaml's fixed values
    assert plan.seeds == [0, 1, 2] and plan.cfg.name == "method"
    plan = resolve("--dataset", "fashion-mnist", "--set", "training.epochs=7", "--shots", "4", "--seeds", "2",
                   "--baseline", "real-only", "--root", "rel/data")
    assert plan.cfg.training.epochs == 7 and plan.cfg.data.shots == 4 and plan.seeds == [0, 1]
    assert plan.cfg.name == "real-only" and not plan.cfg.training.use_synthetic
    assert Path(plan.cfg.data.root).is_absolute() and plan.out.is_absolute()
    dtd = resolve("--dataset", "dtd")
    assert Path(dtd.space.path).name == "default.yaml" and dtd.cfg.loss.preset == "protoaug"
    assert dtd.tracking_uri.startswith("sqlite:////") and dtd.storage == "/tmp/fsynth-test-out"


def test_the_ablation_space_fixes_the_demo_and_searches_nothing():
    plan = resolve("--dataset", "fashion-mnist", "--space", "ablation", "--set", "partition.cluster_multiple=4")
    assert plan.space.sample == () and plan.cfg.training.lr == 1e-4 and plan.seeds == [0, 1, 2]
    assert plan.cfg.training.epochs == 3 and plan.cfg.partition.cluster_multiple == 4.0  # demo's fixed + --set


@pytest.mark.parametrize(("argv", "message"), [
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--max-concurrent", "-1"], "--max-concurrent must be at least 1"),
    (["--space", "nope"], "does not exist; choose one of"),
    (["--set", "training.lrr=1"], "training.lrr"),
    (["--tracking-uri", "./mlruns"], "MLflow file store"),
])
def test_bad_input_is_one_line_before_anything_runs(argv, message):
    with pytest.raises(ConfigError) as info:
        resolve("--dataset", "fashion-mnist", *argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_space_that_samples_the_generator_is_refused(tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_text("preset: embedded\nsample:\n  generator.images_per_class: {grid: [16, 32]}\n")
    with pytest.raises(ConfigError, match="cannot be sampled: every trial shares one synthetic set"):
        resolve("--dataset", "fashion-mnist", "--space", str(path))


def test_the_summary_names_the_regions_and_the_mixing():
    cfg = build_config("embedded")
    rows = [{"mixing/synthetic_in_mixed": 0.5, "mixing/batch_synthetic_in_t": 0.25},
            {"mixing/synthetic_in_mixed": 0.7, "mixing/batch_synthetic_in_t": 0.35}]
    assert plan_module.regions_line(cfg, rows) == (
        "regions: static regions, outputs features, K = 2 x classes; mixing: 60 % of synthetic samples in a region "
        "with a real one, 30 % with one in their batch (last epoch, seed mean)")
    assert "mixing: - " in plan_module.regions_line(cfg, [{}])


def test_partition_variants_cover_the_grid():
    variants = plan_module.partition_variants(resolve("--dataset", "dtd"))
    assert variants == [{"partition.mode": "static", "partition.cluster_multiple": m} for m in (1.0, 2.0, 4.0)] + [
        {"partition.mode": "single", "partition.cluster_multiple": 1.0}]
    assert plan_module.partition_variants(resolve("--dataset", "eurosat", "--space", "lightweight")) == [
        {"partition.cluster_multiple": m} for m in (1.0, 2.0, 4.0)]


def test_tracking_storage_places_the_default_store(tmp_path):
    """tracking.storage is where the default sqlite store goes; --out otherwise; an explicit URI wins over both."""
    plan = resolve("--dataset", "fashion-mnist", "--set", f"tracking.storage={tmp_path / 'store'}")
    assert plan.tracking_uri == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert resolve("--dataset", "fashion-mnist").tracking_uri == "sqlite:////tmp/fsynth-test-out/mlflow.db"
    given = f"sqlite:///{tmp_path / 'other.db'}"
    assert resolve("--dataset", "fashion-mnist", "--set", f"tracking.storage={tmp_path}",
                   "--tracking-uri", given).tracking_uri == given
