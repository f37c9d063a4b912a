"""`python -m fsynth.report` against a real MLflow sqlite store laid out as the tune job writes it."""

import csv
import json
import re
import time

import pytest

from fsynth import report
from fsynth.baselines import apply_baseline
from fsynth.cli import run_main
from fsynth.config import build_config, with_values
from fsynth.tracking import MlflowReporter, client_for, end_run, log_params, resolve_tracking_uri, start_run

# MLflow's own SQLAlchemy models trigger this; nothing fsynth can change.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

EXPERIMENT = "fsynth"
BEST = {"training.lr": 1e-4, "training.weight_decay": 5e-4, "loss.lambda_discrepancy": 0.1,
        "loss.lambda_robustness": 1.0, "partition.mode": "static", "partition.cluster_multiple": 2.0}


def _tags(kind, dataset, sweep, baseline, **extra):
    return {"fsynth.kind": kind, "fsynth.dataset": dataset, "fsynth.sweep": sweep, "fsynth.baseline": baseline,
            "fsynth.space": "demo", **extra}


def _sweep(uri, preset, dataset, baseline, finals, *, statuses=None, best=None):
    """A sweep run, two trial runs (test accuracy 0.99, which must never count) and final runs.

    `finals` is [(seed, test, val)], `statuses` {index: FAILED/RUNNING} for final runs that must be skipped.
    """
    cfg = apply_baseline(with_values(build_config(preset), {"data.dataset": dataset}), baseline)
    sweep_id = f"{dataset}-{baseline}-demo"
    parent = start_run(uri, EXPERIMENT, f"sweep-{sweep_id}", tags=_tags("sweep", dataset, sweep_id, baseline))
    log_params(uri, parent, cfg)
    for i in range(2):
        trial = start_run(uri, EXPERIMENT, f"trial-{i}", parent_run_id=parent,
                          tags=_tags("trial", dataset, sweep_id, baseline))
        MlflowReporter(uri, trial)({"epoch": 0, "val/accuracy": 0.99, "test/accuracy": 0.99})
        end_run(uri, trial)
    for i, (seed, test, val) in enumerate(finals):
        run = start_run(uri, EXPERIMENT, f"final-seed{seed}", parent_run_id=parent,
                        tags=_tags("final", dataset, sweep_id, baseline, **{"fsynth.seed": str(seed)}))
        log_params(uri, run, with_values(cfg, {"training.seed": seed}))
        reporter = MlflowReporter(uri, run)
        reporter({"epoch": 0, "train/loss": 1.0, "val/accuracy": val - 0.05})
        reporter({"epoch": 1, "test/accuracy": test, "best/val_accuracy": val, "best/epoch": 1})
        status = (statuses or {}).get(i, "FINISHED")
        if status != "RUNNING":
            end_run(uri, run, status)
        time.sleep(0.01)  # distinct end times: a rerun of a seed must be the later one
    client = client_for(uri)
    if best is not None:
        client.set_tag(parent, "fsynth.best_values", json.dumps(best))
    end_run(uri, parent)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module (creating an MLflow sqlite schema takes seconds)."""
    uri = resolve_tracking_uri("", tmp_path_factory.mktemp("store"))
    _sweep(uri, "full", "dtd", "method", [(0, 0.75, 0.70), (1, 0.76, 0.72), (2, 0.74, 0.71), (3, 0.10, 0.10)],
           statuses={3: "FAILED"}, best=BEST)
    # seed 1 twice: the later run counts; one run still RUNNING
    _sweep(uri, "full", "dtd", "real-only", [(0, 0.73, 0.69), (1, 0.60, 0.60), (1, 0.74, 0.70), (2, 0.5, 0.5)],
           statuses={3: "RUNNING"}, best={"training.lr": 1e-5})
    _sweep(uri, "full", "dtd", "real-synthetic-ce", [(0, 0.7412, 0.70)])
    _sweep(uri, "embedded", "fashion-mnist", "method", [(0, 0.80, 0.78), (1, 0.82, 0.79)], best=BEST)
    empty = start_run(uri, "empty", "nothing")  # an experiment with no final runs
    end_run(uri, empty)
    return uri


@pytest.fixture(scope="module")
def written(store, tmp_path_factory):
    """The report of the whole store: {file name: text}, and what main printed."""
    out = tmp_path_factory.mktemp("results")
    assert run_main(report.main, ["--tracking-uri", store, "--out", str(out)]) == 0
    return {p.name: p.read_text() for p in out.iterdir()}


def _csv(text):
    return {row["baseline"]: row for row in csv.DictReader(text.splitlines())}


def test_files_written(written):
    assert sorted(written) == ["dtd.csv", "dtd.md", "fashion-mnist.csv", "fashion-mnist.md", "index.md"]


def test_dtd_csv_aggregates_seeds(written):
    rows = _csv(written["dtd.csv"])
    assert set(rows) == {"method", "real-only", "real-synthetic-ce"}
    method = rows["method"]
    assert (method["seeds"], method["seed_ids"]) == ("3", "0;1;2")  # the FAILED seed 3 does not count
    assert float(method["test_mean"]) == pytest.approx(75.0)
    assert float(method["test_std"]) == pytest.approx(1.0)  # sample std of 75, 76, 74
    assert [float(v) for v in method["test_per_seed"].split(";")] == pytest.approx([75.0, 76.0, 74.0])
    assert float(method["val_mean"]) == pytest.approx(71.0)
    assert (method["paper"], method["paper_row"], method["preset"]) == ("74.5", "Table 1: Paper, full", "full")
    real = rows["real-only"]
    assert [float(v) for v in real["test_per_seed"].split(";")] == pytest.approx([73.0, 74.0])  # the rerun counts
    assert float(real["test_std"]) == pytest.approx(0.7071, abs=1e-4)
    assert (real["paper"], real["paper_row"]) == ("73.9", "Table 1: Real-finetune")
    ce = rows["real-synthetic-ce"]
    assert (ce["seeds"], ce["test_std"], ce["paper"]) == ("1", "", "74.1")
    assert "Table 1: DataDream (per class)=73.1" in ce["paper_other"]


def test_dtd_markdown(written, store):
    text = written["dtd.md"]
    lines = text.splitlines()
    assert lines[0] == "# Results: dtd"
    assert lines[2] == f"Regenerate: `python -m fsynth.report --tracking-uri {store} --out " + \
        lines[2].split("--out ")[1]
    assert f"Tracking URI: `{store}` (experiment `fsynth`)" in text
    method = next(line for line in lines if line.startswith("| method"))
    assert "static ×2 · protoaug · 16 shots · sd 500/class" in method
    assert "lr=0.0001, wd=0.0005, λ1=0.1, λ2=1" in method and "mode=" not in method
    assert "| 3 | 75.00 ± 1.00 | 75.00 (seed 0), 76.00 (seed 1), 74.00 (seed 2) | 71.00 | 74.5 | +0.50 |" in method
    ce = next(line for line in lines if line.startswith("| real-synthetic-ce"))
    assert "| 74.12 ± – |" in ce and "Table 1: DataDream (per dataset); Table 1: DataDream (per class) = 73.1" in ce
    assert "99.00" not in text  # trial runs never count
    skipped = next(line for line in lines if line.startswith("Skipped"))
    assert "1 FAILED" in skipped and "1 RUNNING" in skipped and "1 superseded" in skipped


def test_dtd_ablation_table(written):
    text = written["dtd.md"]
    assert "## Loss ablation (Table 2 style): 16 shots, full variant" in text
    table = text.split("## Loss ablation")[1].splitlines()
    no_no = next(line for line in table if line.startswith("| no | no |"))
    assert "real-synthetic-ce" in no_no and "| 1 | 74.12 ± – | 74.1 |" in no_no
    assert "discrepancy-only (not run) | 0 | – | – |" in next(line for line in table if line.startswith("| yes | no |"))
    assert next(line for line in table if line.startswith("| yes | yes |")).endswith("| 3 | 75.00 ± 1.00 | 74.5 |")


def test_dataset_without_published_numbers(written):
    text = written["fashion-mnist.md"]
    method = next(line for line in text.splitlines() if line.startswith("| method"))
    assert "ddpm 64/class" in method
    assert "| 2 | 81.00 ± 1.41 |" in method and method.endswith("| – | – | – |")
    assert "Loss ablation" not in text  # one ablation baseline only
    assert "Skipped: none" in text
    row = _csv(written["fashion-mnist.csv"])["method"]
    assert (row["paper"], row["paper_row"]) == ("", "")


def test_index(written, store):
    index = written["index.md"]
    assert index.startswith("# fsynth results\n") and f"--tracking-uri {store}" in index
    assert "| dtd | 3 | 6 | 3 | [dtd.md](dtd.md), [dtd.csv](dtd.csv) |" in index
    assert "| fashion-mnist | 2 |" not in index and "| fashion-mnist | 1 | 2 | 0 |" in index


def test_dataset_filter_and_env_uri(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert run_main(report.main, ["--dataset", "fashion-mnist", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fashion-mnist.csv", "fashion-mnist.md", "index.md"]
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(tmp_path / n) for n in ("fashion-mnist.md", "fashion-mnist.csv", "index.md")]
    assert "--dataset fashion-mnist" in (tmp_path / "index.md").read_text()


@pytest.mark.parametrize(("args", "message"), [
    (["--experiment", "nope"], "experiment 'nope' does not exist in sqlite:"),
    (["--experiment", "empty"], "experiment 'empty' in sqlite:.* has no final runs; run python -m fsynth.tune"),
    (["--dataset", "eurosat"], "no final runs for eurosat .*datasets with runs: dtd, fashion-mnist"),
])
def test_errors_are_one_line(store, tmp_path, capsys, args, message):
    assert run_main(report.main, ["--tracking-uri", store, "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err)
    assert not (tmp_path / "out").exists()


def test_missing_store_is_not_created(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert run_main(report.main, ["--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "no MLflow store at" in err and "python -m fsynth.tune" in err and "--tracking-uri" in err
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_run_label():
    params = {"partition.mode": "single", "partition.cluster_multiple": "1.0", "loss.preset": "paper",
              "data.shots": "4", "generator.backend": "sd", "generator.images_per_class": "64"}
    assert report.run_label("method", params, {"partition.mode": "single", "training.lr": "2e-4"}) == \
        "method · 1 region · paper · 4 shots · sd 64/class · lr=0.0002"
    assert report.run_label("real-only", params, {}) == "real-only · 4 shots"


def test_without_the_paper_file(store, tmp_path, capsys, monkeypatch):
    import fsynth.paper

    monkeypatch.delenv(fsynth.paper.ENV_VAR, raising=False)
    monkeypatch.setattr(fsynth.paper, "DEFAULT_PATH", tmp_path / "absent.md")  # e.g. an installed package
    assert run_main(report.main, ["--tracking-uri", store, "--dataset", "dtd", "--out", str(tmp_path)]) == 0
    assert "warning: no published numbers" in capsys.readouterr().err
    assert {row["paper"] for row in _csv((tmp_path / "dtd.csv").read_text()).values()} == {""}
    monkeypatch.setenv(fsynth.paper.ENV_VAR, str(tmp_path / "typo.md"))  # asked for explicitly: an error
    assert run_main(report.main, ["--tracking-uri", store, "--out", str(tmp_path)]) == 2
    assert "typo.md does not exist" in capsys.readouterr().err
