"""`python -m fsynth.report`: per-dataset results of the tune job's final runs (MLflow) beside the paper's numbers."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsynth.baselines import BASELINES
from fsynth.cli import run_main
from fsynth.errors import ConfigError
from fsynth.paper import ABLATION, ENV_VAR, PaperCell, paper_tables_path, preset_of, reference_rows

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow (and fsynth.tracking, which imports it) is imported only where runs are read: the aggregation and
# rendering below stay importable without it, and `--help` answers without MLflow's ~2 s import.
PARENT_TAG = "mlflow.parentRunId"  # = fsynth.tracking.PARENT_TAG

KIND_TAG, DATASET_TAG, SWEEP_TAG = "fsynth.kind", "fsynth.dataset", "fsynth.sweep"
BASELINE_TAG, SPACE_TAG, SEED_TAG, BEST_TAG = "fsynth.baseline", "fsynth.space", "fsynth.seed", "fsynth.best_values"
DASH = "–"
NO_SYNTHETIC = ("real-only", "zero-shot")  # baselines whose label leaves out the generator
REGULARISED = ("method", "discrepancy-only", "robustness-only", "synthetic-only")  # use regions and loss.preset
SHORT_KEYS = {"training.lr": "lr", "training.weight_decay": "wd", "loss.lambda_discrepancy": "λ1",
              "loss.lambda_robustness": "λ2", "loss.ce_real_weight": "λ"}
SHOWN_KEYS = ("partition.mode", "partition.cluster_multiple")  # already in the label's partition part
CSV_FIELDS = ("dataset", "sweep", "space", "baseline", "preset", "shots", "label", "seeds", "test_mean", "test_std",
              "test_per_seed", "seed_ids", "val_mean", "paper", "paper_row", "paper_other")
NOTE = ("Test accuracy (%) of each sweep's final runs: mean ± sample std over seeds (ddof 1; one seed: –); the "
        "configuration was selected on validation accuracy only and test was evaluated once per seed. *paper* is "
        "the published row the run corresponds to (`shared/reference/paper_tables.md`); the paper's code picked "
        "the best epoch on the test set, so its numbers are optimistic.")


@dataclass(frozen=True)
class FinalRun:
    """What the report needs of one final run."""

    run_id: str
    dataset: str
    sweep: str
    baseline: str
    space: str
    seed: str
    status: str
    end_time: int
    params: Mapping[str, str]
    test: float | None  # fraction
    val: float | None  # fraction


@dataclass(frozen=True)
class SweepRow:
    """One sweep's final seeds, aggregated, with the published cells it corresponds to."""

    dataset: str
    sweep: str
    baseline: str
    space: str
    preset: str
    shots: int
    label: str
    seeds: tuple[str, ...]
    tests: tuple[float, ...]  # percent, in seed order
    vals: tuple[float, ...]  # percent
    reference: tuple[PaperCell, ...]
    end_time: int

    @property
    def test_mean(self) -> float:
        """Mean test accuracy (%)."""
        return statistics.fmean(self.tests)

    @property
    def test_std(self) -> float | None:
        """Sample std (ddof 1) of the test accuracy over seeds (%); None for one seed."""
        return statistics.stdev(self.tests) if len(self.tests) > 1 else None

    @property
    def val_mean(self) -> float | None:
        """Mean best validation accuracy (%), None when no run logged one."""
        return statistics.fmean(self.vals) if self.vals else None

    @property
    def paper(self) -> PaperCell | None:
        """The closest published cell."""
        return self.reference[0] if self.reference else None


@dataclass(frozen=True)
class DatasetReport:
    """A dataset's sweep rows and the final runs that did not count, with why."""

    dataset: str
    rows: tuple[SweepRow, ...]
    skipped: Mapping[str, int]


# ------------------------------------------------------------------------------------------------ reading runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fsynth.report", description=__doc__)
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db)")
    p.add_argument("--storage", default="runs", help="tracking.storage when no URI is given (default runs)")
    p.add_argument("--experiment", default="fsynth", help="MLflow experiment name (default fsynth)")
    p.add_argument("--dataset", action="append", default=[], help="only this dataset (repeatable; default all)")
    p.add_argument("--out", default="docs/results", help="folder for the reports (default docs/results)")
    return p


def _search(client: MlflowClient, experiment_id: str, kind: str) -> list:
    """Every run of `experiment_id` with tag fsynth.kind = `kind`, any status, all pages."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{KIND_TAG}` = '{kind}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _fraction(metrics: Mapping[str, float], *keys: str) -> float | None:
    return next((float(metrics[k]) for k in keys if k in metrics), None)


def _final_run(run: Any) -> FinalRun:
    tags, info = run.data.tags, run.info
    params = dict(run.data.params)
    return FinalRun(
        run_id=info.run_id,
        dataset=tags.get(DATASET_TAG) or params.get("data.dataset", "unknown"),
        sweep=tags.get(SWEEP_TAG) or tags.get(PARENT_TAG) or info.run_id,
        baseline=tags.get(BASELINE_TAG) or params.get("name", "unknown"),
        space=tags.get(SPACE_TAG, ""),
        seed=tags.get(SEED_TAG) or params.get("training.seed", "?"),
        status=info.status,
        end_time=info.end_time or info.start_time or 0,
        params=params,
        test=_fraction(run.data.metrics, "test/accuracy"),
        val=_fraction(run.data.metrics, "best/val_accuracy", "val/accuracy"),
    )


def _best_values(sweeps: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Sweep id -> the sampled values it chose (its fsynth.best_values tag; the latest sweep run that has one)."""
    best: dict[str, dict[str, Any]] = {}
    for run in sorted(sweeps, key=lambda r: r.info.start_time or 0):
        try:
            values = json.loads(run.data.tags.get(BEST_TAG, ""))
        except ValueError:  # no tag yet (sweep still running) or not JSON: the label goes without
            continue
        if isinstance(values, dict):
            best[run.data.tags.get(SWEEP_TAG) or run.info.run_id] = values
    return best


def open_experiment(uri: str, name: str) -> tuple[MlflowClient, str]:
    """A client and the id of experiment `name`; a missing store or experiment is a one-line ConfigError."""
    from mlflow.exceptions import MlflowException

    from fsynth.tracking import client_for

    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///").partition("?")[0])
        if not db.is_file():  # do not let MLflow create an empty store here
            raise ConfigError(f"no MLflow store at {db}; run python -m fsynth.tune first, or pass --tracking-uri "
                              "(or --storage) of the store that holds the runs")
    client = client_for(uri)
    try:
        found = client.get_experiment_by_name(name)
    except MlflowException as exc:
        raise ConfigError(f"cannot read {uri}: {str(exc).splitlines()[0]}; pass a working --tracking-uri") from None
    if found is None or found.lifecycle_stage == "deleted":
        raise ConfigError(f"experiment '{name}' does not exist in {uri}; run python -m fsynth.tune first, or pass "
                          "--tracking-uri/--experiment of the store that holds it")
    return client, found.experiment_id


# ------------------------------------------------------------------------------------------------ aggregation


def _number(text: Any) -> str:
    """A param value in short form ('2.0' -> '2', '0.0001' -> '0.0001'); non-numbers unchanged."""
    try:
        return f"{float(text):g}"
    except (TypeError, ValueError):
        return str(text)


def _int(text: Any, default: int) -> int:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return default


def run_label(baseline: str, params: Mapping[str, str], best: Mapping[str, Any]) -> str:
    """The sweep's name in the table: baseline, partition, loss preset, shots, generator, sampled best values."""
    parts = [baseline]
    if baseline in REGULARISED:
        mode = params.get("partition.mode", "?")
        parts.append("1 region" if mode == "single" else f"{mode} ×{_number(params.get('partition.cluster_multiple'))}")
        parts.append(params.get("loss.preset", "?"))
    parts.append(f"{params.get('data.shots', '?')} shots")
    if baseline not in NO_SYNTHETIC:
        parts.append(f"{params.get('generator.backend', '?')} {params.get('generator.images_per_class', '?')}/class")
    order = list(SHORT_KEYS)
    keys = sorted((k for k in best if k not in SHOWN_KEYS), key=lambda k: (order.index(k) if k in order else 99, k))
    chosen = [f"{SHORT_KEYS.get(k, k.rsplit('.', 1)[-1])}={_number(best[k])}" for k in keys]
    return " · ".join(parts) + (f" · {', '.join(chosen)}" if chosen else "")


def _seed_key(seed: str) -> tuple[int, str]:
    return (_int(seed, 10**9), seed)


def _references(run: FinalRun, tables: Path | None) -> tuple[PaperCell, ...]:
    if tables is None:
        return ()
    ipc = None if run.baseline in NO_SYNTHETIC else _int(run.params.get("generator.images_per_class"), 0) or None
    shots = _int(run.params.get("data.shots"), 16)
    return reference_rows(run.dataset, run.baseline, preset_of(run.params), shots=shots, images_per_class=ipc,
                          arch=run.params.get("model.arch", ""), path=tables)


def _sweep_row(runs: list[FinalRun], best: Mapping[str, Any], tables: Path | None) -> SweepRow:
    """One row from a sweep's counted final runs (one per seed)."""
    runs = sorted(runs, key=lambda r: _seed_key(r.seed))
    last = max(runs, key=lambda r: r.end_time)
    return SweepRow(
        dataset=last.dataset, sweep=last.sweep, baseline=last.baseline, space=last.space,
        preset=preset_of(last.params), shots=_int(last.params.get("data.shots"), 16),
        label=run_label(last.baseline, last.params, best),
        seeds=tuple(r.seed for r in runs), tests=tuple(100 * r.test for r in runs),
        vals=tuple(100 * r.val for r in runs if r.val is not None),
        reference=_references(last, tables), end_time=last.end_time,
    )


def _order(row: SweepRow) -> tuple:
    names = list(BASELINES)
    return (names.index(row.baseline) if row.baseline in names else len(names), row.shots, row.label, row.sweep)


def aggregate(finals: Sequence[FinalRun], best: Mapping[str, dict], tables: Path | None) -> dict[str, DatasetReport]:
    """Per dataset: one row per sweep of its FINISHED final runs with a test accuracy; the rest counted as skipped."""
    counted: dict[str, dict[str, dict[str, FinalRun]]] = defaultdict(lambda: defaultdict(dict))
    skipped: dict[str, Counter] = defaultdict(Counter)
    for run in sorted(finals, key=lambda r: r.end_time):
        if run.status != "FINISHED":
            skipped[run.dataset][run.status] += 1
        elif run.test is None:
            skipped[run.dataset]["FINISHED without test/accuracy"] += 1
        else:
            seeds = counted[run.dataset][run.sweep]
            if run.seed in seeds:  # a rerun of the same seed: the later one counts
                skipped[run.dataset]["superseded by a later run of the same seed"] += 1
            seeds[run.seed] = run
    reports = {}
    for dataset in sorted(set(counted) | set(skipped)):
        rows = [_sweep_row(list(runs.values()), best.get(sweep, {}), tables)
                for sweep, runs in counted.get(dataset, {}).items()]
        reports[dataset] = DatasetReport(dataset, tuple(sorted(rows, key=_order)), dict(skipped.get(dataset, {})))
    return reports


def ablation_groups(rows: Sequence[SweepRow]) -> list[dict[str, SweepRow]]:
    """Rows of the four loss-ablation baselines, grouped by (shots, preset); only groups with at least two of them.

    Where a baseline has several sweeps in a group, the one with the most seeds (then the latest) stands for it.
    """
    groups: dict[tuple[int, str], dict[str, SweepRow]] = defaultdict(dict)
    for row in rows:
        if row.baseline not in ABLATION:
            continue
        group = groups[(row.shots, row.preset)]
        held = group.get(row.baseline)
        if held is None or (len(row.tests), row.end_time) > (len(held.tests), held.end_time):
            group[row.baseline] = row
    return [groups[key] for key in sorted(groups) if len(groups[key]) >= 2]


# --------------------------------------------------------------------------------------------------- rendering


def _pct(value: float | None, digits: int = 2) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _mean_std(row: SweepRow) -> str:
    return f"{row.test_mean:.2f} ± {_pct(row.test_std)}"


def _published(row: SweepRow) -> str:
    """The first published row, then the others outside Table 2 (the ablation table shows those)."""
    if not row.reference:
        return DASH
    others = [f"{c.label} = {c.accuracy:g}" for c in row.reference[1:] if c.table != "2"]
    return "; ".join([row.reference[0].label, *others])


def _skipped_line(skipped: Mapping[str, int]) -> str:
    if not skipped:
        return "Skipped: none (every final run FINISHED with a test accuracy)."
    listed = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    return f"Skipped {sum(skipped.values())} final run(s) (only FINISHED final runs count): {listed}."


def _header(title: str, command: str, uri: str, experiment: str) -> list[str]:
    return [f"# {title}", "", f"Regenerate: `{command}`", "", f"Tracking URI: `{uri}` (experiment `{experiment}`)", ""]


def _ablation_table(group: Mapping[str, SweepRow]) -> list[str]:
    any_row = next(iter(group.values()))
    lines = [f"## Loss ablation (Table 2 style): {any_row.shots} shots, {any_row.preset} variant", "",
             "| discrepancy | robustness | run | seeds | ours (%) | paper (%) |", "|---|---|---|---|---|---|"]
    for baseline, (disc, rob) in sorted(ABLATION.items(), key=lambda kv: kv[1]):
        row = group.get(baseline)
        flags = f"| {'yes' if disc else 'no'} | {'yes' if rob else 'no'} "
        paper = next((c for c in row.reference if c.table == "2"), None) if row else None
        if row is None:
            lines.append(f"{flags}| {baseline} (not run) | 0 | {DASH} | {DASH} |")
        else:
            lines.append(f"{flags}| {row.label} | {len(row.tests)} | {_mean_std(row)} | "
                         f"{f'{paper.accuracy:g}' if paper else DASH} |")
    return lines


def render_markdown(report: DatasetReport, command: str, uri: str, experiment: str) -> str:
    """The dataset's results page: command, URI, the per-sweep table, skipped runs, the ablation table(s)."""
    lines = _header(f"Results: {report.dataset}", command, uri, experiment) + [NOTE, ""]
    if report.rows:
        lines += ["| run | space | seeds | test acc. (%) | per seed (%) | val acc. (%) | paper (%) | Δ (pp) | "
                  "published row |", "|---|---|---|---|---|---|---|---|---|"]
    else:
        lines.append("No finished final runs yet.")
    for row in report.rows:
        per_seed = ", ".join(f"{t:.2f} (seed {s})" for s, t in zip(row.seeds, row.tests, strict=True))
        paper = row.paper.accuracy if row.paper else None
        delta = DASH if paper is None else f"{row.test_mean - paper:+.2f}"
        lines.append(f"| {row.label} | {row.space or DASH} | {len(row.tests)} | {_mean_std(row)} | {per_seed} | "
                     f"{_pct(row.val_mean)} | {DASH if paper is None else f'{paper:g}'} | "
                     f"{delta} | {_published(row)} |")
    lines += ["", _skipped_line(report.skipped)]
    for group in ablation_groups(report.rows):
        lines += [""] + _ablation_table(group)
    return "\n".join(lines) + "\n"


def render_csv(report: DatasetReport) -> str:
    """One CSV line per sweep (accuracies in %, per-seed values ';'-joined, empty where there is no number)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        paper = row.paper
        writer.writerow({
            "dataset": row.dataset, "sweep": row.sweep, "space": row.space, "baseline": row.baseline,
            "preset": row.preset, "shots": row.shots, "label": row.label, "seeds": len(row.tests),
            "test_mean": f"{row.test_mean:.4f}", "test_std": "" if row.test_std is None else f"{row.test_std:.4f}",
            "test_per_seed": ";".join(f"{t:.4f}" for t in row.tests), "seed_ids": ";".join(row.seeds),
            "val_mean": "" if row.val_mean is None else f"{row.val_mean:.4f}",
            "paper": "" if paper is None else f"{paper.accuracy:g}", "paper_row": "" if paper is None else paper.label,
            "paper_other": ";".join(f"{c.label}={c.accuracy:g}" for c in row.reference[1:]),
        })
    return out.getvalue()


def render_index(reports: Mapping[str, DatasetReport], command: str, uri: str, experiment: str) -> str:
    """The index page: one line per dataset with its sweeps, counted and skipped runs, and its files."""
    lines = _header("fsynth results", command, uri, experiment)
    lines += ["| dataset | sweeps | final runs counted | skipped | files |", "|---|---|---|---|---|"]
    for name, report in reports.items():
        counted = sum(len(r.tests) for r in report.rows)
        lines.append(f"| {name} | {len(report.rows)} | {counted} | {sum(report.skipped.values())} | "
                     f"[{name}.md]({name}.md), [{name}.csv]({name}.csv) |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- the CLI


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
    if args.out != "docs/results":
        words += ["--out", args.out]
    return shlex.join(words)


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


def collect(uri: str, experiment: str, datasets: Sequence[str] = ()) -> dict[str, DatasetReport]:
    """Read the experiment's final and sweep runs and aggregate them per dataset (only `datasets` if given)."""
    from mlflow.exceptions import MlflowException

    client, experiment_id = open_experiment(uri, experiment)
    try:
        finals = [_final_run(r) for r in _search(client, experiment_id, "final")]
        best = _best_values(_search(client, experiment_id, "sweep"))
    except MlflowException as exc:
        raise ConfigError(f"cannot read runs from {uri}: {str(exc).splitlines()[0]}") from None
    if not finals:
        raise ConfigError(f"experiment '{experiment}' in {uri} has no final runs; run python -m fsynth.tune first "
                          "(each sweep ends with final runs), or pass --tracking-uri of the store that holds them")
    found = sorted({r.dataset for r in finals})
    if datasets:
        missing = sorted(set(datasets) - set(found))
        if missing:
            raise ConfigError(f"no final runs for {', '.join(missing)} in experiment '{experiment}' at {uri}; "
                              f"datasets with runs: {', '.join(found)} (or run python -m fsynth.tune first)")
        finals = [r for r in finals if r.dataset in datasets]
    return aggregate(finals, best, _tables_or_none())


def write_reports(reports: Mapping[str, DatasetReport], out: Path, command: str, uri: str,
                  experiment: str) -> list[Path]:
    """Write <out>/<dataset>.md and .csv for every dataset, then <out>/index.md; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, report in reports.items():
        for path, text in ((out / f"{name}.md", render_markdown(report, command, uri, experiment)),
                           (out / f"{name}.csv", render_csv(report))):
            path.write_text(text, encoding="utf-8")
            written.append(path)
    index = out / "index.md"
    index.write_text(render_index(reports, command, uri, experiment), encoding="utf-8")
    return written + [index]


def main(argv: Sequence[str] | None = None) -> int:
    from fsynth.tracking import resolve_tracking_uri

    args = build_parser().parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""), args.storage)
    reports = collect(uri, args.experiment, args.dataset)
    for path in write_reports(reports, Path(args.out).expanduser().resolve(), _command(args), uri, args.experiment):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
