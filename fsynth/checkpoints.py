"""Training checkpoints: adapters, optimiser, schedule and progress as safetensors + JSON, written atomically."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fsynth.cache import publish_dir
from fsynth.config import ExperimentConfig, config_to_dict, save_config
from fsynth.errors import FsynthError
from fsynth.models import load_adapters, save_adapters


@dataclass
class TrainState:
    """What a checkpoint restores besides the model: progress, the best model so far and the history."""

    epoch: int = -1  # last finished epoch
    step: int = 0
    best_epoch: int = -1
    best_val_accuracy: float = -math.inf
    best_adapters: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors '<param index>.<name>' plus its JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, slots in sd["state"].items():
        for name, value in slots.items():
            tensors[f"{idx}.{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)).contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(directory: str | Path, model, optimizer, scheduler, partitioner, state: TrainState,
         cfg: ExperimentConfig) -> str:
    """Write a resumable checkpoint directory; a reader never sees a half-written one (an older copy of the same
    epoch, e.g. from a rerun, is replaced whole)."""

    def fill(tmp: Path) -> None:
        save_adapters(model, tmp / "adapters.safetensors")
        if state.best_adapters:
            save_file({k: v.contiguous() for k, v in state.best_adapters.items()}, str(tmp / "best.safetensors"))
        meta = {"epoch": state.epoch, "step": state.step, "best_epoch": state.best_epoch,
                "best_val_accuracy": state.best_val_accuracy, "history": state.history,
                "config": config_to_dict(cfg)}
        if optimizer is not None:
            tensors, meta["optimizer"] = _flatten_optimizer(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            meta["scheduler"] = scheduler.state_dict()
        if partitioner is not None:
            save_file({k: v.contiguous() for k, v in partitioner.state_dict().items()},
                      str(tmp / "partitioner.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta))

    return str(publish_dir(directory, fill))


def load(directory: str | Path, model, optimizer, scheduler, partitioner) -> TrainState:
    """Restore model, optimiser, schedule and partitioner from `save`'s directory; return the progress."""

    directory = Path(directory)
    if not (directory / "state.json").is_file():
        raise FsynthError(f"{directory} is not a training checkpoint (no state.json); pass a checkpoints/epoch_* "
                          "directory of an earlier run")
    meta = json.loads((directory / "state.json").read_text())
    load_adapters(model, directory / "adapters.safetensors")
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")),
                                                       meta["optimizer"]))
        scheduler.load_state_dict(meta["scheduler"])
    if partitioner is not None:
        partitioner.load_state_dict(load_file(str(directory / "partitioner.safetensors")))
    best = directory / "best.safetensors"
    return TrainState(epoch=meta["epoch"], step=meta["step"], best_epoch=meta["best_epoch"],
                      best_val_accuracy=meta["best_val_accuracy"],
                      best_adapters=load_file(str(best)) if best.is_file() else {}, history=meta["history"])


def latest(workdir: str | Path) -> Path | None:
    """The newest complete checkpoint directory under `workdir/checkpoints`, if any."""
    done = sorted(p for p in (Path(workdir) / "checkpoints").glob("epoch_*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_final(directory: str | Path, model, cfg: ExperimentConfig, confusion: np.ndarray | None) -> str:
    """The final model of a run: adapters + head (safetensors), the resolved config, the test confusion matrix
    ([C, C] counts, rows true class; None when the run was not tested, e.g. a sweep trial)."""

    def fill(tmp: Path) -> None:
        save_adapters(model, tmp / "adapters.safetensors", metadata={"arch": cfg.model.arch,
                                                                     "pretrained": cfg.model.pretrained})
        save_config(cfg, tmp / "config.yaml")
        if confusion is not None:
            np.savetxt(tmp / "confusion_test.csv", confusion, fmt="%d", delimiter=",")

    return str(publish_dir(directory, fill))
