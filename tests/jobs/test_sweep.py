"""The Tune side of fsynth.tune without a running sweep: param spaces, trial configs, names, concurrency, MLflow."""

import dataclasses

import pytest
import ray.tune
from ray.tune.search.sample import Categorical, Float, Integer

from fsynth.config import build_config, config_to_dict
from fsynth.errors import ConfigError
from fsynth.jobs import sweep, tracking
from fsynth.spaces import SPACE_DIR, list_spaces, load_space


def context(kind="trial", **base_overrides) -> sweep.TrialContext:
    cfg = build_config("embedded", overrides=[f"{k}={v}" for k, v in base_overrides.items()])
    return sweep.TrialContext(base=config_to_dict(cfg), fewshot_dir="/abs/fewshot", synthetic_manifest="/abs/m.parquet",
                              cache_dir="/abs/cache", train_storage="/abs/train", tracking_uri="sqlite:////abs/x.db",
                              experiment="fsynth", parent_run_id="p", sweep_id="s", tags=(), kind=kind)


def test_param_space_maps_every_sampler(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "preset: embedded\nsample:\n"
        "  training.lr: {loguniform: [1.0e-5, 1.0e-3]}\n"
        "  training.weight_decay: {uniform: [0.0, 0.01]}\n"
        "  training.batch_size: {randint: [8, 64]}\n"
        "  loss.preset: {choice: [paper, protoaug]}\n"
        "  loss.lambda_discrepancy,loss.lambda_robustness: {grid: [[0.1, 1.0], [2.0, 20.0]]}\n")
    params = sweep.param_space(load_space(path))
    assert isinstance(params["training.lr"], Float) and isinstance(params["training.weight_decay"], Float)
    assert isinstance(params["training.batch_size"], Integer)
    assert isinstance(params["loss.preset"], Categorical)
    assert params["loss.lambda_discrepancy,loss.lambda_robustness"] == {"grid_search": [[0.1, 1.0], [2.0, 20.0]]}


@pytest.mark.parametrize("name", list_spaces())
def test_every_shipped_space_becomes_a_tune_param_space(name):
    space = load_space(SPACE_DIR / f"{name}.yaml")
    params = sweep.param_space(space)
    assert set(params) == {",".join(s.keys) for s in space.sample}
    for key, value in params.items():  # a grid's first point turns back into valid dotted config values
        point = value["grid_search"][0] if isinstance(value, dict) else value.sample()
        values = sweep.sampled_values({key: point})
        assert set(values) == set(key.split(","))
        sweep.trial_config(context(), values)


def test_sampled_values_and_trial_config():
    values = sweep.sampled_values({"training.lr": 1e-3, "partition.mode,partition.cluster_multiple": ["single", 1.0]})
    assert values == {"training.lr": 1e-3, "partition.mode": "single", "partition.cluster_multiple": 1.0}
    trial = sweep.trial_config(context("trial"), values)
    assert trial.training.lr == 1e-3 and trial.partition.mode == "single"
    assert trial.training.evaluate_test is False  # sweep trials select on validation only
    assert trial.training.measure_regularisers is False
    final = sweep.trial_config(context("final"), values)
    assert final.training.evaluate_test is True and final.training.measure_regularisers is True
    with pytest.raises(ConfigError, match="training.lrr"):
        sweep.trial_config(context(), {"training.lrr": 1.0})


def test_train_run_names_are_deterministic_and_unique():
    ctx = context()
    cfg = sweep.trial_config(ctx, {"training.lr": 1e-3})
    name = sweep.train_run_name(ctx, cfg, 3)
    assert name == sweep.train_run_name(ctx, cfg, 3) and name.endswith("trial003")
    assert name != sweep.train_run_name(ctx, cfg, 4)
    assert name != sweep.train_run_name(ctx, sweep.trial_config(ctx, {"training.lr": 1e-4}), 3)
    final = sweep.with_kind(ctx, "final")
    assert sweep.train_run_name(final, sweep.trial_config(final, {}), 3) != name
    other = dataclasses.replace(ctx, sweep_id="another-sweep")  # same config in another sweep: its own Train run
    assert sweep.train_run_name(other, cfg, 3) != name


def test_sweep_id_changes_with_config_space_and_inputs():
    space = load_space(SPACE_DIR / "demo.yaml")
    cfg = space.base_config()
    sid = sweep.sweep_id(cfg, space, {"fewshot": "/a"})
    assert sid == sweep.sweep_id(cfg, space, {"fewshot": "/a"}) and sid.startswith("fashion-mnist-embedded-demo-")
    assert sid != sweep.sweep_id(cfg, space, {"fewshot": "/b"})
    assert sid != sweep.sweep_id(space.base_config(("training.batch_size=32",)), space, {"fewshot": "/a"})
    assert sid != sweep.sweep_id(cfg, load_space(SPACE_DIR / "smoke.yaml"), {"fewshot": "/a"})


@pytest.mark.parametrize(("overrides", "cluster", "existing", "expected"), [
    ({"resources.cpus_per_worker": 1}, {"CPU": 2.0}, False, 2),  # a 2-core laptop: two 1-CPU trials
    ({"resources.cpus_per_worker": 2}, {"CPU": 2.0}, False, 1),
    ({"resources.num_workers": 2, "resources.cpus_per_worker": 1}, {"CPU": 8.0}, False, 4),
    ({"resources.gpus_per_worker": 1, "resources.cpus_per_worker": 4}, {"CPU": 64.0, "GPU": 8.0}, False, 8),
    ({"resources.gpus_per_worker": 0.5, "resources.cpus_per_worker": 2}, {"CPU": 16.0, "GPU": 2.0}, False, 4),
    ({"resources.gpus_per_worker": 1}, {"CPU": 4.0}, True, 1),  # an autoscaling cluster adds GPU nodes
])
def test_max_concurrent_is_derived_from_the_resources(overrides, cluster, existing, expected):
    cfg = build_config("embedded", overrides=[f"{k}={v}" for k, v in overrides.items()])
    assert sweep.derive_max_concurrent(cfg, cluster, on_existing_cluster=existing) == expected


def test_a_gpu_asked_for_where_there_is_none_fails_before_any_trial():
    cfg = build_config("full")
    with pytest.raises(ConfigError) as info:
        sweep.derive_max_concurrent(cfg, {"CPU": 2.0}, on_existing_cluster=False)
    assert "GPU" in str(info.value) and "gpus_per_worker=0" in str(info.value) and "\n" not in str(info.value)


def test_final_params_fix_the_best_values_and_grid_the_seeds():
    params = sweep.final_params({"training.lr": 1e-3}, [0, 1, 2])
    assert params == {"training.lr": 1e-3, "training.seed": ray.tune.grid_search([0, 1, 2])}


def test_the_final_stage_is_named_by_its_seeds_so_a_rerun_with_more_seeds_is_not_the_old_grid():
    # a rerun of a 3-seed command with --seeds 5 once restored the 3-seed Tune experiment and reported 3 seeds
    names = {sweep.final_name("s1", seeds) for seeds in ([0, 1, 2], [0, 1, 2, 3, 4], [1, 2, 3], [0, 2, 5])}
    assert len(names) == 4 and all(n.startswith("s1-final") for n in names)
    assert sweep.final_name("s1", [0, 1, 2]) == sweep.final_name("s1", [0, 1, 2])


def test_mlflow_callback_and_child_runs_against_a_real_store(tmp_path):
    uri = tracking.resolve_tracking_uri(str(tmp_path / "mlflow.db"))
    parent = tracking.start_run(uri, "fsynth", "sweep")
    ctx = sweep.TrialContext(**{**context().__dict__, "tracking_uri": uri, "parent_run_id": parent})
    cfg = sweep.trial_config(ctx, {"training.lr": 1e-3})
    run_id = sweep.ensure_child_run(ctx, "name-trial000", cfg, {"fsynth.values": "{}"})
    assert sweep.ensure_child_run(ctx, "name-trial000", cfg, {}) == run_id  # a retried trial reuses its run
    assert sweep.ensure_child_run(ctx, "name-trial001", cfg, {}) != run_id
    callback = sweep.MlflowTrainCallback(uri, run_id)
    for epoch in range(2):
        callback.after_report(None, [{"epoch": epoch, "val/accuracy": 0.5 + epoch / 10, "train/loss": 1.0}], None)
    history = sweep.metric_history(uri, run_id)
    assert [h["epoch"] for h in history] == [0, 1] and history[1]["val/accuracy"] == pytest.approx(0.6)
    run = tracking.client_for(uri).get_run(run_id)
    assert run.data.tags[tracking.PARENT_TAG] == parent and run.data.tags[sweep.KIND_TAG] == "trial"
    assert run.data.params["training.lr"] == "0.001" and run.data.params["training.evaluate_test"] == "False"


def test_result_index_reads_the_trial_slot_even_when_the_id_is_all_digits():
    from types import SimpleNamespace

    def result(path, metrics=None):
        return SimpleNamespace(path=path, metrics=metrics)

    name = "/s/run_trial_12230_00002_2_partition_mode=static,training_lr=0.0010_2026-11-25_19-11-22"
    assert sweep._result_index(result(name)) == 2
    assert sweep._result_index(result("/s/run_trial_a9f0e_00013_13_x=1")) == 13
    assert sweep._result_index(result(name, {"trial_id": "12230_00003"})) == 3
