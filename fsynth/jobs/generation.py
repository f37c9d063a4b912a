"""The generation job on Ray Data: generator artefact as a Ray task, then prompt-table groups through an actor pool.

Pipeline: the prompt table (written first by `prepare_synthetic_set`) -> one Ray Data row per group still to
make -> `map_batches(GroupGenerator, compute=ActorPoolStrategy(size=n))`, each actor holding one loaded backend
and writing PNGs itself -> the driver streams per-image results for progress -> manifest, sample grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import ray
import ray.data
import ray.exceptions
import torch

from fsynth.cache import artefact_lock
from fsynth.config import ExperimentConfig
from fsynth.errors import ConfigError, FsynthError
from fsynth.generation import (
    build_generator,
    check_init,
    ensure_generator_artefact,
    lora_arguments,
    plan_synthetic_set,
)
from fsynth.synthetic import (
    finish_synthetic_set,
    generate_group,
    missing_groups,
    prepare_synthetic_set,
    read_prompt_table,
)

Log = Callable[[str], None]


def _device(gpus: float) -> str:
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


class GroupGenerator:
    """A Ray Data actor: loads the backend once, then makes whole groups of the prompt table.

    Input batch: a DataFrame with column `group` [B]; output: one row per image of those groups
    (sample_id, written). `fewshot_dir`: where image-to-image rows find their source shots.
    """

    def __init__(self, cfg: ExperimentConfig, artefact: str | None, out_dir: str, cpus: float, gpus: float,
                 fewshot_dir: str | None = None):
        torch.set_num_threads(max(1, int(cpus)))  # one actor = its CPU share; more threads only contend
        self.out_dir = out_dir
        self.table = read_prompt_table(out_dir)
        self.generator = build_generator(cfg.generator, artefact, _device(gpus), fewshot_dir)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        done = [generate_group(self.generator, self.table[self.table["group"] == g], self.out_dir)
                for g in batch["group"]]
        return pd.concat(done)[["sample_id", "written"]].reset_index(drop=True)


def ensure_artefact_on_cluster(cfg: ExperimentConfig, fewshot_dir: Path, root: Path) -> tuple[Path | None, str]:
    """(generator artefact, backend fingerprint), made in one Ray task with a generator actor's resources.

    The backend is built there rather than here: the driver may be a small head node that should not load a
    Stable Diffusion pipeline just to learn its fingerprint.
    """
    with one_line_task_errors():
        return _artefact_on_cluster(cfg, fewshot_dir, root)


@contextmanager
def one_line_task_errors():
    """A Ray task's own FsynthError reaches the caller as itself (one line for the CLI), not Ray's traceback."""
    try:
        yield
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, FsynthError):
            raise exc.cause from None
        raise


def _artefact_on_cluster(cfg: ExperimentConfig, fewshot_dir: Path, root: Path) -> tuple[Path | None, str]:
    r = cfg.resources
    on_worker = ray.remote(num_cpus=r.cpus_per_generator_actor, num_gpus=r.gpus_per_generator_actor)
    f = cfg.generator.finetune
    if cfg.generator.backend == "sd" and f.enabled and f.scope == "per_class":
        # One task per class at once; the artefact task below then finds them done and only assembles them.
        plan = ray.get(on_worker(_lora_plan_task).remote(cfg, str(fewshot_dir), str(root)))
        ray.get([on_worker(_lora_class_task).remote(plan, unit) for unit in plan.units()])
    return ray.get(on_worker(_artefact_task).remote(cfg, str(fewshot_dir), str(root)))


def _lora_plan_task(cfg: ExperimentConfig, fewshot_dir: str, root: str):
    from fsynth.generators.sd_finetune import plan_sd_lora

    device = _device(cfg.resources.gpus_per_generator_actor)
    return plan_sd_lora(**lora_arguments(cfg, fewshot_dir, root), device=device)


def _lora_class_task(plan, unit: str) -> str:
    from fsynth.generators.sd_finetune import finetune_one_class

    return str(finetune_one_class(plan, unit, log=lambda line: print(line, flush=True)))


def _artefact_task(cfg: ExperimentConfig, fewshot_dir: str, root: str) -> tuple[Path | None, str]:
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_generator_actor)))
    device = _device(cfg.resources.gpus_per_generator_actor)
    artefact = ensure_generator_artefact(cfg, fewshot_dir, root, device, log=lambda line: print(line, flush=True))
    return artefact, build_generator(cfg.generator, artefact, device, fewshot_dir).fingerprint


def run_groups_on_ray(cfg: ExperimentConfig, artefact: Path | None, out: Path, groups: list[int], expected: int,
                      actors: int, log: Log, fewshot_dir: Path | None = None) -> int:
    """Make `groups` (`expected` images) on a pool of `actors`; return the images written, logging progress."""
    r = cfg.resources
    ds = ray.data.from_items([{"group": g} for g in groups], override_num_blocks=max(1, len(groups)))
    ds = ds.map_batches(
        GroupGenerator, batch_size=1, batch_format="pandas",
        fn_constructor_kwargs={"cfg": cfg, "artefact": str(artefact) if artefact else None, "out_dir": str(out),
                               "cpus": r.cpus_per_generator_actor, "gpus": r.gpus_per_generator_actor,
                               "fewshot_dir": str(fewshot_dir) if fewshot_dir else None},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=r.cpus_per_generator_actor, num_gpus=r.gpus_per_generator_actor,
    )
    written = seen = 0
    start, last = time.perf_counter(), 0.0
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        seen += len(batch)
        written += int(batch["written"].sum())
        now = time.perf_counter() - start
        if now - last > 10 or seen >= expected:
            last = now
            log(f"{seen}/{expected} images done ({written} written), {seen / now:.2f} img/s")
    return written


def check_cluster_fits(cfg: ExperimentConfig, actors: int) -> None:
    """Fail in one line when the actor pool can never start on this cluster (Ray would wait for it forever)."""
    r, have = cfg.resources, ray.cluster_resources()
    for kind, each, key in (("CPU", r.cpus_per_generator_actor, "cpus"), ("GPU", r.gpus_per_generator_actor, "gpus")):
        if each * actors > have.get(kind, 0.0):
            raise ConfigError(
                f"{actors} generator actor(s) x {each:g} {kind} need {each * actors:g} {kind}s but the Ray cluster "
                f"has {have.get(kind, 0.0):g}; use --actors N or --set resources.{key}_per_generator_actor=X"
                + (" (0 generates on CPUs)" if kind == "GPU" else ""))


def run_generation_job(cfg: ExperimentConfig, fewshot_dir: str | Path, root: str | Path, actors: int | None = None,
                       log: Log = print) -> Path:
    """Generate the synthetic set of `cfg` on the connected Ray cluster, resuming a partial set; return the manifest.

    Ray must be initialised by the caller (`ray.init(...)`).
    """
    fewshot_dir, root = Path(fewshot_dir).resolve(), Path(root).resolve()
    n = actors or cfg.resources.generator_actors
    check_cluster_fits(cfg, n)
    check_init(cfg, fewshot_dir)
    artefact, fingerprint = ensure_artefact_on_cluster(cfg, fewshot_dir, root)
    key, table = plan_synthetic_set(cfg, fewshot_dir, fingerprint)
    out = prepare_synthetic_set(root, key, table)
    with artefact_lock(out, log):  # a second sweep of the same set waits, then finds nothing left to make
        groups = missing_groups(table, out)
        log(f"{out}: {len(table)} images in {table['group'].nunique()} groups; {len(groups)} groups to make "
            f"on {n} actor(s)")
        if groups:
            expected = int(table["group"].isin(groups).sum())
            run_groups_on_ray(cfg, artefact, out, groups, expected, n, log, fewshot_dir)
        return finish_synthetic_set(out, table)


def run_generation_on_ray(cfg: ExperimentConfig, fewshot_dir: Path, root: Path, address: str | None,
                          actors: int | None = None, log: Log = print) -> Path:
    """`python -m fsynth.generate` without --direct: join the cluster at `address` (None: a local Ray) and run
    `run_generation_job` there; return the manifest."""
    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    return run_generation_job(cfg, fewshot_dir, root, actors=actors, log=log)
