"""fsynth.jobs.tracking against a real MLflow 3 sqlite store (one store per module: its tables take seconds)."""

import json
import threading
from pathlib import Path

import pytest

from fsynth.config import build_config
from fsynth.errors import ConfigError
from fsynth.jobs.tracking import (
    CHECKPOINT_TAG,
    PARENT_TAG,
    MlflowReporter,
    client_for,
    end_open_children,
    ensure_experiment,
    log_artifacts,
    log_params,
    metric_key,
    resolve_tracking_uri,
    start_run,
    tracked_run,
    ui_command,
)

# MLflow's own SQLAlchemy models trigger this; nothing fsynth can change.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return resolve_tracking_uri("", tmp_path_factory.mktemp("tracking"))


# ------------------------------------------------------------------------------------------------ URI resolution


def test_empty_uri_is_absolute_sqlite_in_storage(tmp_path):
    uri = resolve_tracking_uri("", tmp_path / "store")
    assert uri == f"sqlite:///{(tmp_path / 'store' / 'mlflow.db').as_posix()}"
    assert uri.startswith("sqlite:////") and (tmp_path / "store").is_dir()


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///sub/m.db", "") == f"sqlite:///{tmp_path}/sub/m.db"
    assert resolve_tracking_uri("sqlite:///m.db?timeout=30", "") == f"sqlite:///{tmp_path}/m.db?timeout=30"
    assert resolve_tracking_uri("other/x.db", "") == f"sqlite:///{tmp_path}/other/x.db"
    assert resolve_tracking_uri("", "") == f"sqlite:///{tmp_path}/runs/mlflow.db"


def test_absolute_and_remote_uris_pass_through(tmp_path):
    for uri in ("http://head:5000", "https://mlflow.example.org", "databricks", f"sqlite:///{tmp_path}/a.db"):
        assert resolve_tracking_uri(uri, tmp_path) == uri


@pytest.mark.parametrize("uri", ["./mlruns", "mlruns", "file:///tmp/mlruns", "/abs/mlruns"])
def test_file_store_is_refused_in_one_line(uri, tmp_path):
    with pytest.raises(ConfigError, match="MLflow 3 refuses") as info:
        resolve_tracking_uri(uri, tmp_path)
    assert "\n" not in str(info.value) and "sqlite:///" in str(info.value)


def test_memory_sqlite_and_remote_storage_without_uri_are_refused():
    with pytest.raises(ConfigError, match="in-memory"):
        resolve_tracking_uri("sqlite://", "")
    with pytest.raises(ConfigError, match="http://head:5000"):
        resolve_tracking_uri("", "s3://bucket/runs")


def test_a_store_on_an_unwritable_path_is_one_line_and_readers_create_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot create the MLflow store's folder .*a-file/runs") as info:
        resolve_tracking_uri(f"sqlite:///{blocker}/runs/mlflow.db")
    assert "\n" not in str(info.value)
    uri = resolve_tracking_uri("", tmp_path / "not-yet", create=False)
    assert uri == f"sqlite:///{tmp_path / 'not-yet' / 'mlflow.db'}" and not (tmp_path / "not-yet").exists()


def test_ui_command(uri):
    assert ui_command(uri) == f"mlflow ui --backend-store-uri {uri}"
    assert ui_command("sqlite:////a b/mlflow.db") == "mlflow ui --backend-store-uri 'sqlite:////a b/mlflow.db'"
    assert ui_command("http://head:5000") == "open http://head:5000"


def test_metric_key_keeps_slashes_and_maps_the_rest():
    assert metric_key("train/loss") == "train/loss"
    assert metric_key("val/top-1 acc:x") == "val/top-1 acc:x"
    assert metric_key("/a//b@c/") == "a/b_c"


# ------------------------------------------------------------------------------------------------------ runs


def test_ensure_experiment_is_idempotent(uri):
    client = client_for(uri)
    first = ensure_experiment(client, "idem")
    assert ensure_experiment(client, "idem") == first
    client.delete_experiment(first)
    assert ensure_experiment(client, "idem") == first
    experiment = client.get_experiment(first)
    assert experiment.lifecycle_stage == "active"
    assert experiment.artifact_location.endswith("/mlartifacts")  # beside mlflow.db, not in the working directory


def test_ensure_experiment_survives_a_race(uri):
    client, barrier, ids = client_for(uri), threading.Barrier(4), []

    def create():
        barrier.wait()
        ids.append(ensure_experiment(client, "race"))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 4 and len(set(ids)) == 1


def test_parent_with_nested_runs(uri):
    client = client_for(uri)
    with tracked_run(uri, "sweep", "sweep-1", tags={"kind": "sweep"}) as parent:
        children = [start_run(uri, "sweep", f"trial-{i}", parent_run_id=parent) for i in range(2)]
        experiment_id = client.get_run(parent).info.experiment_id
        found = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
        assert sorted(r.info.run_id for r in found) == sorted(children)
        assert all(r.data.tags[PARENT_TAG] == parent for r in found)
        assert {r.info.run_name for r in found} == {"trial-0", "trial-1"}
        assert sorted(end_open_children(uri, parent)) == sorted(children)
        assert end_open_children(uri, parent) == []
    assert {client.get_run(c).info.status for c in children} == {"KILLED"}
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.tags["kind"] == "sweep"


def test_tracked_run_marks_failed_on_exception(uri):
    client = client_for(uri)
    with pytest.raises(RuntimeError):
        with tracked_run(uri, "status", "boom") as run_id:
            raise RuntimeError("boom")
    assert client.get_run(run_id).info.status == "FAILED"
    with pytest.raises(KeyboardInterrupt):
        with tracked_run(uri, "status", "ctrl-c") as run_id:
            raise KeyboardInterrupt
    assert client.get_run(run_id).info.status == "KILLED"
    with tracked_run(uri, "status", "fine") as run_id:
        assert client.get_run(run_id).info.status == "RUNNING"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_params_from_a_real_config(uri):
    cfg = build_config("embedded")
    with tracked_run(uri, "params", "cfg") as run_id:
        log_params(uri, run_id, cfg)
        log_params(uri, run_id, {"extra": {"long": "x" * 7000, "n": 3, "many": {str(i): i for i in range(150)}}})
    params = client_for(uri).get_run(run_id).data.params
    assert len(params) > 150  # two calls of more than one batch each
    assert params["extra.many.149"] == "149"
    assert params["training.lr"] == str(cfg.training.lr)
    assert params["data.dataset"] == cfg.data.dataset
    assert json.loads(params["model.lora.targets"]) == list(cfg.model.lora.targets)
    assert params["extra.n"] == "3" and len(params["extra.long"]) == 6000


def test_reporter_logs_history_and_checkpoint(uri, tmp_path):
    report = MlflowReporter(uri, start_run(uri, "report", "fit"))
    for epoch in range(3):
        report({"epoch": epoch, "train/loss": 1.0 / (epoch + 1), "val/accuracy": 0.5 + epoch / 10,
                "note": "text", "flag": True, "missing": None}, str(tmp_path / f"epoch_{epoch:04d}"))
    report({"epoch": 2, "test/accuracy": 0.9, "best/epoch": 1}, None)
    client = client_for(uri)
    run = client.get_run(report.run_id)
    history = client.get_metric_history(report.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == pytest.approx([1.0, 0.5, 1 / 3])
    assert run.data.metrics["test/accuracy"] == 0.9
    assert not {"note", "flag", "missing"} & set(run.data.metrics)
    assert run.data.tags[CHECKPOINT_TAG] == str(tmp_path / "epoch_0002")
    client.set_terminated(report.run_id)


def test_artifacts_land(uri, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "adapters.safetensors").write_bytes(b"\0" * 8)
    (tmp_path / "config.yaml").write_text("name: x\n")
    with tracked_run(uri, "artifacts", "files") as run_id:
        log_artifacts(uri, run_id, tmp_path / "config.yaml")
        log_artifacts(uri, run_id, tmp_path / "ckpt", artifact_path="final")
        with pytest.raises(FileNotFoundError):
            log_artifacts(uri, run_id, tmp_path / "nothing")
    client = client_for(uri)
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "final"}
    assert [a.path for a in client.list_artifacts(run_id, "final")] == ["final/adapters.safetensors"]
    artifact_dir = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    assert (artifact_dir / "final" / "adapters.safetensors").is_file()


# ------------------------------------------------------------------------------- a real server, and losing it


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(folder: Path, port: int):
    """`mlflow server` on 127.0.0.1:port with a sqlite store in `folder`; returns the process once /health is OK."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    pytest.fail("mlflow server did not start in 120 s")


def stop_server(proc) -> None:
    """Kill the server with its worker processes (its own session's process group)."""
    import os
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_unreachable_or_wrong_server_fails_fast_in_one_line(tmp_path):
    import http.server
    import time

    from fsynth.jobs.tracking import check_reachable

    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"unreachable \(.*refused.*\); start it") as err:
        check_reachable(f"http://bob:hunter2@127.0.0.1:{free_port()}")  # nothing listens there
    assert time.monotonic() - start < 5 and "\n" not in str(err.value)
    assert "hunter2" not in str(err.value) and "bob:***@" in str(err.value)

    other = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)  # answers 404
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConfigError, match="answered HTTP 404 at /health, so it is not an MLflow tracking server"):
            check_reachable(f"http://127.0.0.1:{other.server_port}/nothing-here")
    finally:
        other.shutdown()
    check_reachable("sqlite:////no/such/folder/mlflow.db")  # not a server: nothing to probe


def test_a_server_that_goes_away_mid_run_fails_the_report_loudly(tmp_path, monkeypatch):
    """Metrics are never dropped in silence: once the server is gone, the next report raises."""
    from mlflow.exceptions import MlflowException

    from fsynth.jobs.tracking import check_reachable

    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        check_reachable(uri)
        report = MlflowReporter(uri, start_run(uri, "served", "fit"))
        report({"epoch": 0, "train/loss": 1.0})
        assert [m.value for m in client_for(uri).get_metric_history(report.run_id, "train/loss")] == [1.0]
    finally:
        stop_server(server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default retries for minutes
    with pytest.raises(MlflowException):
        report({"epoch": 1, "train/loss": 0.5})
    with pytest.raises(ConfigError, match="unreachable"):
        check_reachable(uri)
