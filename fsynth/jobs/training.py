"""The Ray Train wrapper around the one training loop: `fsynth.loop.fit` run by a `TorchTrainer`'s workers.

Each worker rebuilds the config, data, model and regions from the plain, absolute-path `train_loop_config`,
resumes from `ray.train.get_checkpoint()` when Ray hands one over, and runs `fit` with Ray's hooks (DDP model,
distributed sampler, rank 0 as chief). `fit` writes its checkpoints under a worker-local directory; every report
hands the chief's checkpoint to Ray, which persists it under `storage/name/`.

Checkpoints Ray keeps: one per checkpointed epoch (a `fsynth.checkpoints.save` directory) and the final one
(`fsynth.checkpoints.save_final`'s directory: adapters, config, test confusion) with the last epoch's training
state under `resume/`, so the last checkpoint of a run is always resumable. The final report carries that
checkpoint, which is what makes Train V2 fill `Result.metrics`.

Run names: `job_name` is a hash of the config and inputs. Ray Train V2 silently resumes a run whose name (under
the same storage) already exists: the same job started again resumes from its latest checkpoint (a finished run
re-tests its best model without training again); a different config gets a different name and starts afresh.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from torch.utils.data import SequentialSampler

from fsynth.config import ExperimentConfig, config_from_dict, config_to_dict
from fsynth.names import absolute as _absolute
from fsynth.names import run_name

RESUME = "resume"  # the final checkpoint's copy of the last training state


def job_name(cfg: ExperimentConfig, *, fewshot_dir: str | Path, synthetic_manifest: str | Path | None) -> str:
    """A deterministic run name, unique per config and inputs (reusing it resumes that run): fsynth.names.run_name."""
    return run_name(cfg, fewshot_dir, synthetic_manifest)


def _distributed_loader(loader):
    """Ray's `prepare_data_loader` (a DistributedSampler, each rank an equal share), reseeded per epoch.

    Ray's sampler shuffles with seed 0 and epoch 0 unless `set_epoch` is called, and `fit` builds a fresh loader
    every epoch, so without this every epoch would see the same order. The loader's generator carries the
    epoch's seed (`fsynth.loop.epoch_seed`), which keeps resumed epochs replaying exactly.
    """
    shuffle = not isinstance(loader.sampler, SequentialSampler)
    prepared = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    if shuffle and loader.generator is not None:
        prepared.sampler.set_epoch(loader.generator.initial_seed() % (2**31))
    return prepared


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ...] from every rank -> [world * B, ...] in rank order (ranks hold equal batch sizes: Ray's
    DistributedSampler pads every rank to the same number of samples)."""
    parts = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank (same shape and dtype on each): the prediction-space centroids."""
    out = tensor.contiguous().clone()
    torch.distributed.broadcast(out, src=0)
    return out


def _resume_dir(checkpoint, local: Path) -> str | None:
    """A local copy of Ray's checkpoint, as a directory `fit` resumes from (None: nothing to resume)."""
    if checkpoint is None:
        return None
    path = Path(checkpoint.to_directory(str(local / "restored")))
    for candidate in (path, path / RESUME):
        if (candidate / "state.json").is_file():
            return str(candidate)
    return None


class _Reporter:
    """`fit`'s report callable: every worker calls `ray.train.report` once per `fit` report (V2 requires equal
    counts, it is a barrier); only the chief attaches checkpoints. The final one gets the last state under
    `resume/`."""

    def __init__(self, chief: bool, resumed_from: str | None):
        self.chief = chief
        self.last_state = resumed_from

    def __call__(self, metrics: dict, ckpt_dir: str | None) -> None:
        checkpoint = None
        final = "best/val_accuracy" in metrics  # fit's last report (tested, or not in a sweep trial)
        if final:  # the returned (best-on-validation) model's val accuracy, for Result.metrics and Tune
            metrics = {"val/accuracy": metrics["best/val_accuracy"], **metrics}
        if ckpt_dir and self.chief:
            if final:
                if self.last_state is not None:
                    shutil.copytree(self.last_state, Path(ckpt_dir) / RESUME, dirs_exist_ok=True)
            else:
                self.last_state = ckpt_dir
            checkpoint = ray.train.Checkpoint.from_directory(ckpt_dir)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: the inputs named in `config` through `fsynth.loop.fit` (see `build_trainer`)."""
    # Imported here, in the worker only: the Tune trial and the Train controller import this module too (to build
    # the trainer, to unpickle this function) and need none of the loop, models, open_clip or the data stack,
    # ~3-4 s of CPU in each of those two processes per Train run (tests/test_layering.py keeps it so).
    from fsynth.loop import LoopHooks, fit
    from fsynth.stages import setup_run

    cfg = config_from_dict(config["config"])
    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    context = ray.train.get_context()
    world, chief = context.get_world_size(), context.get_world_rank() == 0
    device = ray.train.torch.get_device()
    run = setup_run(cfg, config["fewshot_dir"], config["synthetic_manifest"], config["cache_dir"], device, check=False)
    local = Path(tempfile.mkdtemp(prefix="fsynth-train-"))
    try:
        resume = _resume_dir(ray.train.get_checkpoint(), local)
        hooks = LoopHooks(prepare_model=ray.train.torch.prepare_model if world > 1 else (lambda m: m),
                          prepare_loader=_distributed_loader if world > 1 else (lambda loader: loader),
                          is_chief=chief, all_gather=_all_gather if world > 1 else (lambda t: t),
                          broadcast=_broadcast if world > 1 else (lambda t: t))
        fit(cfg, run.data, run.model, _Reporter(chief, resume), workdir=local / "work", regions=run.regions,
            resume_from=resume, device=device, hooks=hooks)
    finally:  # Ray has already persisted every reported checkpoint
        shutil.rmtree(local, ignore_errors=True)


WORKER_START_TIMEOUT_ENV, WORKER_START_TIMEOUT_S = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 600


def build_trainer(cfg: ExperimentConfig, *, fewshot_dir: str | Path, synthetic_manifest: str | Path | None,
                  cache_dir: str | Path, storage: str | Path, name: str, callbacks: list | None = None,
                  loop: Callable[[dict], None] = train_loop_per_worker) -> ray.train.torch.TorchTrainer:
    """A `TorchTrainer` for one run of `cfg`, sized by `cfg.resources`, persisting to `storage/name`.

    `name` must be deterministic and unique per config (`job_name`): Ray Train V2 resumes an existing run of
    the same name and storage silently. `callbacks` go to the RunConfig (e.g. Tune's `TuneReportCallback`).
    A worker that dies or raises restarts the run from its last checkpoint, up to `resources.max_failures` times.
    `loop` is what each worker runs (a test wraps it to inject a fault).
    """
    # Ray's 60 s for a worker process to start (torch, fsynth and the data imported) is too short on a busy
    # 2-core laptop, where it then fails the run; the controller reads this from the process that calls fit.
    os.environ.setdefault(WORKER_START_TIMEOUT_ENV, str(WORKER_START_TIMEOUT_S))
    r = cfg.resources
    resources = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker > 0:
        resources["GPU"] = r.gpus_per_worker
    loop_config = {"config": config_to_dict(cfg), "fewshot_dir": _absolute(fewshot_dir),
                   "synthetic_manifest": _absolute(synthetic_manifest) if synthetic_manifest else None,
                   "cache_dir": _absolute(cache_dir)}
    return ray.train.torch.TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=r.num_workers, use_gpu=r.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=_absolute(storage),
                                       failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
                                       callbacks=callbacks),
    )


def run_train_job(cfg: ExperimentConfig, *, fewshot_dir: str | Path, synthetic_manifest: str | Path | None = None,
                  cache_dir: str | Path, storage: str | Path, name: str | None = None) -> ray.train.Result:
    """Fit one run of `cfg` on the connected Ray cluster; `name` defaults to `job_name` (so a rerun resumes)."""
    name = name or job_name(cfg, fewshot_dir=fewshot_dir, synthetic_manifest=synthetic_manifest)
    trainer = build_trainer(cfg, fewshot_dir=fewshot_dir, synthetic_manifest=synthetic_manifest,
                            cache_dir=cache_dir, storage=storage, name=name)
    return trainer.fit()
