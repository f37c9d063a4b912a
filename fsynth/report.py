"""`python -m fsynth.report`: the results page (docs/results.md) of the tune job's final runs in MLflow.

Per dataset: the sweeps beside the paper's numbers, the ablations (loss terms, regions, loss preset, shots) with the
command that made every row, a computed verdict on the loss ablation, and figures (also logged to the method row's
sweep run)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import statistics
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsynth import compare, tags
from fsynth.baselines import BASELINES
from fsynth.cli import ArgumentParser, run_main, writable_folder
from fsynth.config import PartitionConfig
from fsynth.errors import ConfigError
from fsynth.paper import ENV_VAR, PaperCell, paper_tables_path, preset_of, reference_rows
from fsynth.secrets import redact

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow (and fsynth.tracking, which imports it) is imported only where runs are read: the aggregation and
# rendering below stay importable without it, and `--help` answers without MLflow's ~2 s import.
PARENT_TAG = "mlflow.parentRunId"  # = fsynth.tracking.PARENT_TAG

KIND_TAG, DATASET_TAG, SWEEP_TAG = tags.KIND, tags.DATASET, tags.SWEEP
BASELINE_TAG, SPACE_TAG, SEED_TAG, BEST_TAG = tags.BASELINE, tags.SPACE, tags.SEED, tags.BEST_VALUES
COMMAND_TAG = tags.COMMAND
DASH = "–"
DEFAULT_OUT = "docs/results.md"
NO_SYNTHETIC = ("real-only", "zero-shot")  # baselines whose label leaves out the generator
RECOGNISED_KEY = "synthetic/starting_model_accuracy"  # logged on the sweep run by fsynth.experiment
SYNTHETIC_AXIS = ("real-synthetic-ce", "method")  # the rows the synthetic-set table compares
REGULARISED = ("method", "discrepancy-only", "robustness-only", "synthetic-only")  # use regions and loss.preset
SHORT_KEYS = {"training.lr": "lr", "training.weight_decay": "wd", "loss.lambda_discrepancy": "λ1",
              "loss.lambda_robustness": "λ2", "loss.ce_real_weight": "λ"}
SHOWN_KEYS = ("partition.mode", "partition.cluster_multiple")  # already in the label's partition part
MEASURED = ("measured/discrepancy", "measured/robustness")  # Figure 2's quantities, logged every epoch by finals
# What the regularisers could act on (fsynth.batch_regions): synthetic samples in a region with a real sample,
# over the epoch and within their batch, logged every epoch by runs that train on both kinds.
MIXING = ("mixing/synthetic_in_mixed", "mixing/batch_synthetic_in_t")
_PARTITION = PartitionConfig()
DEFAULT_REGIONS = (_PARTITION.mode, _PARTITION.cluster_multiple)  # the method row's regions (static, K = 2 x C)
# The loss ablation's rows, in order: (baseline, label, CE on synthetic images, discrepancy term, robustness term).
LOSS_ROWS = (("real-only", "real only", False, False, False),
             ("real-synthetic-ce", "real + synthetic CE only", True, False, False),
             ("discrepancy-only", "+ discrepancy", True, True, False),
             ("robustness-only", "+ robustness", True, False, True),
             ("method", "+ both (method)", True, True, True))
LOSS_LABELS = {row[0]: row[1] for row in LOSS_ROWS}
FIGURE2 = {"method": "method", "real-synthetic-ce": "real + synthetic CE only"}  # Figure 2's runs, as labelled
CSV_FIELDS = ("dataset", "sweep", "space", "baseline", "preset", "loss_preset", "regions", "shots", "label",
              "seeds", "test_mean", "test_std", "test_per_seed", "seed_ids", "val_mean", "measured_discrepancy",
              "measured_robustness", "mixing_synthetic_in_mixed", "mixing_batch_synthetic_in_t", "features",
              "synthetic", "synthetic_recognised", "paper", "paper_row", "paper_other", "command", "parent_run")
NOTE = ("Test accuracy (%) of each sweep's final runs: mean ± sample std over seeds (ddof 1; one seed: –); the "
        "configuration was selected on validation accuracy only and test was evaluated once per seed. *paper* is "
        "the published row the run corresponds to (`shared/reference/paper_tables.md`); the paper's code picked "
        "the best epoch on the test set, so its numbers are optimistic. *command* is the `fsynth.tune` command "
        "that made the row (its sweep run's `fsynth.command` tag; – for runs made before that tag existed).")


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
    parent: str = ""  # the sweep's run id
    measured: Mapping[str, float] = field(default_factory=dict)  # MEASURED key -> its last (final-epoch) value


@dataclass(frozen=True)
class SweepInfo:
    """What the report needs of a sweep's parent run."""

    run_id: str
    best: Mapping[str, Any]  # the sampled values the final seeds used ({} for a space that samples nothing)
    command: str  # the fsynth.tune command line, "" when the run predates the tag
    recognised: float | None = None  # synthetic/starting_model_accuracy: the starting model's accuracy on the set


@dataclass(frozen=True)
class Setting:
    """What an ablation holds fixed: space, paper variant, loss preset, shots, regions (mode, multiple), the
    regions' feature space and the synthetic set (see `synthetic_label`)."""

    space: str
    preset: str
    loss_preset: str
    shots: int
    regions: tuple[str, float]
    features: str = ""
    synthetic: str = ""


@dataclass(frozen=True)
class SweepRow:
    """One sweep's final seeds, aggregated, with the published cells it corresponds to."""

    dataset: str
    sweep: str
    baseline: str
    space: str
    preset: str  # the paper variant (full / lightweight), see fsynth.paper.preset_of
    shots: int
    label: str
    seeds: tuple[str, ...]
    tests: tuple[float, ...]  # percent, in seed order
    vals: tuple[float, ...]  # percent
    reference: tuple[PaperCell, ...]
    end_time: int
    loss_preset: str = ""  # loss.preset: paper or protoaug
    regions: tuple[str, float] = DEFAULT_REGIONS  # (partition.mode, cluster multiple; 0 for a single region)
    command: str = ""
    parent_run_id: str = ""
    run_ids: tuple[str, ...] = ()  # the final runs, in seed order
    measured: Mapping[str, float] = field(default_factory=dict)  # MEASURED key -> mean over seeds (final epoch)
    features: str = ""  # partition.features: outputs, embedding or pixels
    synthetic: str = ""  # synthetic_label: text-to-image, image-to-image <strength>, "" without synthetic images
    recognised: float | None = None  # percent of the synthetic set the starting model labels right (SweepInfo)

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

    @property
    def setting(self) -> Setting:
        return Setting(self.space, self.preset, self.loss_preset, self.shots, self.regions, self.features,
                       self.synthetic)


@dataclass(frozen=True)
class DatasetReport:
    """A dataset's sweep rows and the final runs that did not count, with why."""

    dataset: str
    rows: tuple[SweepRow, ...]
    skipped: Mapping[str, int]


@dataclass(frozen=True)
class Ablations:
    """A dataset's ablation rows, all at one setting but for the axis each varies (see `ablations`)."""

    setting: Setting | None
    method: SweepRow | None  # the method row: baseline method with the default regions (figures are logged here)
    loss: Mapping[str, SweepRow]  # baseline -> row, LOSS_ROWS order
    regions: tuple[SweepRow, ...]  # method rows: single, then K = 1, 2, 4 ... x classes
    presets: tuple[SweepRow, ...]  # method rows: paper, then protoaug
    shots: tuple[SweepRow, ...]  # method (then real-only) rows by shots
    one_region: Mapping[str, SweepRow] = field(default_factory=dict)  # Figure 2's rows with a single region
    features: tuple[SweepRow, ...] = ()  # method rows by the regions' feature space
    synthetic: tuple[SweepRow, ...] = ()  # CE and method rows by synthetic set


# ------------------------------------------------------------------------------------------------ reading runs


def build_parser() -> argparse.ArgumentParser:
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
    run_tags, info, metrics = run.data.tags, run.info, run.data.metrics
    params = dict(run.data.params)
    return FinalRun(
        run_id=info.run_id,
        dataset=run_tags.get(DATASET_TAG) or params.get("data.dataset", "unknown"),
        sweep=run_tags.get(SWEEP_TAG) or run_tags.get(PARENT_TAG) or info.run_id,
        baseline=run_tags.get(BASELINE_TAG) or params.get("name", "unknown"),
        space=run_tags.get(SPACE_TAG, ""),
        seed=run_tags.get(SEED_TAG) or params.get("training.seed", "?"),
        status=info.status,
        end_time=info.end_time or info.start_time or 0,
        params=params,
        test=_fraction(metrics, "test/accuracy"),
        val=_fraction(metrics, "best/val_accuracy", "val/accuracy"),
        parent=run_tags.get(PARENT_TAG, ""),
        # MLflow's latest value of a metric is the one at the highest step: the final epoch's.
        measured={k: float(metrics[k]) for k in MEASURED + MIXING if k in metrics},
    )


def _json_dict(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:  # no tag yet (sweep still running) or not JSON: the label goes without
        return None
    return value if isinstance(value, dict) else None


def sweep_infos(sweeps: Sequence[Any]) -> dict[str, SweepInfo]:
    """Sweep id -> its parent run: id, chosen values (fsynth.best_values) and command (fsynth.command).

    Where several parent runs carry one sweep id, the latest counts, keeping an earlier one's tags it lacks.
    """
    infos: dict[str, SweepInfo] = {}
    for run in sorted(sweeps, key=lambda r: r.info.start_time or 0):
        key = run.data.tags.get(SWEEP_TAG) or run.info.run_id
        held = infos.get(key, SweepInfo("", {}, ""))
        best = _json_dict(run.data.tags.get(BEST_TAG, ""))
        recognised = run.data.metrics.get(RECOGNISED_KEY, held.recognised)
        infos[key] = SweepInfo(run.info.run_id, held.best if best is None else best,
                               run.data.tags.get(COMMAND_TAG) or held.command, recognised)
    return infos


def open_experiment(uri: str, name: str) -> tuple[MlflowClient, str]:
    """A client and the id of experiment `name`; a missing store or experiment is a one-line ConfigError."""
    from mlflow.exceptions import MlflowException

    from fsynth.tracking import check_reachable, client_for

    check_reachable(uri)
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
        multiple = _number(params.get("partition.cluster_multiple"))
        features = f"{params['partition.features']} " if "partition.features" in params else ""
        parts.append("1 region" if mode == "single" else f"{features}{mode} ×{multiple}")
        parts.append(params.get("loss.preset", "?"))
    parts.append(f"{params.get('data.shots', '?')} shots")
    if baseline not in NO_SYNTHETIC:
        generator = f"{params.get('generator.backend', '?')} {params.get('generator.images_per_class', '?')}/class"
        if synthetic_label(baseline, params) != "text-to-image":
            generator += f" {synthetic_label(baseline, params)}"
        parts.append(generator)
    order = list(SHORT_KEYS)
    keys = sorted((k for k in best if k not in SHOWN_KEYS), key=lambda k: (order.index(k) if k in order else 99, k))
    chosen = [f"{SHORT_KEYS.get(k, k.rsplit('.', 1)[-1])}={_number(best[k])}" for k in keys]
    return " · ".join(parts) + (f" · {', '.join(chosen)}" if chosen else "")


def synthetic_label(baseline: str, params: Mapping[str, str]) -> str:
    """The synthetic set a run trained on: 'text-to-image', 'image-to-image <strength>', or '' (none used)."""
    if baseline in NO_SYNTHETIC:
        return ""
    if params.get("generator.init_from", "noise") != "shots":
        return "text-to-image"
    return f"image-to-image {_number(params.get('generator.strength', '?'))}"


def _seed_key(seed: str) -> tuple[int, str]:
    return (_int(seed, 10**9), seed)


def _references(run: FinalRun, tables: Path | None) -> tuple[PaperCell, ...]:
    if tables is None:
        return ()
    ipc = None if run.baseline in NO_SYNTHETIC else _int(run.params.get("generator.images_per_class"), 0) or None
    shots = _int(run.params.get("data.shots"), 16)
    return reference_rows(run.dataset, run.baseline, preset_of(run.params), shots=shots, images_per_class=ipc,
                          arch=run.params.get("model.arch", ""), path=tables)


def _regions(params: Mapping[str, str]) -> tuple[str, float]:
    """(partition.mode, cluster multiple) of a run; a single region has no multiple (0), whatever was set."""
    mode = params.get("partition.mode", DEFAULT_REGIONS[0])
    if mode == "single":
        return (mode, 0.0)
    try:
        return (mode, float(params.get("partition.cluster_multiple", DEFAULT_REGIONS[1])))
    except (TypeError, ValueError):
        return (mode, 0.0)


def _seed_means(runs: Sequence[FinalRun]) -> dict[str, float]:
    """MEASURED key -> mean over the runs that logged it."""
    return {k: statistics.fmean(r.measured[k] for r in runs if k in r.measured)
            for k in MEASURED + MIXING if any(k in r.measured for r in runs)}


def _sweep_row(runs: list[FinalRun], info: SweepInfo | None, tables: Path | None) -> SweepRow:
    """One row from a sweep's counted final runs (one per seed) and its parent run's tags."""
    runs = sorted(runs, key=lambda r: _seed_key(r.seed))
    last = max(runs, key=lambda r: r.end_time)
    info = info or SweepInfo(last.parent, {}, "")
    regularised = last.baseline in REGULARISED
    return SweepRow(
        dataset=last.dataset, sweep=last.sweep, baseline=last.baseline, space=last.space,
        preset=preset_of(last.params), shots=_int(last.params.get("data.shots"), 16),
        label=run_label(last.baseline, last.params, info.best),
        seeds=tuple(r.seed for r in runs), tests=tuple(100 * r.test for r in runs),
        vals=tuple(100 * r.val for r in runs if r.val is not None),
        reference=_references(last, tables), end_time=last.end_time,
        loss_preset=last.params.get("loss.preset", ""), regions=_regions(last.params), command=info.command,
        parent_run_id=info.run_id or last.parent, run_ids=tuple(r.run_id for r in runs), measured=_seed_means(runs),
        features=last.params.get("partition.features", "embedding") if regularised else "",
        synthetic=synthetic_label(last.baseline, last.params),
        recognised=None if info.recognised is None or last.baseline in NO_SYNTHETIC else 100 * info.recognised,
    )


def _order(row: SweepRow) -> tuple:
    names = list(BASELINES)
    return (names.index(row.baseline) if row.baseline in names else len(names), row.shots, row.label, row.sweep)


def aggregate(finals: Sequence[FinalRun], sweeps: Mapping[str, SweepInfo],
              tables: Path | None) -> dict[str, DatasetReport]:
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
        rows = [_sweep_row(list(runs.values()), sweeps.get(sweep), tables)
                for sweep, runs in counted.get(dataset, {}).items()]
        reports[dataset] = DatasetReport(dataset, tuple(sorted(rows, key=_order)), dict(skipped.get(dataset, {})))
    return reports


# --------------------------------------------------------------------------------------------------- ablations


def _pick(rows: Sequence[SweepRow]) -> SweepRow | None:
    """Of several sweeps of one configuration, the one with the most seeds, then the latest."""
    return max(rows, key=lambda r: (len(r.tests), r.end_time), default=None)


def method_row(rows: Sequence[SweepRow]) -> SweepRow | None:
    """The dataset's method row: baseline `method` with the default regions (static, K = 2 x classes).

    Among several (the ablation space's and the main sweep's, other shots or loss presets), the one in the space
    most rows share, then at the (variant, loss preset, shots) most rows share: the ablations' common setting.
    """
    spaces = Counter(r.space for r in rows)
    common = Counter((r.preset, r.loss_preset, r.shots) for r in rows)
    sets = Counter((r.features, r.synthetic) for r in rows if r.baseline in REGULARISED)
    candidates = [r for r in rows if r.baseline == "method" and r.regions == DEFAULT_REGIONS]
    return max(candidates, default=None, key=lambda r: (spaces[r.space], common[(r.preset, r.loss_preset, r.shots)],
                                                        sets[(r.features, r.synthetic)], len(r.tests), r.end_time))


def _like(row: SweepRow, ref: Setting, free: str = "") -> bool:
    """Whether `row` ran at `ref` except on the axis `free` (a Setting field); regions and their features count
    only for baselines that use them (real-only and CE-only runs ignore the partition), the synthetic set only for
    those that train on one."""
    mine = row.setting
    if row.baseline not in REGULARISED:
        mine = replace(mine, regions=ref.regions, features=ref.features)
    if row.baseline in NO_SYNTHETIC:
        mine = replace(mine, synthetic=ref.synthetic)
    return (replace(mine, **{free: getattr(ref, free)}) if free else mine) == ref


def _variants(rows: Sequence[SweepRow], ref: Setting, baselines: Sequence[str], free: str,
              key: Callable[[SweepRow], Any]) -> tuple[SweepRow, ...]:
    """One row per distinct `key` among `baselines`' rows at `ref` with the axis `free` let go, in key order."""
    groups: dict[Any, list[SweepRow]] = defaultdict(list)
    for row in rows:
        if row.baseline in baselines and _like(row, ref, free):
            groups[key(row)].append(row)
    return tuple(_pick(groups[k]) for k in sorted(groups))


def _regions_key(row: SweepRow) -> tuple:
    mode, multiple = row.regions
    return ({"single": 0, "static": 1, "online": 2}.get(mode, 3), mode, multiple)


def ablations(rows: Sequence[SweepRow]) -> Ablations:
    """The rows of each ablation at one setting: the method row's, else the most common one of the loss rows."""
    method = method_row(rows)
    if method is not None:
        ref = method.setting
    else:
        loss_rows = [replace(r.setting, regions=DEFAULT_REGIONS) for r in rows if r.baseline in LOSS_LABELS]
        ref = Counter(loss_rows).most_common(1)[0][0] if loss_rows else None
    if ref is None:
        return Ablations(None, None, {}, (), (), ())
    # A CE-only run ignores the regions, but its measured regularisers depend on them: the one at ref's regions
    # stands in the table when it exists.
    loss = {b: _pick([r for r in rows if r.baseline == b and r.setting == ref])
            or _pick([r for r in rows if r.baseline == b and _like(r, ref)]) for b in LOSS_LABELS}
    single = replace(ref, regions=("single", 0.0))
    return Ablations(
        setting=ref, method=method, loss={b: r for b, r in loss.items() if r is not None},
        regions=_variants(rows, ref, ("method",), "regions", _regions_key),
        presets=_variants(rows, ref, ("method",), "loss_preset", lambda r: (r.loss_preset != "paper", r.loss_preset)),
        shots=_variants(rows, ref, ("method", "real-only"), "shots", lambda r: (r.shots, r.baseline != "method")),
        one_region={b: r for b in FIGURE2
                    if (r := _pick([x for x in rows if x.baseline == b and x.setting == single]))},
        features=_variants(rows, ref, ("method",), "features", lambda r: (r.features != ref.features, r.features)),
        synthetic=_variants(rows, ref, SYNTHETIC_AXIS, "synthetic",
                            lambda r: (r.synthetic, SYNTHETIC_AXIS.index(r.baseline))),
    )


def _names(items: Sequence[str], word: str) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"


def _compare(method: SweepRow, other: SweepRow) -> tuple[bool | None, str]:
    """(whether the method's mean test accuracy beats `other`'s by more than 2 standard errors of the difference,
    the numbers); see fsynth.compare for the paired and unpaired errors. None: one seed each, cannot tell."""
    diff = compare.difference(dict(zip(method.seeds, method.tests, strict=True)),
                              dict(zip(other.seeds, other.tests, strict=True)))
    return diff.beats(), f"{LOSS_LABELS[other.baseline]}: {diff.text()}"


def _measured_line(loss: Mapping[str, SweepRow]) -> str:
    """The final-epoch measured discrepancy / robustness of the method and CE-only rows, where logged."""
    shown = [(name, loss[b].measured) for b, name in FIGURE2.items() if b in loss and loss[b].measured]
    if not shown:
        return ""
    values = "; ".join(f"{name} {_num(m.get(MEASURED[0]))} / {_num(m.get(MEASURED[1]))}" for name, m in shown)
    return f" Final-epoch measured discrepancy / robustness (mean over seeds): {values}."


def loss_verdict(loss: Mapping[str, SweepRow]) -> str:
    """A sentence saying whether the method beats CE-only and real-only by 2 standard errors of the difference
    ("" without the method row or either of the two)."""
    method = loss.get("method")
    others = [loss[b] for b in ("real-synthetic-ce", "real-only") if b in loss]
    if method is None or not others:
        return ""
    results = [(LOSS_LABELS[o.baseline], *_compare(method, o)) for o in others]
    wins = [name for name, won, _ in results if won is True]
    fails = [name for name, won, _ in results if won is False]
    unknown = [name for name, won, _ in results if won is None]
    clauses = [f"beats {_names(wins, 'and')} by more than 2 standard errors"] if wins else []
    clauses += [f"does not beat {_names(fails, 'or')} by 2 standard errors"] if fails else []
    clauses += [f"cannot be told apart from {_names(unknown, 'or')} (a row with one seed: no error)"] if unknown else []
    details = "; ".join(detail for _, _, detail in results)
    return (f"**Verdict:** the method {', but '.join(clauses)} (method minus {details}; paired: the mean and "
            f"standard error of the per-seed differences, a seed giving both runs the same initialisation and data "
            f"order; unpaired: sqrt(s1²/n1 + s2²/n2)).{_measured_line(loss)}")


# --------------------------------------------------------------------------------------------------- rendering


def _pct(value: float | None, digits: int = 2) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _num(value: float | None) -> str:
    return DASH if value is None else f"{value:.3g}"


def _mean_std(row: SweepRow) -> str:
    return f"{row.test_mean:.2f} ± {_pct(row.test_std)}"


def _mixing_cell(row: SweepRow) -> str:
    """'epoch % / batch %' of synthetic samples in a region with a real one; a regularised row whose regularisers
    saw none is marked, since it is cross-entropy only whatever its λs."""
    epoch, batch = (row.measured.get(k) for k in MIXING)
    if batch is None:
        return DASH
    mark = " ⚠ regularisers saw no synthetic sample" if batch == 0 and row.baseline in REGULARISED else ""
    return f"{100 * epoch:.0f} / {100 * batch:.0f}{mark}"


def _command_cell(row: SweepRow) -> str:
    # A '|' inside a cell would end it, even in backticks: markdown tables need it escaped.
    return f"`{row.command}`".replace("|", "\\|") if row.command else DASH


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


def _main_table(report: DatasetReport) -> list[str]:
    """One line per sweep: label, space, seeds, mean ± std, per seed, validation, paper, Δ, command."""
    if not report.rows:
        return ["No finished final runs yet."]
    lines = ["| run | space | seeds | test acc. (%) | per seed (%) | val acc. (%) | mixing (% epoch / batch) | "
             "synthetic recognised (%) | paper (%) | Δ (pp) | published row | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report.rows:
        per_seed = ", ".join(f"{t:.2f} (seed {s})" for s, t in zip(row.seeds, row.tests, strict=True))
        paper = row.paper.accuracy if row.paper else None
        delta = DASH if paper is None else f"{row.test_mean - paper:+.2f}"
        lines.append(f"| {row.label} | {row.space or DASH} | {len(row.tests)} | {_mean_std(row)} | {per_seed} | "
                     f"{_pct(row.val_mean)} | {_mixing_cell(row)} | {_pct(row.recognised, 0)} | "
                     f"{DASH if paper is None else f'{paper:g}'} | "
                     f"{delta} | {_published(row)} | {_command_cell(row)} |")
    return lines


def _setting_text(ref: Setting, free: str) -> str:
    """What an ablation table holds fixed, in words (all of `ref` but the axis `free`)."""
    mode, multiple = ref.regions
    parts = {"shots": f"{ref.shots} shots", "loss_preset": f"loss preset {ref.loss_preset or '?'}",
             "regions": "1 region" if mode == "single" else f"{mode} regions K = {multiple:g} × classes",
             "preset": f"{ref.preset} variant", "space": f"space {ref.space or DASH}",
             "features": f"{ref.features or DASH} features", "synthetic": ref.synthetic or "no synthetic set"}
    return ", ".join(text for key, text in parts.items() if key != free)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _loss_table(ab: Ablations) -> list[str]:
    """Table 2 style, with real only first: terms used, accuracy, measured regularisers, paper, command."""
    lines = [f"### Loss ablation (Table 2 style): {_setting_text(ab.setting, '')}", "",
             "| row | CE on synthetic | discrepancy | robustness | seeds | test acc. (%) | measured discrepancy | "
             "measured robustness | mixing (% epoch / batch) | paper (%) | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for baseline, label, synthetic, disc, rob in LOSS_ROWS:
        row = ab.loss.get(baseline)
        if row is None:
            continue
        paper = next((c for c in row.reference if c.table == "2"), row.paper)
        lines.append(f"| {label} | {_yes(synthetic)} | {_yes(disc)} | {_yes(rob)} | {len(row.tests)} | "
                     f"{_mean_std(row)} | {_num(row.measured.get(MEASURED[0]))} | "
                     f"{_num(row.measured.get(MEASURED[1]))} | {_mixing_cell(row)} | "
                     f"{f'{paper.accuracy:g}' if paper else DASH} | "
                     f"{_command_cell(row)} |")
    verdict = loss_verdict(ab.loss)
    return lines + (["", verdict] if verdict else [])


def regions_label(regions: tuple[str, float]) -> str:
    """'single region', 'K = 2 × classes' (static k-means) or 'online, K = 2 × classes'."""
    mode, multiple = regions
    if mode == "single":
        return "single region"
    return f"{'' if mode == 'static' else mode + ', '}K = {multiple:g} × classes"


def _axis_table(title: str, what: str, fixed: str, entries: Sequence[tuple[str, SweepRow]]) -> list[str]:
    """An ablation along one axis: a line per value (`what`), with its run, seeds, accuracy and command."""
    lines = [f"### {title}: {fixed}", "", f"| {what} | run | seeds | test acc. (%) | measured discrepancy | "
             "measured robustness | mixing (% epoch / batch) | command |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {value} | {row.label} | {len(row.tests)} | {_mean_std(row)} | "
              f"{_num(row.measured.get(MEASURED[0]))} | {_num(row.measured.get(MEASURED[1]))} | {_mixing_cell(row)} | "
              f"{_command_cell(row)} |"
              for value, row in entries]
    return lines


def _ablation_sections(ab: Ablations, images: Mapping[str, str]) -> list[str]:
    """Each ablation table with 2+ rows, then its figure where one was made."""
    sections: list[list[str]] = []
    if len(ab.loss) >= 2:
        sections.append(_loss_table(ab) + _image(images, "figure2", "Figure 2: measured regularisers per epoch"))
    if len(ab.regions) >= 2:
        sections.append(_axis_table("Regions", "regions", f"method, {_setting_text(ab.setting, 'regions')}",
                                    [(regions_label(r.regions), r) for r in ab.regions])
                        + _image(images, "regions", "accuracy vs regions"))
    if len(ab.presets) >= 2:
        sections.append(_axis_table("Loss preset", "loss.preset", f"method, {_setting_text(ab.setting, 'loss_preset')}",
                                    [(r.loss_preset, r) for r in ab.presets]))
    if len(ab.features) >= 2:
        sections.append(_axis_table("Region features", "partition.features",
                                    f"method, {_setting_text(ab.setting, 'features')}",
                                    [(r.features, r) for r in ab.features]))
    if len({r.synthetic for r in ab.synthetic}) >= 2:
        sections.append(_axis_table("Synthetic set", "synthetic set (recognised %)",
                                    _setting_text(ab.setting, "synthetic"),
                                    [(f"{r.synthetic} ({_pct(r.recognised, 0)}) · {r.baseline}", r)
                                     for r in ab.synthetic]))
    if len({r.shots for r in ab.shots}) >= 2:  # method and real-only at one number of shots: no axis
        sections.append(_axis_table("Shots", "shots", _setting_text(ab.setting, "shots"),
                                    [(f"{r.shots} ({r.baseline})", r) for r in ab.shots]))
    return [line for section in sections for line in ["", *section]]


def _image(images: Mapping[str, str], kind: str, alt: str) -> list[str]:
    return ["", f"![{alt}]({images[kind]})"] if kind in images else []


def render_dataset(report: DatasetReport, links: Mapping[str, str]) -> list[str]:
    """A dataset's section: its CSV, the per-sweep table, skipped runs, the ablations, the sample grids.

    `links` maps "csv" and each figure made ("figure2", "regions", "samples") to its path relative to the page.
    """
    lines = [f"## {report.dataset}", ""]
    if "csv" in links:
        lines += [f"Per sweep as CSV: [{links['csv']}]({links['csv']})", ""]
    lines += _main_table(report) + ["", _skipped_line(report.skipped)]
    lines += _ablation_sections(ablations(report.rows), links)
    if "samples" in links:
        lines += ["", "### Synthetic samples beside the real shots", "",
                  "A row per class: the real shots the generator was trained on, then its images (the method "
                  "row's sweep run, artifacts `synthetic/real_shots.png` and `synthetic/samples.png`).",
                  *_image(links, "samples", "real shots and synthetic samples")]
    return lines


def render_markdown(reports: Mapping[str, DatasetReport], command: str, uri: str, experiment: str,
                    links: Mapping[str, Mapping[str, str]]) -> str:
    """The results page: how to regenerate it, the store, then a section per dataset (see `render_dataset`)."""
    lines = ["# fsynth results", "", f"Regenerate: `{command}`", "",
             f"Tracking URI: `{redact(uri)}` (experiment `{experiment}`)", "", NOTE]
    for name, report in reports.items():
        lines += ["", *render_dataset(report, links.get(name, {}))]
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
            "preset": row.preset, "loss_preset": row.loss_preset, "regions": regions_label(row.regions),
            "shots": row.shots, "label": row.label, "seeds": len(row.tests),
            "test_mean": f"{row.test_mean:.4f}", "test_std": "" if row.test_std is None else f"{row.test_std:.4f}",
            "test_per_seed": ";".join(f"{t:.4f}" for t in row.tests), "seed_ids": ";".join(row.seeds),
            "val_mean": "" if row.val_mean is None else f"{row.val_mean:.4f}",
            **{f"measured_{k.split('/')[1]}": f"{row.measured[k]:.6g}" if k in row.measured else ""
               for k in MEASURED},
            **{f"mixing_{k.split('/')[1]}": f"{row.measured[k]:.4g}" if k in row.measured else "" for k in MIXING},
            "features": row.features, "synthetic": row.synthetic,
            "synthetic_recognised": "" if row.recognised is None else f"{row.recognised:.2f}",
            "paper": "" if paper is None else f"{paper.accuracy:g}", "paper_row": "" if paper is None else paper.label,
            "paper_other": ";".join(f"{c.label}={c.accuracy:g}" for c in row.reference[1:]),
            "command": row.command, "parent_run": row.parent_run_id,
        })
    return out.getvalue()


# ----------------------------------------------------------------------------------------------------- figures


def _seed_mean_history(client: MlflowClient, run_ids: Sequence[str]) -> list[dict[str, float]]:
    """Figure 2's per-epoch measured regularisers, mean over the runs' seeds: [{epoch, MEASURED key: value}]."""
    sums: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run_id in run_ids:
        for key in MEASURED:
            for metric in client.get_metric_history(run_id, key):
                sums[metric.step][key].append(metric.value)
    return [{"epoch": step, **{k: statistics.fmean(v) for k, v in sums[step].items()}} for step in sorted(sums)]


def _download(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path | None:
    """An artifact of the run, downloaded under `dst`; None when the run has no such artifact."""
    from mlflow.exceptions import MlflowException

    folder, _, name = path.rpartition("/")
    try:
        if name not in {Path(a.path).name for a in client.list_artifacts(run_id, folder or None)}:
            return None
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except (MlflowException, OSError):  # an unreachable artifact store: the report goes on without this figure
        return None


def _sample_grids(client: MlflowClient, method: SweepRow, path: Path, title: str) -> Path | None:
    """The method row's real-shot and synthetic grids side by side, when its sweep run logged either."""
    from fsynth.plots import plot_side_by_side

    with tempfile.TemporaryDirectory(prefix="fsynth-report-") as tmp:
        real, synthetic = (_download(client, method.parent_run_id, f"synthetic/{name}", Path(tmp))
                           for name in ("real_shots.png", "samples.png"))
        if real is None and synthetic is None:
            return None
        return plot_side_by_side(real, synthetic, path, title=title)


def make_figures(dataset: str, ab: Ablations, img_dir: Path, client: MlflowClient) -> dict[str, Path]:
    """The dataset's figures under `img_dir` (<dataset>-regions|figure2|samples.png), each only where its rows or
    artifacts exist: accuracy vs regions, Figure 2 (method vs CE only, seed means), the sample grids."""
    from fsynth.plots import plot_accuracy_vs_clusters, plot_figure2

    figures: dict[str, Path] = {}
    if len(ab.regions) >= 2:
        points = [(r.regions[1] if r.regions[0] == "static" else regions_label(r.regions), r.test_mean / 100,
                   (r.test_std or 0.0) / 100) for r in ab.regions]
        figures["regions"] = plot_accuracy_vs_clusters(points, img_dir / f"{dataset}-regions.png",
                                                       title=f"{dataset}: method, accuracy vs regions")
    curves = {name: _seed_mean_history(client, ab.loss[b].run_ids) for b, name in FIGURE2.items() if b in ab.loss}
    if ab.one_region:  # where the default regions leave the terms at 0, one region shows them at work
        curves = {f"{k}, {regions_label(ab.setting.regions)}": v for k, v in curves.items()}
        curves.update({f"{FIGURE2[b]}, {regions_label(r.regions)}": _seed_mean_history(client, r.run_ids)
                       for b, r in ab.one_region.items()})
    if any(curves.values()):
        figures["figure2"] = plot_figure2({k: v for k, v in curves.items() if v}, img_dir / f"{dataset}-figure2.png",
                                          title=f"{dataset}: measured regularisers (seed mean)")
    if ab.method is not None and ab.method.parent_run_id:
        grids = _sample_grids(client, ab.method, img_dir / f"{dataset}-samples.png", title=dataset)
        if grids is not None:
            figures["samples"] = grids
    return figures


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


def collect(uri: str, experiment: str, datasets: Sequence[str] = ()) -> dict[str, DatasetReport]:
    """Read the experiment's final and sweep runs and aggregate them per dataset (only `datasets` if given)."""
    from mlflow.exceptions import MlflowException

    client, experiment_id = open_experiment(uri, experiment)
    try:
        finals = [_final_run(r) for r in _search(client, experiment_id, "final")]
        sweeps = sweep_infos(_search(client, experiment_id, "sweep"))
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
    return aggregate(finals, sweeps, _tables_or_none())


def log_figures(uri: str, method: SweepRow | None, figures: Mapping[str, Path]) -> None:
    """Log the figures under `report/` on the method row's sweep run (none without a method row)."""
    from fsynth.tracking import log_artifacts

    if method is None or not method.parent_run_id:
        return
    for path in figures.values():
        log_artifacts(uri, method.parent_run_id, path, "report")


def write_report(reports: Mapping[str, DatasetReport], out: Path, command: str, uri: str,
                 experiment: str) -> list[Path]:
    """Write the page `out`, and beside it <out stem>/<dataset>.csv and <out stem>/img/<dataset>-*.png (the
    figures also logged to MLflow, see `log_figures`); return the paths, the page last."""
    from fsynth.tracking import client_for

    folder = out.parent / out.stem
    folder.mkdir(parents=True, exist_ok=True)
    client, written, links = client_for(uri), [], {}
    for name, report in reports.items():
        ab = ablations(report.rows)
        figures = make_figures(name, ab, folder / "img", client)
        log_figures(uri, ab.method, figures)
        table = folder / f"{name}.csv"
        table.write_text(render_csv(report), encoding="utf-8")
        written += [table, *figures.values()]
        links[name] = {kind: path.relative_to(out.parent).as_posix()
                       for kind, path in {"csv": table, **figures}.items()}
    out.write_text(render_markdown(reports, command, uri, experiment, links), encoding="utf-8")
    return [*written, out]


def _out_page(text: str) -> Path:
    """--out as an absolute markdown path; a folder (the old meaning of --out) is a one-line error."""
    path = Path(text).expanduser().resolve()
    if path.suffix != ".md" or path.is_dir():
        raise ConfigError(f"--out names the results page, a .md file (e.g. {DEFAULT_OUT}), got {text}; the CSVs "
                          "and figures go to a folder of the same name beside it")
    writable_folder(path.with_suffix(""), "--out")  # the page's folder of CSVs and figures, made beside it
    return path


def main(argv: Sequence[str] | None = None) -> int:
    from fsynth.tracking import resolve_tracking_uri

    args = build_parser().parse_args(argv)
    out = _out_page(args.out)
    given = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not given and "://" not in args.storage:
        writable_folder(args.storage, "--storage")  # the store's folder (figures are logged to it)
    uri = resolve_tracking_uri(given, args.storage, create=False)
    reports = collect(uri, args.experiment, args.dataset)
    for path in write_report(reports, out, _command(args), uri, args.experiment):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
