"""The experiment of `python -m fsynth.tune`, top to bottom: plan -> cached stages (data, synthetic set, regions)
-> the Tune sweep over Train -> the final seeds -> the summary."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import ray
import ray.tune

from fsynth import tags
from fsynth.baselines import apply_baseline, needs_synthetic
from fsynth.batch_regions import uses_outputs
from fsynth.cli import require_gpus, writable_folder
from fsynth.config import (
    ExperimentConfig,
    build_config,
    config_from_dict,
    config_to_dict,
    merge,
    save_config,
    with_values,
)
from fsynth.errors import ConfigError
from fsynth.generators import check_source
from fsynth.jobs import sweep, tracking
from fsynth.jobs.generation import one_line_task_errors
from fsynth.models import check_model
from fsynth.spaces import SearchSpace, load_space, space_path
from fsynth.stages import ensure_fewshot
from fsynth.trainset import check_regions

Log = Callable[[str], None]


def _print_now(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class Plan:
    """The resolved run: config, space and every path made absolute before Ray starts."""

    cfg: ExperimentConfig
    space: SearchSpace
    out: Path
    storage: str
    tracking_uri: str
    experiment: str
    seeds: list[int]
    command: str = ""  # the command line that made it, tagged on the sweep's run (fsynth.report prints it)


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}; pass {name} 1 or more, or leave it out")


def _no_set_of_sampled_keys(space: SearchSpace, overrides: Sequence[str]) -> None:
    """A --set of a key the space samples would be overwritten in every trial: refuse it instead of ignoring it."""
    sampled = {k for s in space.sample for k in s.keys}
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key in sampled:
            raise ConfigError(f"--set {key} has no effect: {Path(space.path).name} samples {key} in every trial; "
                              "drop the --set, or pass --space with a space that fixes it (e.g. --space ablation)")


def resolve(args: argparse.Namespace) -> Plan:
    """Config = space's preset (or --preset) + --config files + the space's fixed values + --set + flags."""
    for name in ("--shots", "--seeds", "--num-samples", "--max-concurrent"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    space = load_space(space_path(args.dataset, args.space))
    extra: dict = {"data": {"dataset": args.dataset}}
    if args.root is not None:
        extra["data"]["root"] = _absolute(args.root)
    if args.download:
        extra["data"]["download"] = True
    if args.shots is not None:
        extra["data"]["shots"] = args.shots
    base = build_config(args.preset or space.preset or None, files=args.config)
    cfg = build_config(None, extra=merge(config_to_dict(with_values(base, space.fixed)), extra),
                       overrides=args.overrides)
    cfg = apply_baseline(cfg, args.baseline)
    _no_set_of_sampled_keys(space, args.overrides)
    generator_keys = [k for s in space.sample for k in s.keys if k.startswith(("generator.", "data."))]
    if generator_keys:
        raise ConfigError(f"{space.path}: '{generator_keys[0]}' cannot be sampled: every trial shares one synthetic "
                          "set and few-shot sample; move it to `fixed:` or run one sweep per value")
    out = writable_folder(args.out, "--out")
    storage = args.storage or str(out)
    if "://" not in storage:  # s3://... and the like are checked by Ray when it first writes there
        storage = str(writable_folder(storage, "--storage"))
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    n_seeds = args.seeds or space.tune.final_seeds
    uri = tracking.resolve_tracking_uri(uri, cfg.tracking.storage or out)  # default store: tracking.storage or --out
    return Plan(cfg, space, out, storage, uri, args.experiment or cfg.tracking.experiment,
                [cfg.training.seed + i for i in range(n_seeds)])


def partition_variants(plan: Plan) -> list[dict]:
    """Every partition the grid/choice samplers can give a trial (dotted partition.* values), for the regions."""
    options = []
    for s in plan.space.sample:
        if any(k.startswith("partition.") for k in s.keys) and s.kind in ("grid", "choice"):
            options.append([dict(zip(s.keys, v if len(s.keys) > 1 else (v,), strict=True)) for v in s.values])
    combos = [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*options)]
    return [{k: v for k, v in c.items() if k.startswith("partition.")} for c in combos] or [{}]


def run_tune(args: argparse.Namespace, command: str = "") -> dict:
    """Run (or continue) the whole experiment; return the summary."""
    plan = replace(resolve(args), command=command)
    return run_experiment(plan, address=args.address or os.environ.get("RAY_ADDRESS"),
                          max_concurrent=args.max_concurrent, num_samples=args.num_samples,
                          require_resume=args.resume, log=_print_now)


def summarise(rows: list[dict]) -> dict:
    """Mean and sample standard deviation of the final seeds' test accuracies (fractions)."""
    accs = [r["test_accuracy"] for r in rows]
    return {"mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "seeds": len(accs)}


def regions_line(cfg: ExperimentConfig, rows: list[dict]) -> str:
    """The regions' feature space and what the regularisers saw in the final runs' last epoch (seed mean)."""
    p = cfg.partition
    where = "1 region" if p.mode == "single" else f"{p.mode} regions, {p.features} features, K = " \
        f"{p.cluster_multiple:g} x classes"
    mixed = [r["mixing/synthetic_in_mixed"] for r in rows if "mixing/synthetic_in_mixed" in r]
    batch = [r["mixing/batch_synthetic_in_t"] for r in rows if "mixing/batch_synthetic_in_t" in r]
    if not mixed:
        return f"regions: {where}; mixing: - (the run does not train on real and synthetic images together)"
    return (f"regions: {where}; mixing: {100 * statistics.fmean(mixed):.0f} % of synthetic samples in a region with "
            f"a real one, {100 * statistics.fmean(batch):.0f} % with one in their batch (last epoch, seed mean)")


def format_summary(plan: Plan, rows: list[dict], values: dict, paper, ui: str) -> str:
    """The text printed at the end (and logged as summary.md)."""
    s = summarise(rows)
    lines = [f"## {plan.cfg.data.dataset}: {plan.cfg.name}, {plan.cfg.data.shots} shots, space "
             f"{Path(plan.space.path).stem}",
             f"best values (validation): {json.dumps(values, sort_keys=True)}",
             "| seed | best epoch | val accuracy | test accuracy |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['seed']} | {r['best_epoch']} | {100 * r['val_accuracy']:.2f} | {100 * r['test_accuracy']:.2f} |"
              for r in rows]
    std = f" ± {100 * s['std']:.2f}" if s["seeds"] > 1 else ""
    ref = f"{paper.accuracy:.1f} % ({paper.label})" if paper is not None else \
        "– (no published number for this dataset/setting)"
    lines += [regions_line(with_values(plan.cfg, values), rows),
              f"test accuracy: {100 * s['mean']:.2f}{std} % over {s['seeds']} seed(s), each tested once; paper: {ref}",
              f"MLflow: {ui}"]
    return "\n".join(lines)


@ray.remote
def _regions_task(cfg_dict: dict, fewshot_dir: str, synthetic: str | None, cache_dir: str) -> str:
    """Build (or find) one partition's static regions where a training worker would: on its resources."""
    from fsynth.loop import pick_device
    from fsynth.stages import setup_run

    cfg = config_from_dict(cfg_dict)
    setup_run(cfg, fewshot_dir, synthetic, cache_dir, pick_device())
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
    """Every stage of the experiment in `plan` (fsynth.tune.Plan); returns the summary."""
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
