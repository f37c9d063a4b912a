"""The Ray Tune side of `fsynth.tune`: search space -> Tune param space, the trial trainable, MLflow per trial.

A trial is a Tune function trainable that builds and fits one `TorchTrainer` (fsynth.jobs.training) whose workers run
the one loop; Train's reports reach Tune through `TuneReportCallback` and MLflow through `MlflowTrainCallback`.
The same trainable runs the sweep's trials (validation only, no test) and the final seeds (tested once).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
from ray.train.v2.api.callback import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback

from fsynth import tags
from fsynth.cache import content_key
from fsynth.config import ExperimentConfig, config_from_dict, config_to_dict, save_config, with_values
from fsynth.errors import ConfigError, FsynthError
from fsynth.jobs import tracking
from fsynth.jobs.training import build_trainer, job_name
from fsynth.spaces import SearchSpace, TuneSettings

KIND_TAG, SWEEP_TAG, TRAIN_NAME_TAG = tags.KIND, tags.SWEEP, tags.TRAIN_NAME
MIXING_KEYS = ("mixing/synthetic_in_mixed", "mixing/batch_synthetic_in_t", "mixing/regions_mixed")
CURVE_KEYS = ("train/loss", "train/ce_real", "train/ce_synth", "train/discrepancy", "train/robustness",
              "train/accuracy", "val/accuracy", "measured/discrepancy", "measured/robustness", *MIXING_KEYS)


def param_space(space: SearchSpace) -> dict[str, Any]:
    """Tune's param space: one entry per sampler, keyed by its comma-joined dotted keys."""
    samplers = {"grid": ray.tune.grid_search, "choice": ray.tune.choice}
    ranges = {"uniform": ray.tune.uniform, "loguniform": ray.tune.loguniform, "randint": ray.tune.randint}
    out: dict[str, Any] = {}
    for s in space.sample:
        values = [list(v) if isinstance(v, tuple) else v for v in s.values]
        out[",".join(s.keys)] = samplers[s.kind](values) if s.kind in samplers else ranges[s.kind](*values)
    return out


def sampled_values(trial_config: dict) -> dict[str, Any]:
    """A trial's config (keys as in `param_space`) as dotted config keys -> values."""
    values: dict[str, Any] = {}
    for joined, value in trial_config.items():
        keys = joined.split(",")
        values.update(zip(keys, value, strict=True) if len(keys) > 1 else {joined: value})
    return values


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its sampled values; plain strings, so it pickles to any node."""

    base: dict  # the resolved base config (config_to_dict)
    fewshot_dir: str
    synthetic_manifest: str | None
    cache_dir: str
    train_storage: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    sweep_id: str
    tags: tuple[tuple[str, str], ...]  # dataset, baseline, space: on every run of the sweep
    kind: str = "trial"  # "trial" (validation only) or "final" (tested once)


def trial_config(ctx: TrialContext, values: dict[str, Any]) -> ExperimentConfig:
    """The config one trial trains: the base with its sampled values. Sweep trials never evaluate the test set and
    skip the Figure 2 measurement pass (selection does not use it; the loss parts are still logged every epoch);
    the final seeds do both."""
    cfg = with_values(config_from_dict(ctx.base), values)
    final = ctx.kind == "final"
    return with_values(cfg, {"training.evaluate_test": final,
                             "training.measure_regularisers": final and cfg.training.measure_regularisers})


def train_run_name(ctx: TrialContext, cfg: ExperimentConfig, index: int) -> str:
    """Deterministic and unique per sweep, trial slot and config: a rerun of the same trial resumes its Train run.

    The sweep's id is part of it: two sweeps with the same config (an ablation that repeats the main run's best
    values) each train and log their own runs rather than share, or race on, one Train folder."""
    base = job_name(cfg, fewshot_dir=ctx.fewshot_dir, synthetic_manifest=ctx.synthetic_manifest)
    sweep = content_key(ctx.sweep_id, 6)
    return f"{base}-{sweep}-{ctx.kind}{index:03d}"


def trial_slot(trial_id: str) -> int | None:
    """The trial's position in the sweep from its Tune id (<5 hex>_00003 -> 3), stable across a restore."""
    match = re.fullmatch(r"[0-9a-f]+_(\d+)", trial_id or "")
    return int(match.group(1)) if match else None


def _trial_index() -> int:
    return trial_slot(ray.tune.get_context().get_trial_id()) or 0


def ensure_child_run(ctx: TrialContext, name: str, cfg: ExperimentConfig, extra_tags: dict[str, str]) -> str:
    """The trial's nested MLflow run: the one a previous attempt of the same Train run opened, else a new one."""
    run_id, created = tracking.reopen_or_start_run(
        ctx.tracking_uri, ctx.experiment, name, match={TRAIN_NAME_TAG: name}, parent_run_id=ctx.parent_run_id,
        tags={**dict(ctx.tags), KIND_TAG: ctx.kind, SWEEP_TAG: ctx.sweep_id, **extra_tags})
    if created:  # params and the resolved config at the start: a trial ASHA stops early still has both
        tracking.log_params(ctx.tracking_uri, run_id, cfg)
        with tempfile.TemporaryDirectory(prefix="fsynth-config-") as tmp:
            tracking.log_artifacts(ctx.tracking_uri, run_id, save_config(cfg, Path(tmp) / "config.yaml"))
    return run_id


class MlflowTrainCallback(UserCallback):
    """Ray Train callback (runs in the Train controller): every report of rank 0 becomes MLflow metrics."""

    def __init__(self, uri: str, run_id: str):
        self.reporter = tracking.MlflowReporter(uri, run_id)

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self.reporter(metrics[0], checkpoint.path if checkpoint is not None else None)


def run_trial(config: dict, ctx: TrialContext) -> None:
    """One Tune trial: fit a TorchTrainer for the sampled config, reporting to Tune and MLflow; log artifacts."""
    values = sampled_values(config)
    cfg = trial_config(ctx, values)
    name = train_run_name(ctx, cfg, _trial_index())
    extra = {tags.SEED: str(cfg.training.seed)} if ctx.kind == "final" else {}
    run_id = ensure_child_run(ctx, name, cfg, {**extra, tags.VALUES: json.dumps(values, sort_keys=True)})
    # MLflow first: Tune may stop the trial (ASHA) as soon as it sees a result, before later callbacks run.
    trainer = build_trainer(cfg, fewshot_dir=ctx.fewshot_dir, synthetic_manifest=ctx.synthetic_manifest,
                            cache_dir=ctx.cache_dir, storage=ctx.train_storage, name=name,
                            callbacks=[MlflowTrainCallback(ctx.tracking_uri, run_id), TuneReportCallback()])
    result = trainer.fit()  # a failure or an ASHA stop leaves the run RUNNING: settle_runs ends it from Tune's view
    if result.error is not None:
        raise result.error
    log_run_artifacts(ctx, run_id, cfg, result.checkpoint)
    tracking.end_run(ctx.tracking_uri, run_id, "FINISHED")


def _result_index(result) -> int:
    """A Tune result's trial slot: the tail of its trial id (<5 hex>_00003), from the metrics or the trial
    directory name (run_trial_<5 hex>_00003_3_...). The hex part may be all digits, so it is matched as a pair."""
    slot = trial_slot(str((result.metrics or {}).get("trial_id", "")))
    if slot is not None:
        return slot
    match = re.search(r"_[0-9a-f]{5}_(\d{5})(?:_|$)", Path(result.path).name)
    return int(match.group(1)) if match else 0


def settle_runs(grid, ctx: TrialContext) -> dict[str, int]:
    """End every trial's MLflow run as Tune saw it: FINISHED (completed), KILLED (stopped early by the scheduler)
    or FAILED (an error); return the counts. Runs a trial already ended are left as they are."""
    counts: dict[str, int] = {}
    for r in grid:
        name = train_run_name(ctx, trial_config(ctx, sampled_values(r.config)), _result_index(r))
        status = "FAILED" if r.error is not None else (
            "FINISHED" if r.metrics and "best/val_accuracy" in r.metrics else "KILLED")
        counts[status] = counts.get(status, 0) + 1
        tracking.end_open_children(ctx.tracking_uri, ctx.parent_run_id, status, tags={TRAIN_NAME_TAG: name})
    return counts


def metric_history(uri: str, run_id: str, keys: tuple[str, ...] = CURVE_KEYS) -> list[dict]:
    """The run's per-epoch metrics from MLflow, as fit's history (a list of {'epoch': e, key: value})."""
    client = tracking.client_for(uri)
    epochs: dict[int, dict] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            epochs.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return [epochs[e] for e in sorted(epochs)]


def log_run_artifacts(ctx: TrialContext, run_id: str, cfg: ExperimentConfig, checkpoint) -> None:
    """The curves of every finished run; for final runs also the adapters and the test confusion matrix."""
    from fsynth.plots import plot_confusion, plot_regulariser_curves, save_confusion_csv

    uri = ctx.tracking_uri
    with tempfile.TemporaryDirectory(prefix="fsynth-artifacts-") as tmp:
        tmp = Path(tmp)
        history = metric_history(uri, run_id)
        title = f"{cfg.data.dataset} {cfg.name} seed {cfg.training.seed}"
        tracking.log_artifacts(uri, run_id, plot_regulariser_curves(history, tmp / "curves.png", title=title))
        if ctx.kind != "final" or checkpoint is None:
            return
        final = Path(checkpoint.to_directory(str(tmp / "final")))
        tracking.log_artifacts(uri, run_id, final / "adapters.safetensors", "model")
        confusion_csv = final / "confusion_test.csv"
        if confusion_csv.is_file():
            import numpy as np

            confusion = np.loadtxt(confusion_csv, delimiter=",", dtype=np.int64, ndmin=2)
            names = json.loads((Path(ctx.fewshot_dir) / "fewshot.json").read_text())["classnames"]
            tracking.log_artifacts(uri, run_id, save_confusion_csv(confusion, names, tmp / "confusion_test.csv"))
            tracking.log_artifacts(uri, run_id, plot_confusion(confusion, names, tmp / "confusion_test.png",
                                                               title=f"{title}: test"))


def per_trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one trial's Train workers hold (the trial function and Train controller take no CPU)."""
    r = cfg.resources
    return {"CPU": r.num_workers * r.cpus_per_worker, "GPU": r.num_workers * r.gpus_per_worker}


def derive_max_concurrent(cfg: ExperimentConfig, cluster: dict[str, float], on_existing_cluster: bool) -> int:
    """Trials that fit at once on `cluster` (ray.cluster_resources()); a GPU request with no GPU fails here.

    On an existing (possibly autoscaling) cluster with no GPU yet, one trial is started and the autoscaler adds
    nodes; on this machine alone a GPU request can never be met, so it is a one-line error before any trial.
    """
    need = per_trial_resources(cfg)
    counts = []
    for kind, each in need.items():
        if each <= 0:
            continue
        have = cluster.get(kind, 0.0)
        if have < each and not on_existing_cluster:
            fix = " (--set resources.gpus_per_worker=0 trains on CPUs)" if kind == "GPU" else ""
            raise ConfigError(f"one trial needs {each:g} {kind} (resources.num_workers x {kind.lower()}s_per_worker)"
                              f" but this machine has {have:g}; lower resources.{kind.lower()}s_per_worker{fix}")
        counts.append(math.floor(have / each + 1e-9))
    return max(1, min(counts) if counts else 1)


# The trial function only waits on its TorchTrainer (whose controller takes no CPU); a CPU here would stop a
# 2-core laptop from running two 1-CPU trials. Tune needs some resource per trial, so it reserves memory.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}


def trial_trainable(ctx: TrialContext):
    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, ctx=ctx), TRIAL_DRIVER_RESOURCES)


def build_tuner(ctx: TrialContext, params: dict, settings: TuneSettings, *, name: str, storage: str,
                max_concurrent: int, seed: int, final: bool) -> ray.tune.Tuner:
    """A Tuner over `run_trial`: ASHA (sweep) or FIFO (final seeds), deterministic sampling, resumable by name."""
    scheduler = None
    if settings.scheduler == "asha" and not final:
        # Iterations = epochs + 1 (fit's final report); stop_last_trials=False lets a trial that reaches the end
        # finish its final report and artifacts instead of being stopped at max_t.
        epochs = max(1, config_from_dict(ctx.base).training.epochs)
        scheduler = ray.tune.schedulers.ASHAScheduler(
            time_attr="training_iteration", max_t=epochs, grace_period=min(settings.grace_period, epochs),
            reduction_factor=settings.reduction_factor, stop_last_trials=False)
    # The generator's own limit: Tune ignores max_concurrent_trials when given a search generator.
    search = ray.tune.search.BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
    return ray.tune.Tuner(
        trial_trainable(ctx), param_space=params,
        tune_config=ray.tune.TuneConfig(metric=settings.metric, mode=settings.mode, scheduler=scheduler,
                                        search_alg=search, num_samples=1 if final else settings.num_samples),
        run_config=ray.tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                      failure_config=ray.tune.FailureConfig(max_failures=0)))


def restore_or_build(ctx: TrialContext, params: dict, settings: TuneSettings, *, name: str, storage: str,
                     max_concurrent: int, seed: int, final: bool, log=print) -> ray.tune.Tuner:
    """The sweep `storage/name`: restored when an earlier attempt left it (finished trials are not rerun)."""
    path = f"{storage.rstrip('/')}/{name}"
    if ray.tune.Tuner.can_restore(path):
        log(f"resuming {path}: finished trials are kept, unfinished and errored ones continue")
        return ray.tune.Tuner.restore(path, trainable=trial_trainable(ctx), resume_unfinished=True,
                                      resume_errored=True)
    return build_tuner(ctx, params, settings, name=name, storage=storage, max_concurrent=max_concurrent,
                       seed=seed, final=final)


def error_cause(error: BaseException | None) -> str:
    """A trial's error as one readable line: its last line, without Ray's terminal colours, cut to 200 chars."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    return (lines[-1] if lines else "no error recorded")[:200]


def best_values(grid, settings: TuneSettings) -> tuple[dict[str, Any], float]:
    """The sampled values of the best trial on validation (any epoch of any trial) and its score."""
    finished = [r for r in grid if r.metrics and settings.metric in r.metrics]
    if not finished:
        errors = [error_cause(r.error) for r in grid if r.error is not None]
        raise FsynthError("no trial of the sweep reported " + settings.metric
                          + (f"; first error: {errors[0]}" if errors else "") + "; see the Tune logs above")
    best = grid.get_best_result(metric=settings.metric, mode=settings.mode, scope="all")
    score = best.metrics_dataframe[settings.metric].agg(settings.mode) if best.metrics_dataframe is not None \
        else best.metrics[settings.metric]
    return sampled_values(best.config), float(score)


def final_name(sweep_id: str, seeds: list[int]) -> str:
    """The final stage's Tune experiment: keyed by its seeds too, so that a rerun asking other seeds builds the
    grid it asks for instead of restoring the old one (each seed's Train run still resumes by its own name)."""
    return f"{sweep_id}-final-seeds{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[0] + len(seeds))) \
        else f"{sweep_id}-final-seeds{'_'.join(map(str, seeds))}"


def final_params(values: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """The final stage's param space: the best values fixed, the training seed as a grid."""
    return {**values, "training.seed": ray.tune.grid_search(seeds)}


def final_results(grid) -> list[dict]:
    """Per seed: seed, test accuracy, best validation accuracy and epoch (sorted by seed)."""
    rows = []
    for r in grid:
        if r.metrics is None or "test/accuracy" not in r.metrics:
            raise FsynthError(f"the final run of seed {r.config.get('training.seed')} did not finish "
                              f"({error_cause(r.error)}); rerun the same command to continue")
        rows.append({"seed": int(r.config["training.seed"]), "test_accuracy": float(r.metrics["test/accuracy"]),
                     "val_accuracy": float(r.metrics["best/val_accuracy"]),
                     "best_epoch": int(r.metrics["best/epoch"]),
                     **{k: float(r.metrics[k]) for k in MIXING_KEYS if k in r.metrics}})
    return sorted(rows, key=lambda row: row["seed"])


def sweep_id(cfg: ExperimentConfig, space: SearchSpace, inputs: dict) -> str:
    """Deterministic per config, space and inputs: the same command finds (and resumes) the same sweep."""
    key = {"config": config_to_dict(cfg), "sample": [(s.keys, s.kind, s.values) for s in space.sample],
           "tune": config_to_dict(space.tune), "inputs": inputs}
    return f"{cfg.data.dataset}-{cfg.name}-{Path(space.path).stem}-{content_key(key, 10)}"


def with_kind(ctx: TrialContext, kind: str) -> TrialContext:
    return replace(ctx, kind=kind)
