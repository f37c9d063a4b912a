"""Which figures a dataset's ablations call for, their data (seed means of metric histories) and their drawing."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from fsynth.plots import plot_accuracy_vs_clusters, plot_figure2
from fsynth.results.ablations import FIGURE2, Ablations
from fsynth.results.rows import regions_label

History = list[dict[str, float]]  # [{"epoch": step, MEASURED key: value, ...}], by epoch


def regions_points(ab: Ablations) -> list[tuple]:
    """Accuracy vs regions: (K multiple or the regions' label, mean test fraction, its std) per regions row."""
    return [(r.regions[1] if r.regions[0] == "static" else regions_label(r.regions), r.test_mean / 100,
             (r.test_std or 0.0) / 100) for r in ab.regions]


def figure2_runs(ab: Ablations) -> dict[str, tuple[str, ...]]:
    """Figure 2's curves: label -> the final runs (seeds) to average, method and CE-only at the ablations' regions,
    then, where the dataset has them, the same two with a single region (where the default regions leave the
    terms at 0, one region shows them at work)."""
    curves = {name: ab.loss[b].run_ids for b, name in FIGURE2.items() if b in ab.loss}
    if ab.one_region:
        curves = {f"{k}, {regions_label(ab.setting.regions)}": v for k, v in curves.items()}
        curves.update({f"{FIGURE2[b]}, {regions_label(r.regions)}": r.run_ids for b, r in ab.one_region.items()})
    return curves


def seed_mean_history(points: Iterable[tuple[str, int, float]]) -> History:
    """Per-epoch means over seeds of (metric key, step, value) points, in the order they were read."""
    sums: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for key, step, value in points:
        sums[step][key].append(value)
    return [{"epoch": step, **{k: statistics.fmean(v) for k, v in sums[step].items()}} for step in sorted(sums)]


def draw_figures(dataset: str, ab: Ablations, histories: Mapping[str, Sequence[Mapping[str, float]]],
                 img_dir: Path) -> dict[str, Path]:
    """The dataset's plotted figures under `img_dir`, each only where its rows exist: accuracy vs regions
    (<dataset>-regions.png), Figure 2 from `histories` (figure2_runs' labels -> seed means; <dataset>-figure2.png)."""
    figures: dict[str, Path] = {}
    if len(ab.regions) >= 2:
        figures["regions"] = plot_accuracy_vs_clusters(regions_points(ab), img_dir / f"{dataset}-regions.png",
                                                       title=f"{dataset}: method, accuracy vs regions")
    if any(histories.values()):
        figures["figure2"] = plot_figure2({k: v for k, v in histories.items() if v}, img_dir / f"{dataset}-figure2.png",
                                          title=f"{dataset}: measured regularisers (seed mean)")
    return figures
