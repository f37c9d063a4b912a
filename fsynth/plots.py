"""PNG and CSV artifacts of a run: confusion matrix, regulariser curves (Figure 2), accuracy vs clusters, image
grids (the real shots, laid out like the synthetic set's samples.png) and two images side by side."""

from __future__ import annotations

import csv
import io
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# Figure + FigureCanvasAgg, never pyplot: no global figure registry or backend switch, so callers' matplotlib
# state is untouched and concurrent threads (Ray actors, Tune callbacks) cannot draw on each other's figures.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from fsynth.cache import atomic_write
from fsynth.data.fewshot import load_manifest
from fsynth.data.records import Sample, load_image

DPI = 100
MEASURED = (("measured/discrepancy", "discrepancy"), ("measured/robustness", "robustness"))
LOSS_PARTS = ("train/loss", "train/ce_real", "train/ce_synth", "train/discrepancy", "train/robustness")
ACCURACIES = ("train/accuracy", "val/accuracy")
# What the regularisers can act on (fsynth.batch_regions.MixingCounter): shares of the synthetic samples.
MIXING = (("mixing/synthetic_in_mixed", "in a region with a real sample"),
          ("mixing/batch_synthetic_in_t", "with a real sample of its region in its batch"))
# = fsynth.synthetic.write_sample_grid's samples.png (8 images per class, 64 px cells): the real-shot grid is laid
# out the same way, so the two line up class by class when shown side by side.
GRID_PER_CLASS, GRID_CELL = 8, 64


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: PNG rendering without any global backend
    return fig


def _save(fig: Figure, path: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


def _message(path: str | Path, text: str, title: str) -> Path:
    """A small figure that says why there is nothing to plot, so the artifact still exists."""
    fig = _new_figure(5, 3)
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=14)
    return _save(fig, path, title)


def _check_confusion(confusion, classnames: Sequence[str]) -> np.ndarray:
    m = np.asarray(confusion)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(classnames) or not len(classnames):
        raise ValueError(f"confusion must be [C, C] with C = {len(classnames)} >= 1 class names, got {m.shape}")
    return m


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _confusion_axes(fig: Figure, side: float, left: float, bottom: float, top: float):
    """Axes and colourbar placed by hand: constrained layout would cost a second full draw of every tick label."""
    width, height = left + side + 1.3, bottom + side + top
    fig.set_size_inches(width, height)
    ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
    cax = fig.add_axes(((left + side + 0.15) / width, bottom / height, 0.2 / width, side / height))
    return ax, cax


def plot_confusion(confusion, classnames: Sequence[str], path: str | Path, title: str = "") -> Path:
    """[C, C] counts, rows = true class, columns = predicted (as `evaluate` builds it), as a row-normalised PNG.

    Row labels carry each class's accuracy (recall); counts are written in the cells only while C <= 20.
    """
    m = _check_confusion(confusion, classnames)
    c = len(classnames)
    totals = m.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(totals[:, None] > 0, m / np.maximum(totals, 1)[:, None], 0.0)
        recall = np.diag(m) / totals
    side = float(np.clip(1.0 + 0.45 * c, 4, 20))  # capped: 200 classes stay a ~2400 px image
    size = float(np.clip(0.7 * 72 * side / c, 3.5, 9))  # tick labels about 70% of a cell's height
    cols = [_short(n) for n in classnames]
    rows = [f"{n} ({'n/a' if math.isnan(r) else f'{r:.0%}'})" for n, r in zip(cols, recall, strict=True)]
    inch = 0.6 * size / 72  # a DejaVu Sans character's mean width at `size`
    fig = Figure(dpi=DPI)
    FigureCanvasAgg(fig)
    ax, cax = _confusion_axes(fig, side, 0.7 + inch * max(map(len, rows)), 0.6 + inch * max(map(len, cols)),
                              0.9 if title else 0.5)
    fig.colorbar(ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto"),
                 cax=cax, label="fraction of the true class")
    ax.set_xticks(range(c), cols, rotation=90, fontsize=size)
    ax.set_yticks(range(c), rows, fontsize=size)
    ax.set(xlabel="predicted", ylabel="true (accuracy)")
    if c <= 20:
        cell = float(np.clip(0.3 * 72 * side / c, 6, 11))  # a third of the cell: 3-digit counts fit
        for (i, j), count in np.ndenumerate(m):
            ax.text(j, i, str(int(count)), ha="center", va="center", fontsize=cell,
                    color="white" if norm[i, j] > 0.5 else "black")
    total = int(m.sum())
    ax.set_title(f"accuracy {np.trace(m) / total:.1%} of {total}" if total else "no samples", fontsize=10)
    return _save(fig, path, title)


def _series(history: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the epochs that recorded `key`; an epoch without "epoch" counts by position."""
    xs, ys = [], []
    for i, h in enumerate(history):
        if h.get(key) is not None:
            xs.append(float(h.get("epoch", i)))
            ys.append(float(h[key]))
    return xs, ys


def _lines(ax, history: Sequence[Mapping], keys: Sequence[tuple[str, str]]) -> int:
    """Draw each recorded key as a line; returns how many were drawn."""
    drawn = 0
    for key, label in keys:
        xs, ys = _series(history, key)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=label)
            drawn += 1
    return drawn


def plot_regulariser_curves(history: Sequence[Mapping], path: str | Path, title: str = "") -> Path:
    """`fit`'s per-epoch metric dicts as panels: measured regularisers (Figure 2), loss parts, accuracies.

    A panel whose keys were never recorded is left out; an empty history writes a "no epochs" figure.
    """
    if not history:
        return _message(path, "no epochs", title)
    panels = [("measured regularisers (λ = 1)", MEASURED),
              ("training loss parts", [(k, k.removeprefix("train/")) for k in LOSS_PARTS]),
              ("accuracy", [(k, k.split("/")[0]) for k in ACCURACIES]),
              ("region mixing (share of synthetic samples)", MIXING)]
    panels = [(name, keys) for name, keys in panels if any(_series(history, k)[0] for k, _ in keys)]
    if not panels:
        return _message(path, "no metrics recorded", title)
    fig = _new_figure(5 * len(panels), 4)
    for i, (name, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _lines(ax, history, keys)
        ax.set(title=name, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path, title)


def plot_figure2(curves: Mapping[str, Sequence[Mapping]], path: str | Path, title: str = "") -> Path:
    """The paper's Figure 2 across runs: {label: history}, measured discrepancy and robustness vs epoch."""
    if not curves:
        return _message(path, "no runs", title)
    fig = _new_figure(10, 4)
    for i, (key, name) in enumerate(MEASURED):
        ax = fig.add_subplot(1, 2, i + 1)
        drawn = sum(_lines(ax, history, [(key, label)]) for label, history in curves.items())
        ax.set(title=f"measured {name}", xlabel="epoch")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path, title)


def _category(label) -> str:
    """A number is a cluster multiple (k = multiple x C); anything else (e.g. "single") is shown as is."""
    return f"{label:g}×C" if isinstance(label, numbers.Real) and not isinstance(label, bool) else str(label)


def plot_accuracy_vs_clusters(points: Sequence[tuple], path: str | Path, title: str = "") -> Path:
    """[(label_or_multiple, mean_accuracy, std_accuracy)] as error bars, in the given order on the x axis."""
    if not points:
        return _message(path, "no points", title)
    labels = [_category(p[0]) for p in points]
    means = np.array([float(p[1]) for p in points])
    stds = np.array([float(p[2]) for p in points])
    fig = _new_figure(max(4.0, 1.2 * len(points) + 1.5), 4)
    ax = fig.add_subplot()
    x = np.arange(len(points))
    ax.errorbar(x, means, yerr=stds, fmt="o", capsize=4)  # no line: the x axis is categorical
    for xi, mean in zip(x, means, strict=True):
        ax.annotate(f"{mean:.1%}", (xi, mean), textcoords="offset points", xytext=(6, 0), ha="left", va="center",
                    fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_xlim(-0.5, len(points) - 0.5)
    ax.set(xlabel="regions", ylabel="accuracy (mean ± std)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path, title)


def write_image_grid(rows: Sequence[Sequence[Image.Image]], path: str | Path, per_row: int = GRID_PER_CLASS,
                     cell: int = GRID_CELL) -> Path:
    """One grid row per entry of `rows` (e.g. a class): its first `per_row` images, each resized to cell x cell px;
    a row with fewer images stays white on the right. PNG of [per_row * cell, len(rows) * cell] px."""
    grid = Image.new("RGB", (per_row * cell, max(len(rows), 1) * cell), "white")
    for r, images in enumerate(rows):
        for c, img in enumerate(list(images)[:per_row]):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC), (c * cell, r * cell))
    return atomic_write(path, lambda f: grid.save(f, format="PNG"))


def write_shot_grid(fewshot_dir: str | Path, path: str | Path, per_class: int = GRID_PER_CLASS,
                    cell: int = GRID_CELL) -> Path:
    """The real shots of a few-shot folder (its manifest's `train` rows) as a grid: a row per class in label order,
    the first `per_class` shots by sample id in each, i.e. the layout of the synthetic set's samples.png."""
    manifest = load_manifest(Path(fewshot_dir) / "manifest.parquet")
    shots = manifest[manifest["split"] == "train"].sort_values(["label", "sample_id"])
    rows = [[load_image(Sample(str(s.sample_id), int(s.label), str(s.path), int(s.index)))
             for s in group.head(per_class).itertuples()]
            for _, group in shots.groupby("label", sort=True)]
    return write_image_grid(rows, path, per_class, cell)


def plot_side_by_side(left: str | Path | None, right: str | Path | None, path: str | Path,
                      titles: tuple[str, str] = ("real shots", "synthetic"), title: str = "") -> Path:
    """Two image files next to each other at about their own pixel size, each under its title; a missing one
    (None or no file) leaves its panel saying so, so the other still shows."""
    images = [_read_rgb(p) for p in (left, right)]
    widths = [img.shape[1] if img is not None else 256 for img in images]
    height = max([img.shape[0] for img in images if img is not None] or [256])
    fig = _new_figure(max(4.0, (sum(widths) + 60) / DPI), height / DPI + (1.0 if title else 0.6))
    for i, (img, name) in enumerate(zip(images, titles, strict=True)):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.set_axis_off()
        ax.set_title(name)
        if img is None:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.imshow(img, interpolation="nearest")
    return _save(fig, path, title)


def _read_rgb(path: str | Path | None) -> np.ndarray | None:
    """[H, W, 3] uint8 of an image file, None when there is no file."""
    if path is None or not Path(path).is_file():
        return None
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def save_confusion_csv(confusion, classnames: Sequence[str], path: str | Path) -> Path:
    """[C, C] counts as CSV: header row of predicted class names, first column the true class name."""
    m = _check_confusion(confusion, classnames)

    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        out = csv.writer(text)
        out.writerow(["true\\predicted", *classnames])
        out.writerows([name, *map(int, row)] for name, row in zip(classnames, m, strict=True))
        text.detach()  # flush into f but leave closing it to atomic_write

    return atomic_write(path, write)
