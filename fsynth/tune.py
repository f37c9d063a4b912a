"""`python -m fsynth.tune`: the whole experiment — cached stages, a Ray Tune sweep over Ray Train, final seeds.

Stages, each cached and reused on a rerun: few-shot manifest -> generator artefact (trained DDPM or DataDream LoRA)
-> synthetic set (Ray Data) -> static regions for every partition in the space (Ray tasks) -> the sweep (Tune over
Train, ASHA on validation accuracy) -> the best values retrained with several seeds and tested once -> a summary
against the paper's number, printed and logged to the sweep's MLflow run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace

from fsynth.baselines import BASELINES
from fsynth.cli import ArgumentParser, run_main
from fsynth.spaces import list_spaces


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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from fsynth.jobs.plan import resolve
    from fsynth.secrets import redact

    plan = replace(resolve(args), command=redact(shlex.join(["python", "-m", "fsynth.tune", *argv])))
    from fsynth.jobs.experiment import run_tune  # Ray, torch and the models: imported once the plan stands

    run_tune(plan, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

