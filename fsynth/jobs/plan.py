"""The plan of `python -m fsynth.tune`, resolved before anything runs (config, space, seeds, every path made
absolute, the tracking URI), and the summary its final seeds end with. Light on purpose: a bad flag, a bad space
or a bad --set is refused in seconds, before Ray, torch and the models are imported (fsynth.jobs.experiment)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fsynth.baselines import apply_baseline
from fsynth.cli import writable_folder
from fsynth.config import ExperimentConfig, build_config, config_to_dict, merge, with_values
from fsynth.errors import ConfigError
from fsynth.jobs import tracking
from fsynth.names import absolute as _absolute
from fsynth.spaces import SearchSpace, load_space, space_path


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
