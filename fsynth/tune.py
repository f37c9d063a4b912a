"""`python -m fsynth.tune`: the whole experiment — cached stages, a Ray Tune sweep over Ray Train, final seeds.

Stages, each cached and reused on a rerun: few-shot manifest -> generator artefact (trained DDPM or DataDream LoRA)
-> synthetic set (Ray Data) -> static regions for every partition in the space (Ray tasks) -> the sweep (Tune over
Train, ASHA on validation accuracy) -> the best values retrained with several seeds and tested once -> a summary
against the paper's number, printed and logged to the sweep's MLflow run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fsynth.baselines import BASELINES, apply_baseline
from fsynth.cli import ArgumentParser, run_main, writable_folder
from fsynth.config import ExperimentConfig, config_to_dict, merge, with_values
from fsynth.errors import ConfigError
from fsynth.spaces import SearchSpace, list_spaces, load_space, space_path


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fsynth.tune", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="a name from `python -m fsynth.data list`")
    p.add_argument("--root", default=None, help="data root (default: the dataset's usual place)")
    p.add_argument("--download", action="store_true", help="fetch the dataset when it is not on disk")
    p.add_argument("--space", default="", help=f"search space: a name ({', '.join(list_spaces())}) or a YAML path "
                   "(default: tune_spaces/<dataset>.yaml if it exists, else default)")
    p.add_argument("--preset", default=None, help="config preset (default: the space's)")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) applied after the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.epochs=5 (repeatable)")
    p.add_argument("--baseline", default="method", choices=list(BASELINES), help="which method to sweep")
    p.add_argument("--shots", type=int, default=None, help="real shots per class (default: the preset's)")
    p.add_argument("--seeds", type=int, default=None, help="final runs of the best configuration (default: the "
                   "space's tune.final_seeds)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: $RAY_ADDRESS, else local)")
    p.add_argument("--out", default="runs", help="data, synthetic sets, caches and the local MLflow store "
                   "(default runs; shared storage on a cluster)")
    p.add_argument("--storage", default=None, help="Tune and Train persistence: a path or s3://... (default --out)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                   "tracking.uri, else sqlite under --out)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default tracking.experiment)")
    p.add_argument("--num-samples", type=int, default=None, help="repeats of the grid / random draws")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what the cluster "
                   "fits)")
    p.add_argument("--resume", action="store_true", help="require an interrupted sweep of this command to continue "
                   "(a plain rerun also continues it)")
    return p


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
    from fsynth.config import build_config
    from fsynth.tracking import resolve_tracking_uri

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
    return Plan(cfg, space, out, storage,
                resolve_tracking_uri(uri, out), args.experiment or cfg.tracking.experiment,
                [cfg.training.seed + i for i in range(n_seeds)])


def partition_variants(plan: Plan) -> list[dict]:
    """Every partition the grid/choice samplers can give a trial (dotted partition.* values), for the regions."""
    options = []
    for s in plan.space.sample:
        if any(k.startswith("partition.") for k in s.keys) and s.kind in ("grid", "choice"):
            options.append([dict(zip(s.keys, v if len(s.keys) > 1 else (v,), strict=True)) for v in s.values])
    combos = [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*options)]
    return [{k: v for k, v in c.items() if k.startswith("partition.")} for c in combos] or [{}]


def _print(line: str) -> None:
    print(line, flush=True)


def run_tune(args: argparse.Namespace, command: str = "") -> dict:
    """Run (or continue) the whole experiment; return the summary."""
    plan = replace(resolve(args), command=command)
    from fsynth.experiment import run_experiment

    return run_experiment(plan, address=args.address or os.environ.get("RAY_ADDRESS"),
                          max_concurrent=args.max_concurrent, num_samples=args.num_samples,
                          require_resume=args.resume, log=_print)


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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from fsynth.secrets import redact

    run_tune(build_parser().parse_args(argv), command=redact(shlex.join(["python", "-m", "fsynth.tune", *argv])))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

