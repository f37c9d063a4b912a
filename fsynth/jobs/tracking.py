"""MLflow tracking for sweeps, trials and single runs: explicit MlflowClient calls, never a process-global run."""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import re
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from fsynth.config import flatten_config
from fsynth.errors import ConfigError
from fsynth.secrets import redact

PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
CHECKPOINT_TAG = "last_checkpoint"
DB_NAME = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"  # beside the sqlite file: artifacts never land in the (changing) working directory
# MLflow's own limits (mlflow.utils.validation): a log_batch call holds at most 100 params or tags and 1000 metrics.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VALUE = 6000
PASS_THROUGH = ("http://", "https://", "databricks", "postgresql", "mysql", "mssql")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
REACHABLE_TIMEOUT_S = 10.0
# MLflow 3 accepts "/" in metric names (train/loss stays as is); anything outside [/\w.\- :] becomes "_".
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def _sqlite_uri(path: Path, query: str = "", create: bool = True) -> str:
    """`sqlite:////abs/path.db` for a database file, creating its folder (sqlite does not) when `create`."""
    path = path.expanduser().resolve()
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the MLflow store's folder {path.parent} ({exc.strerror}); pass "
                              "--tracking-uri / --out on a writable path") from None
    return f"sqlite:///{path.as_posix()}" + (f"?{query}" if query else "")


def _file_store_error(uri: str) -> ConfigError:
    """The one-line refusal of an MLflow file store."""
    return ConfigError(f"tracking.uri '{uri}' is an MLflow file store, which MLflow 3 refuses; leave tracking.uri "
                       f"empty (sqlite:///<tracking.storage>/{DB_NAME}), pass an absolute "
                       f"sqlite:////path/{DB_NAME}, or http://head:5000 on a cluster")


def resolve_tracking_uri(uri: str, storage: str | Path = "", create: bool = True) -> str:
    """The absolute tracking URI for tracking.uri: "" is sqlite:///<abs storage>/mlflow.db; file stores are refused.

    `create=False` (readers such as fsynth.report) leaves the file system as it is."""
    uri = str(uri).strip()
    if not uri:
        root = str(storage).strip()
        if "://" in root:
            raise ConfigError(f"tracking.storage '{root}' is remote, so there is no local {DB_NAME}; pass "
                              "--tracking-uri http://head:5000 (an MLflow server) or an absolute sqlite:////path URI")
        return _sqlite_uri(Path(root or "runs") / DB_NAME, create=create)
    if uri.startswith(PASS_THROUGH):
        return uri
    if uri.startswith("sqlite:"):
        rest, _, query = uri.removeprefix("sqlite:").partition("?")
        path = rest.removeprefix("///") if rest.startswith("///") else ""
        if path in ("", ":memory:"):
            raise ConfigError(f"tracking.uri '{uri}' is an in-memory database that no other process sees; "
                              f"pass a file, e.g. sqlite:////abs/path/{DB_NAME}")
        return _sqlite_uri(Path(path), query, create)
    if uri.startswith("file:"):
        raise _file_store_error(uri)
    if "://" in uri:
        raise ConfigError(f"tracking.uri '{uri}' has a scheme fsynth does not know; pass http(s)://host:port, "
                          f"databricks, or sqlite:////abs/path/{DB_NAME}")
    if Path(uri).suffix.lower() in SQLITE_SUFFIXES:
        return _sqlite_uri(Path(uri), create=create)
    raise _file_store_error(uri)  # a bare folder such as ./mlruns


def check_reachable(uri: str, timeout_s: float = REACHABLE_TIMEOUT_S) -> None:
    """Fail in one line within `timeout_s` when the MLflow server at an http(s) `uri` does not answer.

    Called before any compute: MLflow's own client retries for minutes before it gives up, and a sweep that
    trained for an hour without its tracking store would have nowhere to put its metrics. The probe is MLflow's
    /health endpoint: 200 is a server, 401/403 a server behind an auth wall (the client brings the credentials);
    anything else (no answer, or another service answering 404) is not a tracking server.
    """
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]  # urllib cannot send user:password@; the MLflow client sends them
    probe = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    fix = ("start it (e.g. mlflow server --host 127.0.0.1 --port 5000), fix --tracking-uri / $MLFLOW_TRACKING_URI, "
           "or leave both unset to track in sqlite under --out")
    try:
        with urllib.request.urlopen(probe, timeout=timeout_s):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return
        raise ConfigError(f"{redact(uri)} answered HTTP {exc.code} at /health, so it is not an MLflow tracking "
                          f"server; {fix}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"MLflow tracking server {redact(uri)} is unreachable ({reason}); {fix}") from None


# MLflow's and alembic's INFO lines about creating the sqlite schema would bury fsynth's own one-line messages.
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def client_for(uri: str) -> MlflowClient:
    """A client bound to `uri` (MLflow caches the store per URI, so this is cheap after the first call)."""
    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a sqlite file; a server's (or Databricks') own default."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///").partition("?")[0])
    return (db.parent / ARTIFACT_DIR).as_uri()


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if missing (a deleted one is restored); safe when processes race."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(str(client.tracking_uri)))
        except MlflowException:  # another process created it first (RESOURCE_ALREADY_EXISTS); anything else re-raises
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def start_run(uri: str, experiment: str, name: str, *, parent_run_id: str | None = None,
              tags: Mapping[str, Any] | None = None) -> str:
    """Create a RUNNING run named `name` in `experiment` (nested under `parent_run_id` if given); return its id."""
    client = client_for(uri)
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(ensure_experiment(client, experiment), tags=all_tags, run_name=name)
    return run.info.run_id


def tag_filter(tags: Mapping[str, str], running_only: bool = False) -> str:
    """An MLflow search filter matching every tag in `tags` (names may hold dots: they are back-quoted)."""
    terms = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    return " and ".join(terms + (["attributes.status = 'RUNNING'"] if running_only else []))


def reopen_or_start_run(uri: str, experiment: str, name: str, *, match: Mapping[str, str],
                        parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None) -> tuple[str, bool]:
    """(run id, created): the run whose tags equal `match` (an interrupted attempt of the same work), marked
    RUNNING again, else a new run with `tags` and `match` as tags. Resuming work never duplicates its run."""
    client = client_for(uri)
    experiment_id = ensure_experiment(client, experiment)
    query = tag_filter({**match, **({PARENT_TAG: parent_run_id} if parent_run_id else {})})
    found = client.search_runs([experiment_id], filter_string=query, max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, False
    return start_run(uri, experiment, name, parent_run_id=parent_run_id, tags={**(tags or {}), **match}), True


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Terminate a run with `status` (FINISHED, FAILED or KILLED)."""
    client_for(uri).set_terminated(run_id, status=status)


@contextmanager
def tracked_run(uri: str, experiment: str, name: str, *, parent_run_id: str | None = None,
                tags: Mapping[str, Any] | None = None) -> Iterator[str]:
    """Yield a new run's id; end it FAILED on an exception, KILLED on KeyboardInterrupt/SystemExit, else FINISHED."""
    run_id = start_run(uri, experiment, name, parent_run_id=parent_run_id, tags=tags)
    status = "FINISHED"
    try:
        yield run_id
    except Exception:
        status = "FAILED"
        raise
    except BaseException:
        status = "KILLED"
        raise
    finally:
        end_run(uri, run_id, status)


def end_open_children(uri: str, parent_run_id: str, status: str = "KILLED",
                      tags: Mapping[str, str] | None = None) -> list[str]:
    """End the parent's child runs still RUNNING (e.g. trials whose worker was killed), only those carrying
    `tags` when given; return their ids."""
    client = client_for(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = tag_filter({PARENT_TAG: parent_run_id, **(tags or {})}, running_only=True)
    ended, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=1000, page_token=token)
        for run in page:
            client.set_terminated(run.info.run_id, status=status)
            ended.append(run.info.run_id)
        token = page.token
        if not token:
            return ended


def _param_value(value: Any) -> str:
    """A param's string: lists and mappings as JSON, everything else str(); cut to MLflow's 6000 characters."""
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return redact(text)[:MAX_PARAM_VALUE]


def _flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys to leaf values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        flat.update(_flatten(value, dotted + ".") if isinstance(value, Mapping) else {dotted: value})
    return flat


def flat_params(cfg_or_dict: Any) -> dict[str, str]:
    """Dotted keys to param strings, from a config dataclass (via flatten_config) or a nested mapping."""
    if dataclasses.is_dataclass(cfg_or_dict) and not isinstance(cfg_or_dict, type):
        flat = flatten_config(cfg_or_dict)
    else:
        flat = _flatten(cfg_or_dict)
    return {k: _param_value(v) for k, v in flat.items()}


def log_params(uri: str, run_id: str, cfg_or_dict: Any) -> None:
    """Log a config (or nested mapping) as dotted-key params, in batches of MLflow's 100 params."""
    params = [Param(k, v) for k, v in sorted(flat_params(cfg_or_dict).items())]
    client = client_for(uri)
    for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])


def metric_key(name: str) -> str:
    """An MLflow-valid metric name: 'train/loss' stays; other characters become '_', empty or dot parts drop."""
    key = _BAD_KEY_CHARS.sub("_", str(name))
    return "/".join(p for p in key.split("/") if p not in ("", ".", "..")) or "_"


def _number(value: Any) -> float | None:
    """`value` as a float if it is a real number (0-d tensors and arrays included, bools not), else None."""
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


@dataclass(frozen=True)
class MlflowReporter:
    """fit's `report(metrics, checkpoint)` logging to one run; holds only strings, so it pickles to Ray workers."""

    uri: str
    run_id: str

    def __call__(self, metrics: dict, checkpoint: str | None = None) -> None:
        """Log the numeric metrics at step metrics['epoch'] (0 without one); tag the checkpoint dir if given."""
        step = _number(metrics.get("epoch"))
        step = int(step) if step is not None else 0
        now = int(time.time() * 1000)
        values = ((metric_key(k), _number(v)) for k, v in metrics.items())
        batch = [Metric(k, v, now, step) for k, v in values if v is not None]
        tags = [RunTag(CHECKPOINT_TAG, str(checkpoint))] if checkpoint else []
        if not batch and not tags:
            return
        client = client_for(self.uri)
        for i in range(0, max(len(batch), 1), MAX_METRICS_PER_BATCH):
            client.log_batch(self.run_id, metrics=batch[i:i + MAX_METRICS_PER_BATCH], tags=tags if i == 0 else [])


def log_artifacts(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file or a directory's contents to the run's artifacts (under `artifact_path` if given)."""
    path = Path(path).resolve()
    client = client_for(uri)
    if path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    elif path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        raise FileNotFoundError(f"artifact {path} does not exist; pass an existing file or directory")


def ui_command(uri: str) -> str:
    """What to print at the end of a sweep: the `mlflow ui` command for a database, or where to open a server."""
    uri = redact(uri)
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    if uri.startswith("databricks"):
        return f"open the Experiments page of your Databricks workspace ({uri})"
    # mlflow ui binds to 127.0.0.1 unless given --host: the UI stays on this machine (ssh -L to reach it).
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
