"""`python -m fsynth.tune`: bad input before Ray starts, and the whole smoke sweep end to end
(interrupted by killing its driver, then continued by the same command) checked in the MLflow store."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsynth import tune
from tests.data.fake_roots import make_root

REPO = Path(__file__).resolve().parents[1]


def test_missing_dataset_says_how_to_get_it(tmp_path, capsys):
    code = tune_main(["--dataset", "dtd", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "does not exist" in err and "--download" in err and "--root" in err


def test_an_unreachable_tracking_server_fails_before_any_compute(tmp_path, capsys):
    from tests.jobs.test_tracking import free_port

    root = make_root("folder", tmp_path / "data", per_class=4)
    start = time.monotonic()
    code = tune_main(["--dataset", "folder", "--root", str(root), "--out", str(tmp_path / "runs"), "--space", "smoke",
                      "--tracking-uri", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "is unreachable" in err and "--tracking-uri" in err
    assert time.monotonic() - start < 30 and not (tmp_path / "runs").exists()  # nothing sampled, Ray not started


def tune_main(argv):
    from fsynth.cli import run_main

    return run_main(tune.main, argv)


# ----------------------------------------------------------------------------------------------- end to end


def _command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fsynth.tune", "--dataset", "folder", "--root", str(data), "--space", "smoke",
            "--out", str(out), *extra]


def _trial_states(tune_dir: Path) -> dict[str, str]:
    """Tune's saved view of the sweep: trial id -> status."""
    states = {}
    for path in sorted(glob.glob(str(tune_dir / "experiment_state-*.json"))):
        try:
            for row in json.loads(Path(path).read_text())["trial_data"]:
                trial = json.loads(row[0])
                states[trial["trial_id"]] = trial["status"]
        except (ValueError, KeyError):  # being rewritten right now
            continue
    return states


def _kill_when_a_trial_finishes(proc: subprocess.Popen, out: Path, timeout: float = 900) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        dirs = [d for d in (out / "tune").glob("*") if "-final" not in d.name] if (out / "tune").is_dir() else []
        states = _trial_states(dirs[0]) if dirs else {}
        finished = list(states.values()).count("TERMINATED")
        if finished and (len(states) < 4 or finished < len(states)):  # mid-sweep: some done, some not
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started die at once
            proc.wait()
            return states
        time.sleep(1)
    proc.kill()
    pytest.fail(f"no trial finished before the sweep ended or timed out (exit {proc.poll()})")


@pytest.mark.slow
def test_smoke_sweep_killed_then_continued_is_tracked_in_mlflow(tmp_path):
    from mlflow import MlflowClient

    data, out = make_root("folder", tmp_path / "data", per_class=8), tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    first = subprocess.Popen(_command(data, out, "--seeds", "2"), cwd=tmp_path, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    states = _kill_when_a_trial_finishes(first, out)
    done = sorted(t for t, s in states.items() if s == "TERMINATED")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    history_before = _trial_histories(client)
    cache_before = _cached(out / "cache")
    manifest = next((out / "synthetic").glob("folder-ddpm-*/manifest.parquet"))
    manifest_mtime = manifest.stat().st_mtime_ns

    # The very same command continues it (--resume would only add a check that there is something to continue).
    again = subprocess.run(_command(data, out, "--seeds", "2"), cwd=tmp_path, env=env, timeout=900,
                           capture_output=True, text=True)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert "resuming" in log and "reusing the trained DDPM" in log and "0 groups to make" in log
    assert manifest.stat().st_mtime_ns == manifest_mtime  # no cached stage was rebuilt
    assert _cached(out / "cache") == cache_before
    assert "test accuracy:" in log and "mlflow ui --backend-store-uri" in log
    # the summary names the best configuration's regions and what the regularisers saw
    assert re.search(r"regions: (static regions, outputs features, K = 1 x classes|1 region); mixing: \d+ %", log)

    runs = client.search_runs([client.get_experiment_by_name("fsynth").experiment_id], max_results=100)
    by_kind = {k: [r for r in runs if r.data.tags.get("fsynth.kind") == k] for k in ("sweep", "trial", "final")}
    (parent,) = by_kind["sweep"]
    assert parent.info.status == "FINISHED" and len(by_kind["trial"]) == 4 and len(by_kind["final"]) == 2
    for run in by_kind["trial"] + by_kind["final"]:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status in ("FINISHED", "KILLED")  # KILLED = stopped early by ASHA
        assert "training.lr" in run.data.params and "val/accuracy" in run.data.metrics
    for index in (int(t.rsplit("_", 1)[1]) for t in done):  # finished before the kill: never run again
        name = next(n for n in history_before if n.endswith(f"trial{index:03d}"))
        assert _trial_histories(client)[name] == history_before[name]
    finals = sorted(by_kind["final"], key=lambda r: int(r.data.tags["fsynth.seed"]))
    assert [r.data.tags["fsynth.seed"] for r in finals] == ["0", "1"]
    for run in finals:
        assert run.info.status == "FINISHED" and 0.0 <= run.data.metrics["test/accuracy"] <= 1.0
        mixing = client.get_metric_history(run.info.run_id, "mixing/batch_synthetic_in_t")
        # every epoch; the final report repeats the last epoch's value at its step (fsynth.tune's summary reads it)
        assert {m.step for m in mixing} == {0, 1} and all(0 <= m.value <= 1 for m in mixing)
        assert len({m.value for m in mixing if m.step == 1}) == 1
        assert "mixing/synthetic_in_mixed" in run.data.metrics and "mixing/regions_mixed" in run.data.metrics
        artifacts = _artifacts(client, run.info.run_id)
        assert {"config.yaml", "curves.png", "confusion_test.png", "confusion_test.csv",
                "model/adapters.safetensors"} <= artifacts
    assert not any("test/accuracy" in r.data.metrics for r in by_kind["trial"])  # trials never see test
    assert {"summary.md", "base_config.yaml", "space/smoke.yaml", "synthetic/samples.png",
            "synthetic/real_shots.png"} <= _artifacts(
        client, parent.info.run_id)
    assert parent.data.metrics["final/seeds"] == 2 and "fsynth.best_values" in parent.data.tags
    assert 0 <= parent.data.metrics["synthetic/starting_model_accuracy"] <= 1  # the report's recognisability
    assert parent.data.tags["fsynth.command"].endswith("--space smoke --out " + str(out) + " --seeds 2")
    _fixed_space_runs_only_final_seeds(data, out, tmp_path, env, client)


def _fixed_space_runs_only_final_seeds(data: Path, out: Path, tmp_path: Path, env: dict, client) -> None:
    """A space that samples nothing (like ablation.yaml) skips the sweep: one final run per seed, cached stages."""
    space = tmp_path / "fixed.yaml"
    space.write_text(f"extends: {REPO / 'tune_spaces' / 'smoke.yaml'}\nsample: null\n")
    argv = [*_command(data, out, "--seeds", "1", "--baseline", "real-synthetic-ce"), "--space", str(space)]
    run = subprocess.run(argv, cwd=tmp_path, env=env, timeout=600, capture_output=True, text=True)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "samples nothing; running the final seeds only" in log and "0 groups to make" in log
    exp = client.get_experiment_by_name("fsynth").experiment_id
    (parent,) = client.search_runs(
        [exp], "tags.`fsynth.baseline` = 'real-synthetic-ce' and tags.`fsynth.kind` = 'sweep'")
    nested = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert [r.data.tags["fsynth.kind"] for r in nested] == ["final"] and parent.info.status == "FINISHED"
    assert "test/accuracy" in nested[0].data.metrics and parent.data.tags["fsynth.best_values"] == "{}"


def _cached(folder: Path) -> list[tuple[str, int]]:
    """(name, mtime) of every cached artefact in `folder` (not the hidden `.locks/`, whose files lock, not hold).

    Prediction-space regions are fitted inside the training loop, so a sweep over them may cache nothing here:
    a missing folder is an empty cache, and the continued run must not have created one either.
    """
    if not folder.exists():
        return []
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir() if not p.name.startswith("."))


def _trial_histories(client) -> dict[str, int]:
    """Trial run name -> number of val/accuracy points logged (a rerun of a finished trial would add some)."""
    exp = client.get_experiment_by_name("fsynth").experiment_id
    runs = client.search_runs([exp], filter_string="tags.`fsynth.kind` = 'trial'")
    return {r.data.tags["fsynth.train_name"]: len(client.get_metric_history(r.info.run_id, "val/accuracy"))
            for r in runs}


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def test_help_and_a_bad_flag_answer_before_ray_torch_or_the_models_load():
    """The plan is resolved before the job stack is imported: --help, a bad flag and a bad --set answer in seconds."""
    script = ("import sys\nfrom fsynth import tune\nfrom fsynth.cli import run_main\n"
              "code = run_main(tune.main, ['--dataset', 'fashion-mnist', '--seeds', '0', '--out', sys.argv[1]])\n"
              "heavy = ('ray', 'torch', 'open_clip', 'fsynth.models', 'fsynth.jobs.experiment')\n"
              "print(code, sorted(m for m in heavy if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script, "/tmp/fsynth-test-out"], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "2 []", result.stdout + result.stderr[-2000:]
    assert "--seeds must be at least 1" in result.stderr
