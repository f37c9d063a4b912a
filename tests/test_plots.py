"""The run artifacts: every plot is a real, non-blank PNG written atomically; the confusion CSV round-trips."""

import subprocess
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fsynth import plots
from fsynth.config import build_config
from fsynth.stages import ensure_fewshot
from tests.data.fake_roots import make_root


def assert_png(path, min_side=200):
    """A readable PNG of reasonable size with more than one colour, and no temp file left beside it."""
    assert path.is_file()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min(img.size) >= min_side, img.size
        extrema = img.convert("L").getextrema()
    assert extrema[0] < extrema[1], "blank single-colour image"
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def confusion(c, seed=0):
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 3, size=(c, c))
    m[np.diag_indices(c)] += rng.integers(5, 20, size=c)
    return m


def history(epochs=5, measured=True):
    rows = []
    for e in range(epochs):
        h = {"epoch": e, "train/loss": 2.0 / (e + 1), "train/ce_real": 1.0 / (e + 1), "train/ce_synth": 0.9 / (e + 1),
             "train/discrepancy": 0.1, "train/robustness": 0.05 * e, "train/accuracy": 0.5 + 0.08 * e,
             "val/accuracy": 0.45 + 0.07 * e, "val/loss": 1.0}
        if measured:
            h.update({"measured/discrepancy": 0.3 / (e + 1), "measured/robustness": 0.2 + 0.01 * e})
        rows.append(h)
    return rows


def test_plot_confusion_small(tmp_path):
    names = [f"class {i}" for i in range(6)]
    out = plots.plot_confusion(confusion(6), names, tmp_path / "confusion.png", title="test")
    assert out == tmp_path / "confusion.png"
    assert_png(out, min_side=400)


def test_plot_confusion_many_classes_is_quick_and_capped(tmp_path):
    names = [f"Black-footed Albatross {i:03d}" for i in range(150)]
    m = confusion(150)
    m[3] = 0  # a class without test samples: no division warning, "n/a" accuracy
    start = time.process_time()  # CPU time: a busy shared machine stretches wall time, not this
    out = plots.plot_confusion(m, names, tmp_path / "big.png")
    assert time.process_time() - start < 10  # ~3 s here
    assert_png(out, min_side=1000)
    with Image.open(out) as img:
        assert max(img.size) <= 4000


def test_plot_confusion_rejects_mismatched_names(tmp_path):
    with pytest.raises(ValueError, match="class names"):
        plots.plot_confusion(confusion(4), ["a", "b"], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_regulariser_curves(tmp_path):
    assert_png(plots.plot_regulariser_curves(history(), tmp_path / "curves.png", title="run"))


def test_regulariser_curves_skip_missing_keys(tmp_path):
    partial = [{"epoch": 0, "val/accuracy": 0.4}, {"epoch": 1, "val/accuracy": 0.5, "train/loss": 1.0}]
    assert_png(plots.plot_regulariser_curves(partial, tmp_path / "partial.png"))
    assert_png(plots.plot_regulariser_curves(history(3, measured=False), tmp_path / "unmeasured.png"))


def test_regulariser_curves_empty_history(tmp_path):
    assert_png(plots.plot_regulariser_curves([], tmp_path / "empty.png"))
    assert_png(plots.plot_regulariser_curves([{"epoch": 0}], tmp_path / "nothing.png"))


def test_figure2_compares_runs(tmp_path):
    curves = {"method": history(6), "cross-entropy only": history(4)}
    assert_png(plots.plot_figure2(curves, tmp_path / "figure2.png", title="Figure 2"))
    assert_png(plots.plot_figure2({"unmeasured": history(3, measured=False)}, tmp_path / "none.png"))
    assert_png(plots.plot_figure2({}, tmp_path / "empty.png"))


def test_accuracy_vs_clusters(tmp_path):
    points = [("single", 0.75, 0.01), (1.0, 0.76, 0.005), (2.0, 0.78, 0.01), (4.0, 0.77, 0.02)]
    assert_png(plots.plot_accuracy_vs_clusters(points, tmp_path / "clusters.png"))
    assert_png(plots.plot_accuracy_vs_clusters([], tmp_path / "empty.png"))


def test_image_grid_is_a_row_per_entry(tmp_path):
    colours = [(255, 0, 0), (0, 0, 255)]
    rows = [[Image.new("RGB", (10, 12), colours[0])] * 9, [Image.new("RGB", (5, 5), colours[1])]]  # 9: cut at 8
    out = plots.write_image_grid(rows, tmp_path / "grid.png")
    assert_png(out, min_side=128)
    with Image.open(out) as img:
        assert img.size == (8 * 64, 2 * 64)
        assert img.getpixel((7 * 64 + 32, 32)) == colours[0]  # the 8th cell of row 1
        assert img.getpixel((32, 64 + 32)) == colours[1] and img.getpixel((64 + 32, 64 + 32)) == (255, 255, 255)


def test_shot_grid_has_the_samples_layout(tmp_path):
    """The real shots of a few-shot folder (fake Fashion-MNIST, IDX rows): a row per class, the shots in it."""
    root = make_root("fashion-mnist", tmp_path / "data", per_class=4)
    cfg = build_config("embedded", overrides=["data.shots=3", "data.val_per_class=1"],
                       extra={"data": {"root": str(root)}})
    out = plots.write_shot_grid(ensure_fewshot(cfg, tmp_path / "fewshot"), tmp_path / "real_shots.png", cell=16)
    with Image.open(out) as img:
        assert img.size == (8 * 16, 10 * 16)  # 10 classes, 8 columns like samples.png
        pixels = np.asarray(img.convert("L"))
    assert all(pixels[r * 16:(r + 1) * 16, 3 * 16:].min() == 255 for r in range(10))  # 3 shots: the rest white
    assert pixels[:, :3 * 16].std() > 0


def test_side_by_side(tmp_path):
    left = plots.write_image_grid([[Image.new("RGB", (8, 8), (255, 0, 0))] * 2] * 3, tmp_path / "l.png")
    right = plots.write_image_grid([[Image.new("RGB", (8, 8), (0, 0, 255))] * 8] * 3, tmp_path / "r.png")
    out = plots.plot_side_by_side(left, right, tmp_path / "both.png", title="fashion-mnist")
    assert_png(out)
    with Image.open(out) as img:
        assert img.size[0] > 2 * 512 * 0.9 and img.size[1] >= 3 * 64
    assert_png(plots.plot_side_by_side(None, right, tmp_path / "half.png"))  # a grid not logged: the other shows
    assert_png(plots.plot_side_by_side(None, tmp_path / "absent.png", tmp_path / "none.png"))


def test_confusion_csv_round_trips(tmp_path):
    names = ["cat", "dog, large", "bird"]
    m = confusion(3)
    out = plots.save_confusion_csv(m, names, tmp_path / "confusion.csv")
    frame = pd.read_csv(out, index_col=0)
    assert list(frame.columns) == names and list(frame.index) == names
    np.testing.assert_array_equal(frame.to_numpy(), m)
    assert [p.name for p in tmp_path.iterdir()] == ["confusion.csv"]


def test_overwrite_and_concurrent_writers(tmp_path):
    """Threads writing different figures at once each get their own, and rewriting a path replaces it."""
    target = tmp_path / "same.png"
    plots.plot_accuracy_vs_clusters([("a", 0.5, 0.1)], target)
    errors = []

    def work(i):
        try:
            plots.plot_accuracy_vs_clusters([("single", 0.5, 0.1), (float(i), 0.6, 0.1)], tmp_path / f"t{i}.png")
        except Exception as e:  # surfaced below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    plots.plot_figure2({"method": history(3)}, target)
    for t in threads:
        t.join()
    assert not errors
    for path in [target, *(tmp_path / f"t{i}.png" for i in range(2))]:
        assert_png(path)


def test_does_not_touch_pyplot_or_the_backend(tmp_path):
    # dict.__getitem__: rcParams["backend"] would itself resolve the backend by importing pyplot.
    script = ("import matplotlib, sys\nget = lambda: dict.__getitem__(matplotlib.rcParams, 'backend')\n"
              "before = get()\nfrom fsynth import plots\n"
              "plots.plot_accuracy_vs_clusters([('a', 0.5, 0.1)], sys.argv[1])\n"
              "assert 'matplotlib.pyplot' not in sys.modules\nassert get() == before, get()\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a.png")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
