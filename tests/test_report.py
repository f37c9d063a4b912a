"""`python -m fsynth.report` against a real MLflow sqlite store laid out as the tune job writes it (the pure rows,
ablations and rendering have their own tests in tests/results/)."""

import csv
import json
import re
import time

import numpy as np
import pytest
from PIL import Image

from fsynth import plots, report
from fsynth.baselines import apply_baseline
from fsynth.cli import run_main
from fsynth.config import build_config, with_values
from fsynth.jobs.report_runs import RECOGNISED_KEY
from fsynth.jobs.tracking import (
    MlflowReporter,
    client_for,
    end_run,
    log_artifacts,
    log_params,
    resolve_tracking_uri,
    start_run,
)
from fsynth.stages import ensure_fewshot
from tests.data.fake_roots import make_root

# MLflow's own SQLAlchemy models trigger this; nothing fsynth can change.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

EXPERIMENT = "fsynth"
BEST = {"training.lr": 1e-4, "training.weight_decay": 5e-4, "loss.lambda_discrepancy": 0.1,
        "loss.lambda_robustness": 1.0, "partition.mode": "static", "partition.cluster_multiple": 2.0}
TUNE = "python -m fsynth.tune --dataset fashion-mnist --space ablation"
I2I = {"generator.init_from": "shots", "generator.strength": 0.5}
# The fashion-mnist ablation set: (name, baseline, --set values, test accuracies of seeds 0.., command suffix).
ABLATION_RUNS = [
    ("real", "real-only", {}, (0.74, 0.75, 0.76), "--baseline real-only"),
    ("ce", "real-synthetic-ce", {}, (0.76, 0.77, 0.78), "--baseline real-synthetic-ce"),
    ("disc", "discrepancy-only", {}, (0.77, 0.78, 0.79), "--baseline discrepancy-only"),
    ("rob", "robustness-only", {}, (0.78, 0.79, 0.80), "--baseline robustness-only"),
    ("method", "method", {}, (0.80, 0.81, 0.82), "--baseline method"),
    # two seeds each from here on: fewer runs to create, and a std all the same
    ("single", "method", {"partition.mode": "single"}, (0.77, 0.79), "--set partition.mode=single"),
    ("k1", "method", {"partition.cluster_multiple": 1.0}, (0.78, 0.80), "--set partition.cluster_multiple=1"),
    ("k4", "method", {"partition.cluster_multiple": 4.0}, (0.79, 0.81), "--set partition.cluster_multiple=4"),
    ("protoaug", "method", {"loss.preset": "protoaug"}, (0.79, 0.80), "--set loss.preset=protoaug"),
    ("shots4", "method", {"data.shots": 4}, (0.60, 0.62), "--shots 4"),
    ("real4", "real-only", {"data.shots": 4}, (0.58, 0.60), "--baseline real-only --shots 4"),
    ("emb", "method", {"partition.features": "embedding"}, (0.78, 0.79), "--set partition.features=embedding"),
    ("i2i", "method", I2I, (0.82, 0.84), "--set generator.init_from=shots --set generator.strength=0.5"),
    ("ce-i2i", "real-synthetic-ce", I2I, (0.79, 0.80),
     "--baseline real-synthetic-ce --set generator.init_from=shots --set generator.strength=0.5"),
]
# The starting model's accuracy on each sweep's synthetic set (logged on the sweep run, as fsynth.jobs.experiment does).
RECOGNISED = {"ce": 0.13, "method": 0.13, "i2i": 0.21, "ce-i2i": 0.21}
# Final-epoch measured (discrepancy, robustness) of the finals that use synthetic images, and their mixing (share
# of synthetic samples in a region with a real one, over the epoch and in their batch); the robustness-only row's
# regularisers saw no synthetic sample.
MEASURED = {"ce": (0.3, 0.07, 0.9, 0.6), "disc": (0.12, 0.06, 0.9, 0.6), "rob": (0.25, 0.04, 0.0, 0.0),
            "method": (0.1, 0.05, 0.9, 0.6)}


def _tags(kind, dataset, sweep, baseline, space="demo", **extra):
    return {"fsynth.kind": kind, "fsynth.dataset": dataset, "fsynth.sweep": sweep, "fsynth.baseline": baseline,
            "fsynth.space": space, **extra}


def _final(uri, cfg, parent, run_tags, seed, test, val, status, measured):
    """One final run: two epochs (measured regularisers at both, when given), then its test accuracy."""
    run = start_run(uri, EXPERIMENT, f"final-seed{seed}", parent_run_id=parent,
                    tags={**run_tags, "fsynth.kind": "final", "fsynth.seed": str(seed)})
    log_params(uri, run, with_values(cfg, {"training.seed": seed}))
    reporter = MlflowReporter(uri, run)
    first = {"measured/discrepancy": 2 * measured[0], "measured/robustness": 2 * measured[1]} if measured else {}
    last = {"measured/discrepancy": measured[0], "measured/robustness": measured[1],
            "mixing/synthetic_in_mixed": measured[2], "mixing/batch_synthetic_in_t": measured[3]} if measured else {}
    reporter({"epoch": 0, "train/loss": 1.0, "val/accuracy": val - 0.05, **first})
    reporter({"epoch": 1, "test/accuracy": test, "best/val_accuracy": val, "best/epoch": 1, **last})
    if status != "RUNNING":
        end_run(uri, run, status)
    time.sleep(0.01)  # distinct end times: a rerun of a seed must be the later one


def _sweep(uri, cfg, baseline, finals, *, space="demo", name="", command=None, statuses=None, best=None,
           measured=None, trials=0, recognised=None):
    """A sweep run, `trials` trial runs (test accuracy 0.99, which must never count) and final runs; its run id.

    `finals` is [(seed, test, val)], `statuses` {index: FAILED/RUNNING} for final runs that must be skipped.
    """
    dataset = cfg.data.dataset
    sweep_id = f"{dataset}-{baseline}-{space}-{name}"
    run_tags = _tags("sweep", dataset, sweep_id, baseline, space)
    # (no params on the parent: the report reads the final runs' params, and each logged run costs test time)
    parent = start_run(uri, EXPERIMENT, f"sweep-{sweep_id}",
                       tags={**run_tags, **({"fsynth.command": command} if command else {})})
    for i in range(trials):
        trial = start_run(uri, EXPERIMENT, f"trial-{i}", parent_run_id=parent,
                          tags={**run_tags, "fsynth.kind": "trial"})
        MlflowReporter(uri, trial)({"epoch": 0, "val/accuracy": 0.99, "test/accuracy": 0.99})
        end_run(uri, trial)
    for i, (seed, test, val) in enumerate(finals):
        _final(uri, cfg, parent, run_tags, seed, test, val, (statuses or {}).get(i, "FINISHED"), measured)
    if best is not None:
        client_for(uri).set_tag(parent, "fsynth.best_values", json.dumps(best))
    if recognised is not None:
        MlflowReporter(uri, parent)({RECOGNISED_KEY: recognised})
    end_run(uri, parent)
    return parent


def _config(preset, dataset, baseline, values=None):
    return apply_baseline(with_values(build_config(preset), {"data.dataset": dataset, **(values or {})}), baseline)


def _grids(uri, parent, tmp):
    """The artifacts fsynth.tune logs beside each other on a sweep run: the real shots (made by the same code as
    fsynth.jobs.experiment.log_sweep_inputs, from a few-shot folder of a fake Fashion-MNIST) and the synthetic grid."""
    root = make_root("fashion-mnist", tmp / "data", per_class=3)
    cfg = build_config("embedded", overrides=["data.shots=2", "data.val_per_class=1"],
                       extra={"data": {"root": str(root)}})
    real = plots.write_shot_grid(ensure_fewshot(cfg, tmp / "fewshot"), tmp / "real_shots.png")
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(8)]
              for _ in range(10)]
    synthetic = plots.write_image_grid(images, tmp / "samples.png")
    for path in (real, synthetic):
        log_artifacts(uri, parent, path, "synthetic")


def _fashion_mnist(uri, tmp):
    """The ablation set of fashion-mnist (space ablation, 3 seeds each) and the main demo sweep; the parent run ids
    of the ablation's method row and of the demo sweep."""
    ids = {}
    for name, baseline, values, tests, suffix in ABLATION_RUNS:
        cfg = _config("embedded", "fashion-mnist", baseline, {"training.lr": 1e-4, **values})
        finals = [(seed, test, test - 0.01) for seed, test in enumerate(tests)]
        ids[name] = _sweep(uri, cfg, baseline, finals, space="ablation", name=name, command=f"{TUNE} {suffix}",
                           best={}, measured=MEASURED.get(name), recognised=RECOGNISED.get(name))
    demo = _sweep(uri, _config("embedded", "fashion-mnist", "method"), "method", [(0, 0.80, 0.78), (1, 0.82, 0.79)],
                  best=BEST, command="python -m fsynth.tune --dataset fashion-mnist")
    _grids(uri, ids["method"], tmp)
    return ids["method"], demo


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module (creating an MLflow sqlite schema takes seconds): {uri, method, demo}."""
    uri = resolve_tracking_uri("", tmp_path_factory.mktemp("store"))
    dtd = "python -m fsynth.tune --dataset dtd --root ~/data"
    _sweep(uri, _config("full", "dtd", "method"), "method",
           [(0, 0.75, 0.70), (1, 0.76, 0.72), (2, 0.74, 0.71), (3, 0.10, 0.10)], statuses={3: "FAILED"}, best=BEST,
           command=dtd, trials=2)
    # seed 1 twice: the later run counts; one run still RUNNING
    _sweep(uri, _config("full", "dtd", "real-only"), "real-only",
           [(0, 0.73, 0.69), (1, 0.60, 0.60), (1, 0.74, 0.70), (2, 0.5, 0.5)], statuses={3: "RUNNING"},
           best={"training.lr": 1e-5}, command=f"{dtd} --baseline real-only")
    _sweep(uri, _config("full", "dtd", "real-synthetic-ce"), "real-synthetic-ce", [(0, 0.7412, 0.70)])  # no command
    method, demo = _fashion_mnist(uri, tmp_path_factory.mktemp("grids"))
    empty = start_run(uri, "empty", "nothing")  # an experiment with no final runs
    end_run(uri, empty)
    return {"uri": uri, "method": method, "demo": demo}


@pytest.fixture(scope="module")
def written(store, tmp_path_factory):
    """The report of the whole store: {path relative to the page's folder: file}."""
    out = tmp_path_factory.mktemp("docs")
    assert run_main(report.main, ["--tracking-uri", store["uri"], "--out", str(out / "results.md")]) == 0
    return {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}


def _csv(path):
    return {(row["baseline"], row["label"]): row for row in csv.DictReader(path.read_text().splitlines())}


def _section(text, dataset):
    """The page's part about `dataset`: from its heading to the next dataset's."""
    return text.split(f"\n## {dataset}\n")[1].split("\n## ")[0]


def _table(section, heading):
    """The data lines of the table under the ### heading that starts with `heading`, and the text after it."""
    part = section.split(f"### {heading}")[1].split("\n### ")[0]
    return [line for line in part.splitlines() if line.startswith("| ")][1:], part


def test_files_written(written):
    assert sorted(written) == ["results.md", "results/dtd.csv", "results/fashion-mnist.csv",
                               "results/img/fashion-mnist-figure2.png", "results/img/fashion-mnist-regions.png",
                               "results/img/fashion-mnist-samples.png"]


def test_dtd_csv_aggregates_seeds(written):
    rows = {baseline: row for (baseline, _), row in _csv(written["results/dtd.csv"]).items()}
    assert set(rows) == {"method", "real-only", "real-synthetic-ce"}
    method = rows["method"]
    assert (method["seeds"], method["seed_ids"]) == ("3", "0;1;2")  # the FAILED seed 3 does not count
    assert float(method["test_mean"]) == pytest.approx(75.0)
    assert float(method["test_std"]) == pytest.approx(1.0)  # sample std of 75, 76, 74
    assert [float(v) for v in method["test_per_seed"].split(";")] == pytest.approx([75.0, 76.0, 74.0])
    assert float(method["val_mean"]) == pytest.approx(71.0)
    assert (method["paper"], method["paper_row"], method["preset"]) == ("74.5", "Table 1: Paper, full", "full")
    assert method["command"] == "python -m fsynth.tune --dataset dtd --root ~/data" and method["parent_run"]
    real = rows["real-only"]
    assert [float(v) for v in real["test_per_seed"].split(";")] == pytest.approx([73.0, 74.0])  # the rerun counts
    assert float(real["test_std"]) == pytest.approx(0.7071, abs=1e-4)
    assert (real["paper"], real["paper_row"]) == ("73.9", "Table 1: Real-finetune")
    ce = rows["real-synthetic-ce"]
    assert (ce["seeds"], ce["test_std"], ce["paper"], ce["command"]) == ("1", "", "74.1", "")
    assert "Table 1: DataDream (per class)=73.1" in ce["paper_other"]


def test_page_header(written, store):
    text = written["results.md"].read_text()
    lines = text.splitlines()
    assert lines[0] == "# fsynth results"
    assert lines[2] == f"Regenerate: `python -m fsynth.report --tracking-uri {store['uri']} --out " + \
        lines[2].split("--out ")[1]
    assert f"Tracking URI: `{store['uri']}` (experiment `fsynth`)" in text
    assert text.index("\n## dtd\n") < text.index("\n## fashion-mnist\n")


def test_dtd_main_table(written):
    text = _section(written["results.md"].read_text(), "dtd")
    assert "Per sweep as CSV: [results/dtd.csv](results/dtd.csv)" in text
    lines = text.splitlines()
    method = next(line for line in lines if line.startswith("| method"))
    assert "static ×2 · protoaug · 16 shots · sd 500/class" in method
    assert "lr=0.0001, wd=0.0005, λ1=0.1, λ2=1" in method and "mode=" not in method
    assert "| 3 | 75.00 ± 1.00 | 75.00 (seed 0), 76.00 (seed 1), 74.00 (seed 2) | 71.00 | – | – | 74.5 | +0.50 |" \
        in method  # no mixing logged, no recognisability: dashes
    assert method.endswith("| `python -m fsynth.tune --dataset dtd --root ~/data` |")
    ce = next(line for line in lines if line.startswith("| real-synthetic-ce"))
    assert "| 74.12 ± – |" in ce and "Table 1: DataDream (per dataset); Table 1: DataDream (per class) = 73.1" in ce
    assert ce.endswith("| – |")  # no fsynth.command tag: a dash
    assert "99.00" not in text  # trial runs never count
    skipped = next(line for line in lines if line.startswith("Skipped"))
    assert "1 FAILED" in skipped and "1 RUNNING" in skipped and "1 superseded" in skipped


def test_dtd_loss_ablation_and_verdict(written):
    text = _section(written["results.md"].read_text(), "dtd")
    rows, part = _table(text, "Loss ablation (Table 2 style): ")
    assert "16 shots, loss preset protoaug, static regions K = 2 × classes, full variant, space demo" in part
    assert [row.split(" | ")[0] for row in rows] == ["| real only", "| real + synthetic CE only",
                                                     "| + both (method)"]  # absent rows are simply absent
    assert rows[1].startswith("| real + synthetic CE only | yes | no | no | 1 | 74.12 ± – | – | – | – | 74.1 | – |")
    assert rows[2].startswith("| + both (method) | yes | yes | yes | 3 | 75.00 ± 1.00 | – | – | – | 74.5 | `python")
    # method seeds 0-2: 75, 76, 74; CE seed 0: 74.12 (no error); real-only seeds 0-1: 73, 74 (not the same seeds:
    # unpaired, sqrt(1/3 + 0.5/2) = 0.76, and 1.50 < 2 x 0.76)
    assert ("**Verdict:** the method does not beat real only by 2 standard errors, but cannot be told apart from "
            "real + synthetic CE only (a row with one seed: no error) (method minus real + synthetic CE only: +0.88 pp "
            "(a row with one seed: no error); real only: +1.50 ± 0.76 pp (unpaired; paired over the 2 shared seeds "
            "+2.00 ± 0.00); paired:") in part
    for omitted in ("### Regions", "### Loss preset", "### Shots", "![", "### Synthetic samples"):
        assert omitted not in text  # fewer than 2 rows, or nothing to draw


def test_fashion_mnist_loss_ablation(written):
    text = _section(written["results.md"].read_text(), "fashion-mnist")
    rows, part = _table(text, "Loss ablation")
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [
        "real only", "real + synthetic CE only", "+ discrepancy", "+ robustness", "+ both (method)"]
    assert rows[0].startswith("| real only | no | no | no | 3 | 75.00 ± 1.00 | – | – |")
    assert rows[1].startswith("| real + synthetic CE only | yes | no | no | 3 | 77.00 ± 1.00 | 0.3 | 0.07 | 90 / 60 |")
    assert rows[3].startswith("| + robustness | yes | no | yes | 3 |")
    assert "| 0 / 0 ⚠ regularisers saw no synthetic sample |" in rows[3]  # marked: it is CE only in effect
    assert rows[4].startswith("| + both (method) | yes | yes | yes | 3 | 81.00 ± 1.00 | 0.1 | 0.05 | 90 / 60 | – |")
    assert rows[4].endswith(f"| `{TUNE} --baseline method` |")
    # the fixture's seeds move in parallel (80, 81, 82 vs 76, 77, 78): a paired error of 0
    assert ("**Verdict:** the method beats real + synthetic CE only and real only by more than 2 standard errors "
            "(method minus real + synthetic CE only: +4.00 ± 0.00 pp (paired over 3 seeds; unpaired ± 0.82); "
            "real only: +6.00 ± 0.00 pp (paired over 3 seeds; unpaired ± 0.82)") in part
    assert ("Final-epoch measured discrepancy / robustness (mean over seeds): method 0.1 / 0.05; "
            "real + synthetic CE only 0.3 / 0.07.") in part
    assert "![Figure 2: measured regularisers per epoch](results/img/fashion-mnist-figure2.png)" in part


def test_fashion_mnist_axis_tables(written):
    text = _section(written["results.md"].read_text(), "fashion-mnist")
    regions, part = _table(text, "Regions")
    assert [r.split(" | ")[0] for r in regions] == ["| single region", "| K = 1 × classes", "| K = 2 × classes",
                                                        "| K = 4 × classes"]
    assert regions[0].endswith(f"| 2 | 78.00 ± 1.41 | – | – | – | `{TUNE} --set partition.mode=single` |")
    assert regions[2].endswith(f"| `{TUNE} --baseline method` |")  # the ablation's method row, not the demo sweep
    assert "![accuracy vs regions](results/img/fashion-mnist-regions.png)" in part
    presets, _ = _table(text, "Loss preset")
    assert [p.split(" | ")[0] for p in presets] == ["| paper", "| protoaug"]
    assert presets[1].endswith(f"| 2 | 79.50 ± 0.71 | – | – | – | `{TUNE} --set loss.preset=protoaug` |")
    shots, _ = _table(text, "Shots")
    assert [s.split(" | ")[0] for s in shots] == ["| 4 (method)", "| 4 (real-only)", "| 16 (method)",
                                                      "| 16 (real-only)"]
    assert shots[1].endswith(f"| `{TUNE} --baseline real-only --shots 4` |")
    assert "![real shots and synthetic samples](results/img/fashion-mnist-samples.png)" in text
    # the main table has every sweep, the demo sweep's included, each with its command
    main = [line for line in text.split("### ")[0].splitlines() if line.startswith("| method")]
    assert len(main) == 9 and all(line.endswith("` |") for line in main)
    i2i = next(line for line in main if "image-to-image 0.5" in line)
    assert "outputs static ×2 · paper · 16 shots · ddpm 64/class image-to-image 0.5" in i2i
    assert "| 60 / 40 | 21 |" not in i2i and "| – | 21 |" in i2i  # no mixing logged for it; 21 % recognised
    assert any(line.endswith("| `python -m fsynth.tune --dataset fashion-mnist` |") for line in main)


def test_figures_written_and_logged(written, store):
    for name in ("regions", "figure2", "samples"):
        path = written[f"results/img/fashion-mnist-{name}.png"]
        with Image.open(path) as img:
            assert img.format == "PNG" and min(img.size) >= 200
            assert img.convert("L").getextrema()[0] < img.convert("L").getextrema()[1]
    client = client_for(store["uri"])
    logged = {a.path for a in client.list_artifacts(store["method"], "report")}
    assert logged == {f"report/fashion-mnist-{n}.png" for n in ("regions", "figure2", "samples")}
    assert not client.list_artifacts(store["demo"], "report")  # only on the method row's sweep run
    with Image.open(written["results/img/fashion-mnist-samples.png"]) as img:
        assert img.size[0] > img.size[1]  # two grids side by side


def test_dataset_filter_and_env_uri(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    page = tmp_path / "out.md"
    assert run_main(report.main, ["--dataset", "dtd", "--out", str(page)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(tmp_path / "out" / "dtd.csv"), str(page)]
    text = page.read_text()
    assert "--dataset dtd" in text and "## fashion-mnist" not in text and "[out/dtd.csv](out/dtd.csv)" in text


@pytest.mark.parametrize(("args", "message"), [
    (["--experiment", "nope"], "experiment 'nope' does not exist in sqlite:"),
    (["--experiment", "empty"], "experiment 'empty' in sqlite:.* has no final runs; run python -m fsynth.tune"),
    (["--dataset", "eurosat"], "no final runs for eurosat .*datasets with runs: dtd, fashion-mnist"),
])
def test_errors_are_one_line(store, tmp_path, capsys, args, message):
    assert run_main(report.main, ["--tracking-uri", store["uri"], "--out", str(tmp_path / "out.md"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err)
    assert not list(tmp_path.iterdir())


def test_out_must_name_a_markdown_page(store, tmp_path, capsys):
    assert run_main(report.main, ["--tracking-uri", store["uri"], "--out", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out names the results page, a .md file" in err
    assert not list(tmp_path.iterdir())


def test_missing_store_is_not_created(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert run_main(report.main, ["--storage", str(tmp_path / "runs"), "--out", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert "no MLflow store at" in err and "python -m fsynth.tune" in err and "--tracking-uri" in err
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_without_the_paper_file(store, tmp_path, capsys, monkeypatch):
    import fsynth.paper

    monkeypatch.delenv(fsynth.paper.ENV_VAR, raising=False)
    monkeypatch.setattr(fsynth.paper, "DEFAULT_PATH", tmp_path / "absent.md")  # e.g. an installed package
    page = tmp_path / "r.md"
    assert run_main(report.main, ["--tracking-uri", store["uri"], "--dataset", "dtd", "--out", str(page)]) == 0
    assert "warning: no published numbers" in capsys.readouterr().err
    assert {row["paper"] for row in _csv(tmp_path / "r" / "dtd.csv").values()} == {""}
    monkeypatch.setenv(fsynth.paper.ENV_VAR, str(tmp_path / "typo.md"))  # asked for explicitly: an error
    assert run_main(report.main, ["--tracking-uri", store["uri"], "--out", str(page)]) == 2
    assert "typo.md does not exist" in capsys.readouterr().err


def test_fashion_mnist_feature_and_synthetic_set_tables(written):
    text = _section(written["results.md"].read_text(), "fashion-mnist")
    features, part = _table(text, "Region features")
    assert "method, 16 shots, loss preset paper, static regions K = 2 × classes" in part
    assert [f.split(" | ")[0] for f in features] == ["| outputs", "| embedding"]  # the method row's first
    assert features[0].endswith(f"| `{TUNE} --baseline method` |")
    assert features[1].endswith(f"| 2 | 78.50 ± 0.71 | – | – | – | `{TUNE} --set partition.features=embedding` |")
    sets, part = _table(text, "Synthetic set")
    assert "outputs features" in part and "text-to-image" not in part.splitlines()[0]
    assert [r.split(" | ")[0] for r in sets] == [
        "| image-to-image 0.5 (21) · real-synthetic-ce", "| image-to-image 0.5 (21) · method",
        "| text-to-image (13) · real-synthetic-ce", "| text-to-image (13) · method"]
    assert "| 2 | 83.00 ± 1.41 |" in sets[1] and "| 3 | 77.00 ± 1.00 |" in sets[2]
    rows = _csv(written["results/fashion-mnist.csv"])
    method = next(r for (b, label), r in rows.items() if b == "method" and r["sweep"].endswith("-method"))
    assert (method["features"], method["synthetic"], method["synthetic_recognised"]) == (
        "outputs", "text-to-image", "13.00")
    real = next(r for (b, _), r in rows.items() if b == "real-only")
    assert (real["features"], real["synthetic"], real["synthetic_recognised"]) == ("", "", "")
