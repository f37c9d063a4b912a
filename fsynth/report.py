"""`python -m fsynth.report`: the results page (docs/results.md) of the tune job's final runs in MLflow.

Per dataset: the sweeps beside the paper's numbers, the ablations (loss terms, regions, loss preset, shots) with the
command that made every row, a computed verdict on the loss ablation, and figures (also logged to the method row's
sweep run). The runs are read by fsynth.jobs.report_runs, the page made by fsynth.results."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from fsynth.cli import ArgumentParser, run_main, writable_folder
from fsynth.errors import ConfigError
from fsynth.paper import ENV_VAR, paper_tables_path
from fsynth.results.render import page_folder, write_report
from fsynth.results.rows import aggregate
from fsynth.secrets import redact

DEFAULT_OUT = "docs/results.md"


def build_parser() -> argparse.ArgumentParser:
    """The command line: where the runs are, which datasets, where the page goes."""
    p = ArgumentParser(prog="python -m fsynth.report", description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db)")
    p.add_argument("--storage", default="runs", help="tracking.storage when no URI is given (default runs)")
    p.add_argument("--experiment", default="fsynth", help="MLflow experiment name (default fsynth)")
    p.add_argument("--dataset", action="append", default=[], help="only this dataset (repeatable; default all)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"the results page (default {DEFAULT_OUT}); CSVs go to <folder>/<name>/<dataset>.csv and "
                        "figures to <folder>/<name>/img/ beside it (docs/results/ for the default)")
    return p


def _command(args: argparse.Namespace) -> str:
    """The command line that regenerates these files (the user's own URI/storage spelling, not the resolved one)."""
    words = ["python", "-m", "fsynth.report"]
    if args.tracking_uri:
        words += ["--tracking-uri", args.tracking_uri]
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        words += ["--tracking-uri", os.environ["MLFLOW_TRACKING_URI"]]
    elif args.storage != "runs":
        words += ["--storage", args.storage]
    if args.experiment != "fsynth":
        words += ["--experiment", args.experiment]
    for name in args.dataset:
        words += ["--dataset", name]
    if args.out != DEFAULT_OUT:
        words += ["--out", args.out]
    return redact(shlex.join(words))


def _tables_or_none() -> Path | None:
    """The published tables file, or None (with a warning) when it is not there: the report still works."""
    path = paper_tables_path()
    if path.is_file():
        return path
    if os.environ.get(ENV_VAR):  # asked for explicitly: a wrong path is the user's to fix, not to skip
        raise ConfigError(f"{ENV_VAR}={os.environ[ENV_VAR]} does not exist; point it at paper_tables.md or unset it")
    print(f"warning: no published numbers at {path} (set {ENV_VAR}); the paper column stays empty",
          file=sys.stderr)
    return None


def _out_page(text: str) -> Path:
    """--out as an absolute markdown path; a folder (the old meaning of --out) is a one-line error."""
    path = Path(text).expanduser().resolve()
    if path.suffix != ".md" or path.is_dir():
        raise ConfigError(f"--out names the results page, a .md file (e.g. {DEFAULT_OUT}), got {text}; the CSVs "
                          "and figures go to a folder of the same name beside it")
    writable_folder(path.with_suffix(""), "--out")  # the page's folder of CSVs and figures, made beside it
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Read the runs, write the page, its CSVs and figures (logging the figures to MLflow), print their paths."""
    args = build_parser().parse_args(argv)
    out = _out_page(args.out)
    # MLflow is imported only once the arguments are good: `--help` answers without its ~2 s import.
    from fsynth.jobs import report_runs
    from fsynth.jobs.tracking import resolve_tracking_uri

    given = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not given and "://" not in args.storage:
        writable_folder(args.storage, "--storage")  # the store's folder (figures are logged to it)
    uri = resolve_tracking_uri(given, args.storage, create=False)
    finals, sweeps = report_runs.collect(uri, args.experiment, args.dataset)
    reports = aggregate(finals, sweeps, _tables_or_none())
    figures = report_runs.publish_figures(uri, reports, page_folder(out) / "img")
    for path in write_report(reports, out, _command(args), uri, args.experiment, figures):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
