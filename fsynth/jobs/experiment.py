"""The experiment of `python -m fsynth.tune`, top to bottom: plan -> cached stages (data, synthetic set, regions)
-> the Tune sweep over Train -> the final seeds -> the summary."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import ray
import ray.tune

from fsynth import tags
from fsynth.baselines import needs_synthetic
from fsynth.batch_regions import uses_outputs
from fsynth.cli import require_gpus
from fsynth.config import (
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    save_config,
    with_values,
)
from fsynth.errors import ConfigError
from fsynth.generators import check_source
from fsynth.jobs import sweep, tracking
from fsynth.jobs.generation import one_line_task_errors
from fsynth.jobs.plan import Plan, format_summary, partition_variants, summarise
from fsynth.models import check_model
from fsynth.stages import ensure_fewshot
from fsynth.trainset import check_regions

Log = Callable[[str], None]


def _print_now(line: str) -> None:
    print(line, flush=True)


def run_tune(plan: Plan, args: argparse.Namespace) -> dict:
    """Run (or continue) the whole experiment of `plan` (`fsynth.jobs.plan.resolve` of the command's `args`);
    return the summary."""
    return run_experiment(plan, address=args.address or os.environ.get("RAY_ADDRESS"),
                          max_concurrent=args.max_concurrent, num_samples=args.num_samples,
                          require_resume=args.resume, log=_print_now)


@ray.remote
def _regions_task(cfg_dict: dict, fewshot_dir: str, synthetic: str | None, cache_dir: str) -> str:
    """Build (or find) one partition's static regions where a training worker would: on its resources."""
    from fsynth.loop import pick_device
    from fsynth.stages import setup_run

    cfg = config_from_dict(cfg_dict)
    setup_run(cfg, fewshot_dir, synthetic, cache_dir, pick_device(), check=False)  # checked by the driver
    p = cfg.partition
    return f"{p.mode} x{p.cluster_multiple:g}"


@ray.remote
def _quality_task(cfg_dict: dict, fewshot_dir: str, manifest: str) -> dict | None:
    from fsynth.generation import ensure_quality
    from fsynth.loop import pick_device

    return ensure_quality(config_from_dict(cfg_dict), fewshot_dir, manifest, pick_device())


def ensure_regions_on_cluster(cfg: ExperimentConfig, variants: list[dict], fewshot: Path, synthetic: Path | None,
                              cache_dir: Path, log: Log) -> None:
    """Static regions for every partition of the space, one Ray task each (cached: a rerun only loads them)."""
    cfgs = [with_values(cfg, v) for v in variants]
    # prediction-space regions are fitted by each run's loop on its starting model: nothing to build here
    cfgs = [c for c in cfgs if c.partition.mode == "static" and not uses_outputs(c) and cfg.training.epochs > 0]
    r = cfg.resources
    task = _regions_task.options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)
    refs = [task.remote(config_to_dict(c), str(fewshot), str(synthetic) if synthetic else None, str(cache_dir))
            for c in cfgs]
    with one_line_task_errors():
        for done in ray.get(refs):
            log(f"regions ready: {done}")


def ensure_synthetic(cfg: ExperimentConfig, fewshot: Path, root: Path, log: Log) -> Path | None:
    """The synthetic set of the sweep (generated or finished by the Ray Data job) and its quality signal."""
    if not needs_synthetic(cfg):
        log("synthetic set: not needed by this baseline")
        return None
    from fsynth.jobs.generation import run_generation_job

    manifest = run_generation_job(cfg, fewshot, root, log=log)
    r = cfg.resources
    quality = _quality_task.options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker)
    with one_line_task_errors():
        metrics = ray.get(quality.remote(config_to_dict(cfg), str(fewshot), str(manifest)))
    if metrics:
        log("synthetic quality: " + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()
                                               if isinstance(v, float)))
    log(f"synthetic set: {manifest}")
    return manifest


def ensure_sweep_run(uri: str, experiment: str, sid: str, run_tags: dict[str, str], cfg: ExperimentConfig) -> str:
    """The sweep's parent MLflow run: the one an interrupted attempt opened (marked running again), else new."""
    run_id, created = tracking.reopen_or_start_run(uri, experiment, sid, tags=run_tags,
                                                   match={sweep.SWEEP_TAG: sid, sweep.KIND_TAG: "sweep"})
    if created:
        tracking.log_params(uri, run_id, cfg)
    return run_id


def log_sweep_inputs(uri: str, run_id: str, plan: Plan, fewshot: Path, synthetic: Path | None) -> None:
    """The space file, the resolved base config, the synthetic sample grid and, beside it, the real shots in the
    same layout (synthetic/real_shots.png: a row per class; fsynth.report shows the two side by side), and the
    set's quality.json figures as `synthetic/<name>` metrics (fsynth.report's recognisability column)."""
    from fsynth.plots import write_shot_grid
    from fsynth.quality import QUALITY_NAME, load_quality

    with tempfile.TemporaryDirectory(prefix="fsynth-sweep-") as tmp:
        tracking.log_artifacts(uri, run_id, save_config(plan.cfg, Path(tmp) / "base_config.yaml"))
        tracking.log_artifacts(uri, run_id, write_shot_grid(fewshot, Path(tmp) / "real_shots.png"), "synthetic")
    tracking.log_artifacts(uri, run_id, plan.space.path, "space")
    grid = synthetic.parent / "samples.png" if synthetic else None
    if grid is not None and grid.is_file():
        tracking.log_artifacts(uri, run_id, grid, "synthetic")
    quality = synthetic.parent / QUALITY_NAME if synthetic else None
    if quality is not None and quality.is_file():
        tracking.MlflowReporter(uri, run_id)({f"synthetic/{k}": v for k, v in load_quality(quality).items()})


def concurrency(plan: Plan, explicit: int | None, address: str | None) -> int:
    """Trials at once: --max-concurrent, else the space's tune.max_concurrent, else what the cluster fits."""
    return explicit or plan.space.tune.max_concurrent or sweep.derive_max_concurrent(
        plan.cfg, ray.cluster_resources(), on_existing_cluster=bool(address))


def check_partitions(plan: Plan, fewshot: Path) -> None:
    """Every partition a trial can get fits the images it partitions (the shots and the synthetic set to come)."""
    info = json.loads((fewshot / "fewshot.json").read_text())
    classes = int(info["num_classes"])
    for variant in partition_variants(plan):
        check_regions(with_values(plan.cfg, variant), classes, int(info["counts"]["train"]),
                      plan.cfg.generator.images_per_class * classes)


def check_machine(cfg: ExperimentConfig) -> None:
    """What a local run would find only once Ray runs (or never: a GPU it waits for), found in seconds: the GPUs
    asked for, the classifier's weights and the generator's model."""
    r = cfg.resources
    require_gpus(r.gpus_per_worker, "resources.gpus_per_worker")
    check_model(cfg.model)
    if needs_synthetic(cfg):
        require_gpus(r.gpus_per_generator_actor, "resources.gpus_per_generator_actor")
        check_source(cfg.generator)


def run_stages(plan: Plan, address: str | None, log: Log) -> tuple[Path, Path | None]:
    """Few-shot data and the tracking store before Ray starts (a missing dataset or an unreachable store fails in
    seconds, before any compute), then Ray, then the synthetic set."""
    tracking.check_reachable(plan.tracking_uri)
    fewshot = ensure_fewshot(plan.cfg, plan.out / "synthetic" / "fewshot")
    log(f"few-shot data: {fewshot}")
    check_partitions(plan, fewshot)
    if not address:  # on a cluster, the GPUs, weights and model cache are the workers'
        check_machine(plan.cfg)
    tracking.ensure_experiment(tracking.client_for(plan.tracking_uri), plan.experiment)
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    log(f"Ray: {ray.cluster_resources()}")
    synthetic = ensure_synthetic(plan.cfg, fewshot, plan.out / "synthetic", log)
    return fewshot, synthetic


def run_experiment(plan: Plan, *, address: str | None, max_concurrent: int | None, num_samples: int | None,
                   require_resume: bool, log: Log = print) -> dict:
    """Every stage of the experiment in `plan` (fsynth.jobs.plan.Plan); returns the summary."""
    cfg, uri = plan.cfg, plan.tracking_uri
    fewshot, synthetic = run_stages(plan, address, log)
    space = plan.space
    if num_samples:
        space = replace(space, tune=replace(space.tune, num_samples=num_samples))
    sid = sweep.sweep_id(cfg, space, {"fewshot": str(fewshot), "synthetic": str(synthetic)})
    tune_storage = f"{plan.storage.rstrip('/')}/tune"
    if require_resume and not ray.tune.Tuner.can_restore(f"{tune_storage}/{sid}"):
        raise ConfigError(f"--resume: no interrupted sweep {sid} under {tune_storage}; drop --resume to start it")
    run_tags = {tags.DATASET: cfg.data.dataset, tags.BASELINE: cfg.name, tags.SPACE: Path(space.path).stem}
    if plan.command:
        run_tags[tags.COMMAND] = plan.command
    parent = ensure_sweep_run(uri, plan.experiment, sid, run_tags, cfg)
    try:
        log_sweep_inputs(uri, parent, plan, fewshot, synthetic)
        ensure_regions_on_cluster(cfg, partition_variants(plan), fewshot, synthetic, plan.out / "cache", log)
        ctx = sweep.TrialContext(
            base=config_to_dict(cfg), fewshot_dir=str(fewshot),
            synthetic_manifest=str(synthetic) if synthetic else None, cache_dir=str(plan.out / "cache"),
            train_storage=f"{plan.storage.rstrip('/')}/train", tracking_uri=uri, experiment=plan.experiment,
            parent_run_id=parent, sweep_id=sid, tags=tuple(sorted(run_tags.items())))
        summary = run_sweep_and_finals(plan, space, ctx, tune_storage, concurrency(plan, max_concurrent, address), log)
    except BaseException as exc:
        tracking.end_open_children(uri, parent, "KILLED")
        tracking.end_run(uri, parent, "FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    tracking.end_run(uri, parent, "FINISHED")
    return summary


def run_search(plan: Plan, space, ctx: sweep.TrialContext, tune_storage: str, max_concurrent: int,
               log: Log) -> dict:
    """The Tune sweep (ASHA on validation); returns the best sampled values."""
    settings = space.tune
    log(f"sweep {ctx.sweep_id}: up to {max_concurrent} trial(s) at once, storage {tune_storage}")
    grid = sweep.restore_or_build(ctx, sweep.param_space(space), settings, name=ctx.sweep_id, storage=tune_storage,
                                  max_concurrent=max_concurrent, seed=plan.cfg.training.seed, final=False,
                                  log=log).fit()
    counts = sweep.settle_runs(grid, ctx)
    log("sweep done: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        + " (killed = stopped early by ASHA)")
    values, score = sweep.best_values(grid, settings)
    log(f"best on validation ({settings.metric} {score:.4f}): {json.dumps(values, sort_keys=True)}")
    return values


def run_sweep_and_finals(plan: Plan, space, ctx: sweep.TrialContext, tune_storage: str, max_concurrent: int,
                         log: Log) -> dict:
    """The Tune sweep (ASHA on validation), then the best values with every final seed (tested once); a space
    that samples nothing goes straight to the final seeds."""
    settings = space.tune
    if space.sample:
        values = run_search(plan, space, ctx, tune_storage, max_concurrent, log)
    else:  # an ablation or a fixed configuration: nothing to search, straight to the final seeds
        values = {}
        log(f"sweep {ctx.sweep_id}: {Path(space.path).name} samples nothing; running the final seeds only")
    final_ctx = sweep.with_kind(ctx, "final")
    finals = sweep.restore_or_build(final_ctx, sweep.final_params(values, plan.seeds), settings,
                                    name=sweep.final_name(ctx.sweep_id, plan.seeds), storage=tune_storage,
                                    max_concurrent=max_concurrent, seed=plan.cfg.training.seed, final=True,
                                    log=log).fit()
    sweep.settle_runs(finals, final_ctx)
    rows = sweep.final_results(finals)
    return finish_summary(plan, ctx, values, rows, log)


def finish_summary(plan: Plan, ctx: sweep.TrialContext, values: dict, rows: list[dict], log: Log) -> dict:
    """Print the summary, log it (metrics, tag, summary.md) to the sweep's run, return it."""
    uri, parent = ctx.tracking_uri, ctx.parent_run_id
    best_cfg = with_values(plan.cfg, values)
    paper = paper_reference(best_cfg, log)
    text = format_summary(plan, rows, values, paper, tracking.ui_command(uri))
    s = summarise(rows)
    tracking.MlflowReporter(uri, parent)({"final/test_accuracy_mean": s["mean"], "final/test_accuracy_std": s["std"],
                                          "final/seeds": s["seeds"], "final/best_val_accuracy": max(
                                              r["val_accuracy"] for r in rows)})
    client = tracking.client_for(uri)
    client.set_tag(parent, tags.BEST_VALUES, json.dumps(values, sort_keys=True))
    with tempfile.TemporaryDirectory(prefix="fsynth-summary-") as tmp:
        path = Path(tmp) / "summary.md"
        path.write_text(text + "\n")
        tracking.log_artifacts(uri, parent, path)
    log(text)
    return {"sweep": ctx.sweep_id, "values": values, "rows": rows, **s,
            "paper": {"label": paper.label, "accuracy": paper.accuracy} if paper else None, "parent_run_id": parent}


def paper_reference(cfg: ExperimentConfig, log: Log = print):
    """The published cell this run is compared with (closest first), or None when the paper has none here."""
    from fsynth.paper import paper_tables_path, preset_of, reference_rows

    if not paper_tables_path().is_file():  # e.g. a cluster image without ../shared: the sweep's result stands
        log(f"paper tables not found at {paper_tables_path()}; set FSYNTH_PAPER_TABLES to compare with the paper")
        return None
    cells = reference_rows(cfg.data.dataset, cfg.name, preset_of(tracking.flat_params(cfg)), shots=cfg.data.shots,
                           images_per_class=cfg.generator.images_per_class, arch=cfg.model.arch)
    return cells[0] if cells else None
