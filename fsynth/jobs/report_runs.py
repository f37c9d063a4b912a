"""fsynth.report's MLflow side: read the tune job's final and sweep runs, download artifacts, log figures back."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fsynth import tags
from fsynth.config import config_from_params
from fsynth.errors import ConfigError
from fsynth.jobs.tracking import PARENT_TAG, check_reachable, client_for, log_artifacts
from fsynth.plots import plot_side_by_side
from fsynth.results.ablations import Ablations, ablations
from fsynth.results.figures import draw_figures, figure2_runs, seed_mean_history
from fsynth.results.rows import MEASURED, MIXING, DatasetReport, FinalRun, SweepInfo, SweepRow

RECOGNISED_KEY = "synthetic/starting_model_accuracy"  # logged on the sweep run by fsynth.jobs.experiment


# ------------------------------------------------------------------------------------------------ reading runs


def open_experiment(uri: str, name: str) -> tuple[MlflowClient, str]:
    """A client and the id of experiment `name`; a missing store or experiment is a one-line ConfigError."""
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


def _search(client: MlflowClient, experiment_id: str, kind: str) -> list:
    """Every run of `experiment_id` with tag fsynth.kind = `kind`, any status, all pages."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`{tags.KIND}` = '{kind}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _fraction(metrics: Mapping[str, float], *keys: str) -> float | None:
    """The first of `keys` the run logged, as a float; None when it logged none."""
    return next((float(metrics[k]) for k in keys if k in metrics), None)


def final_run(run: Any) -> FinalRun:
    """A final run of MLflow's (`run.info`, `run.data`), its config read back from its params."""
    run_tags, info, metrics = run.data.tags, run.info, run.data.metrics
    try:
        cfg = config_from_params(run.data.params)
    except ConfigError as exc:
        raise ConfigError(f"final run {info.run_id} has a param this fsynth cannot read: {exc}") from None
    return FinalRun(
        run_id=info.run_id,
        dataset=run_tags.get(tags.DATASET) or cfg.data.dataset,
        sweep=run_tags.get(tags.SWEEP) or run_tags.get(PARENT_TAG) or info.run_id,
        baseline=run_tags.get(tags.BASELINE) or cfg.name,
        space=run_tags.get(tags.SPACE, ""),
        seed=run_tags.get(tags.SEED) or str(cfg.training.seed),
        status=info.status,
        end_time=info.end_time or info.start_time or 0,
        config=cfg,
        test=_fraction(metrics, "test/accuracy"),
        val=_fraction(metrics, "best/val_accuracy", "val/accuracy"),
        parent=run_tags.get(PARENT_TAG, ""),
        # MLflow's latest value of a metric is the one at the highest step: the final epoch's.
        measured={k: float(metrics[k]) for k in MEASURED + MIXING if k in metrics},
    )


def _json_dict(text: str) -> dict | None:
    """The JSON object in a tag, None when the tag is empty or not a JSON object."""
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
        key = run.data.tags.get(tags.SWEEP) or run.info.run_id
        held = infos.get(key, SweepInfo("", {}, ""))
        best = _json_dict(run.data.tags.get(tags.BEST_VALUES, ""))
        recognised = run.data.metrics.get(RECOGNISED_KEY, held.recognised)
        infos[key] = SweepInfo(run.info.run_id, held.best if best is None else best,
                               run.data.tags.get(tags.COMMAND) or held.command, recognised)
    return infos


def collect(uri: str, experiment: str, datasets: Sequence[str] = ()) -> tuple[list[FinalRun], dict[str, SweepInfo]]:
    """The experiment's final runs (only those of `datasets` if given) and its sweeps (see `sweep_infos`)."""
    client, experiment_id = open_experiment(uri, experiment)
    try:
        finals = [final_run(r) for r in _search(client, experiment_id, "final")]
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
    return finals, sweeps


# ----------------------------------------------------------------------------------------------------- figures


def _history_points(client: MlflowClient, run_ids: Sequence[str]) -> list[tuple[str, int, float]]:
    """Every logged (MEASURED key, step, value) of the runs, run by run."""
    return [(key, metric.step, metric.value) for run_id in run_ids for key in MEASURED
            for metric in client.get_metric_history(run_id, key)]


def _download(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path | None:
    """An artifact of the run, downloaded under `dst`; None when the run has no such artifact."""
    folder, _, name = path.rpartition("/")
    try:
        if name not in {Path(a.path).name for a in client.list_artifacts(run_id, folder or None)}:
            return None
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except (MlflowException, OSError):  # an unreachable artifact store: the report goes on without this figure
        return None


def _sample_grids(client: MlflowClient, method: SweepRow, path: Path, title: str) -> Path | None:
    """The method row's real-shot and synthetic grids side by side, when its sweep run logged either."""
    with tempfile.TemporaryDirectory(prefix="fsynth-report-") as tmp:
        real, synthetic = (_download(client, method.parent_run_id, f"synthetic/{name}", Path(tmp))
                           for name in ("real_shots.png", "samples.png"))
        if real is None and synthetic is None:
            return None
        return plot_side_by_side(real, synthetic, path, title=title)


def make_figures(client: MlflowClient, dataset: str, ab: Ablations, img_dir: Path) -> dict[str, Path]:
    """The dataset's figures under `img_dir` (<dataset>-regions|figure2|samples.png), each only where its rows or
    artifacts exist: accuracy vs regions, Figure 2 (method vs CE only, seed means), the sample grids."""
    histories = {label: seed_mean_history(_history_points(client, run_ids))
                 for label, run_ids in figure2_runs(ab).items()}
    figures = draw_figures(dataset, ab, histories, img_dir)
    if ab.method is not None and ab.method.parent_run_id:
        grids = _sample_grids(client, ab.method, img_dir / f"{dataset}-samples.png", title=dataset)
        if grids is not None:
            figures["samples"] = grids
    return figures


def log_figures(uri: str, method: SweepRow | None, figures: Mapping[str, Path]) -> None:
    """Log the figures under `report/` on the method row's sweep run (none without a method row)."""
    if method is None or not method.parent_run_id:
        return
    for path in figures.values():
        log_artifacts(uri, method.parent_run_id, path, "report")


def publish_figures(uri: str, reports: Mapping[str, DatasetReport], img_dir: Path) -> dict[str, dict[str, Path]]:
    """Each dataset's figures (see `make_figures`), made under `img_dir` and logged to its method row's sweep run:
    dataset -> kind ("regions", "figure2", "samples") -> file."""
    client, made = client_for(uri), {}
    for name, report in reports.items():
        ab = ablations(report.rows)
        made[name] = make_figures(client, name, ab, img_dir)
        log_figures(uri, ab.method, made[name])
    return made
