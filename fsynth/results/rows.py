"""The report's rows: final runs and sweeps as read from a store, one row per sweep aggregated over seeds, labels."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsynth.baselines import BASELINES
from fsynth.config import ExperimentConfig, PartitionConfig, flatten_config
from fsynth.paper import PaperCell, preset_of, reference_rows

DASH = "–"  # a cell or value with no number
NO_SYNTHETIC = ("real-only", "zero-shot")  # baselines whose label leaves out the generator
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


@dataclass(frozen=True)
class FinalRun:
    """One final run (one seed of a sweep's chosen configuration) as the report reads it."""

    run_id: str
    dataset: str
    sweep: str
    baseline: str
    space: str
    seed: str
    status: str
    end_time: int
    config: ExperimentConfig  # the config it ran, read back from its params (fsynth.config.config_from_params)
    test: float | None  # fraction
    val: float | None  # fraction
    parent: str = ""  # the sweep's run id
    measured: Mapping[str, float] = field(default_factory=dict)  # MEASURED key -> its last (final-epoch) value


@dataclass(frozen=True)
class SweepInfo:
    """A sweep's parent run as the report reads it: its id, chosen values, command and synthetic-set accuracy."""

    run_id: str
    best: Mapping[str, Any]  # the sampled values the final seeds used ({} for a space that samples nothing)
    command: str  # the fsynth.tune command line, "" when the run predates the tag
    recognised: float | None = None  # synthetic/starting_model_accuracy: the starting model's accuracy on the set


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


@dataclass(frozen=True)
class DatasetReport:
    """A dataset's sweep rows and the final runs that did not count, with why."""

    dataset: str
    rows: tuple[SweepRow, ...]
    skipped: Mapping[str, int]


# ------------------------------------------------------------------------------------------------------ labels


def _number(value: Any) -> str:
    """A value in short form (2.0 or '2.0' -> '2', '0.0001' -> '0.0001'); non-numbers unchanged."""
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def pct(value: float | None, digits: int = 2) -> str:
    """A percentage with `digits` decimals, a dash for none."""
    return DASH if value is None else f"{value:.{digits}f}"


def num(value: float | None) -> str:
    """A measured quantity to 3 significant digits, a dash for none."""
    return DASH if value is None else f"{value:.3g}"


def run_label(baseline: str, cfg: ExperimentConfig, best: Mapping[str, Any]) -> str:
    """The sweep's name in the table: baseline, partition, loss preset, shots, generator, sampled best values."""
    parts = [baseline]
    if baseline in REGULARISED:
        p = cfg.partition
        parts.append("1 region" if p.mode == "single" else f"{p.features} {p.mode} ×{_number(p.cluster_multiple)}")
        parts.append(cfg.loss.preset)
    parts.append(f"{cfg.data.shots} shots")
    if baseline not in NO_SYNTHETIC:
        generator = f"{cfg.generator.backend} {cfg.generator.images_per_class}/class"
        synthetic = synthetic_label(baseline, cfg)
        if synthetic != "text-to-image":
            generator += f" {synthetic}"
        parts.append(generator)
    order = list(SHORT_KEYS)
    keys = sorted((k for k in best if k not in SHOWN_KEYS), key=lambda k: (order.index(k) if k in order else 99, k))
    chosen = [f"{SHORT_KEYS.get(k, k.rsplit('.', 1)[-1])}={_number(best[k])}" for k in keys]
    return " · ".join(parts) + (f" · {', '.join(chosen)}" if chosen else "")


def synthetic_label(baseline: str, cfg: ExperimentConfig) -> str:
    """The synthetic set a run trained on: 'text-to-image', 'image-to-image <strength>', or '' (none used)."""
    if baseline in NO_SYNTHETIC:
        return ""
    if cfg.generator.init_from != "shots":
        return "text-to-image"
    return f"image-to-image {_number(cfg.generator.strength)}"


def regions(cfg: ExperimentConfig) -> tuple[str, float]:
    """(partition.mode, cluster multiple) of a run; a single region has no multiple (0), whatever was set."""
    mode = cfg.partition.mode
    return (mode, 0.0) if mode == "single" else (mode, cfg.partition.cluster_multiple)


def regions_label(regions: tuple[str, float]) -> str:
    """'single region', 'K = 2 × classes' (static k-means) or 'online, K = 2 × classes'."""
    mode, multiple = regions
    if mode == "single":
        return "single region"
    return f"{'' if mode == 'static' else mode + ', '}K = {multiple:g} × classes"


def paper_variant(cfg: ExperimentConfig) -> str:
    """'full' or 'lightweight': the paper variant a run's config follows (fsynth.paper.preset_of)."""
    return preset_of(flatten_config(cfg))


# ------------------------------------------------------------------------------------------------- aggregation


def _seed_key(seed: str) -> tuple[int, str]:
    """Seeds in numeric order, any that is not a number last."""
    try:
        return (int(float(seed)), seed)
    except (TypeError, ValueError):
        return (10**9, seed)


def _references(run: FinalRun, tables: Path | None) -> tuple[PaperCell, ...]:
    """The published cells `run` corresponds to, the closest first; () without a tables file."""
    if tables is None:
        return ()
    cfg = run.config
    ipc = None if run.baseline in NO_SYNTHETIC else cfg.generator.images_per_class or None
    return reference_rows(run.dataset, run.baseline, paper_variant(cfg), shots=cfg.data.shots, images_per_class=ipc,
                          arch=cfg.model.arch, path=tables)


def _seed_means(runs: Sequence[FinalRun]) -> dict[str, float]:
    """MEASURED (and MIXING) key -> mean over the runs that logged it."""
    return {k: statistics.fmean(r.measured[k] for r in runs if k in r.measured)
            for k in MEASURED + MIXING if any(k in r.measured for r in runs)}


def _sweep_row(runs: list[FinalRun], info: SweepInfo | None, tables: Path | None) -> SweepRow:
    """One row from a sweep's counted final runs (one per seed) and its parent run's tags."""
    runs = sorted(runs, key=lambda r: _seed_key(r.seed))
    last = max(runs, key=lambda r: r.end_time)
    info = info or SweepInfo(last.parent, {}, "")
    cfg = last.config
    return SweepRow(
        dataset=last.dataset, sweep=last.sweep, baseline=last.baseline, space=last.space,
        preset=paper_variant(cfg), shots=cfg.data.shots, label=run_label(last.baseline, cfg, info.best),
        seeds=tuple(r.seed for r in runs), tests=tuple(100 * r.test for r in runs),
        vals=tuple(100 * r.val for r in runs if r.val is not None),
        reference=_references(last, tables), end_time=last.end_time,
        loss_preset=cfg.loss.preset, regions=regions(cfg), command=info.command,
        parent_run_id=info.run_id or last.parent, run_ids=tuple(r.run_id for r in runs), measured=_seed_means(runs),
        features=cfg.partition.features if last.baseline in REGULARISED else "",
        synthetic=synthetic_label(last.baseline, cfg),
        recognised=None if info.recognised is None or last.baseline in NO_SYNTHETIC else 100 * info.recognised,
    )


def _order(row: SweepRow) -> tuple:
    """Rows in fsynth.baselines order, then by shots, label and sweep id."""
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
