"""The data one training run sees: real shots, synthetic images, validation and test, as torch datasets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from fsynth.augment import Transform
from fsynth.config import ExperimentConfig
from fsynth.data.fewshot import load_manifest
from fsynth.data.records import Sample, load_image
from fsynth.data.registry import get_spec
from fsynth.errors import ConfigError, DataError
from fsynth.partition import num_regions
from fsynth.synthetic import load_synthetic_manifest


@dataclass(frozen=True)
class TrainData:
    """Everything `fit` reads: class names, prompt templates and the four sample lists."""

    dataset: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    real: list[Sample]  # the shots
    synthetic: list[Sample]
    val: list[Sample]
    test: list[Sample]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def synthetic_per_class(self) -> int:
        """Synthetic images per class: the dataset constant of the `protoaug` loss preset."""
        return max(1, round(len(self.synthetic) / self.num_classes)) if self.synthetic else 0


def _samples(frame: pd.DataFrame) -> list[Sample]:
    return [Sample(str(r.sample_id), int(r.label), str(r.path), int(r.index)) for r in frame.itertuples()]


def load_train_data(fewshot_dir: str | Path, synthetic_manifest: str | Path | None = None) -> TrainData:
    """Read a few-shot directory (`python -m fsynth.data prepare` output) and optionally a synthetic manifest."""
    fewshot_dir = Path(fewshot_dir)
    info_path = fewshot_dir / "fewshot.json"
    if not info_path.is_file():
        raise DataError(f"{info_path} is missing; run `python -m fsynth.data prepare --out {fewshot_dir}` first")
    info = json.loads(info_path.read_text())
    frame = load_manifest(fewshot_dir / "manifest.parquet")
    synthetic: list[Sample] = []
    if synthetic_manifest is not None:
        synth = load_synthetic_manifest(synthetic_manifest)
        if synth.label.max() >= len(info["classnames"]):
            raise DataError(f"synthetic manifest {synthetic_manifest} has labels beyond the dataset's classes")
        synthetic = _samples(synth)
    by_split = {s: _samples(frame[frame.split == s]) for s in ("train", "val", "test")}
    return TrainData(info["dataset"], tuple(info["classnames"]), get_spec(info["dataset"]).templates,
                     by_split["train"], synthetic, by_split["val"], by_split["test"])


def check_regions(cfg: ExperimentConfig, num_classes: int, n_real: int, n_synthetic: int) -> None:
    """Refuse more regions than the training images they partition, when a regulariser reads them.

    The partition would quietly shrink K to one image a region, and the discrepancy and robustness terms, which
    compare images within a region, would measure nothing: the run would be cross-entropy under another name.
    """
    p, loss = cfg.partition, cfg.loss
    regularised = loss.lambda_discrepancy > 0 or loss.lambda_robustness > 0
    if p.mode == "single" or not regularised or cfg.training.epochs == 0:  # no loss term reads the regions
        return
    n = (n_real if cfg.training.use_real else 0) + (n_synthetic if cfg.training.use_synthetic else 0)
    k = num_regions(p.mode, p.cluster_multiple, num_classes)
    if 0 < n < k:
        raise ConfigError(f"partition.cluster_multiple={p.cluster_multiple:g} makes K = {k} regions for only {n} "
                          f"training images ({num_classes} classes); lower partition.cluster_multiple to "
                          f"{n / num_classes:g} or less, add shots or synthetic images, or set partition.mode=single")


class ImageSet(Dataset):
    """Samples with a domain flag and a region each: item -> dict(image [3, S, S], label, synthetic, region)."""

    def __init__(self, samples: list[Sample], synthetic: np.ndarray, regions: np.ndarray, transform: Transform):
        self.samples, self.synthetic, self.regions, self.transform = samples, synthetic, regions, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        return {"image": self.transform(load_image(s)), "label": s.label, "synthetic": bool(self.synthetic[i]),
                "region": int(self.regions[i]), "position": i}


def real_repeats(n_real: int, n_synthetic: int, real_per_synthetic: float) -> int:
    """How many times the shots appear per epoch: about `real_per_synthetic` real images per synthetic one."""
    if n_real == 0 or n_synthetic == 0 or real_per_synthetic <= 0:
        return 1
    return max(1, round(real_per_synthetic * n_synthetic / n_real))


def training_items(
    real: list[Sample], synthetic: list[Sample], repeats: int
) -> tuple[list[Sample], np.ndarray]:
    """One epoch's items (shots repeated, then synthetic) and their domain flags [N] bool."""
    items = real * repeats + synthetic
    flags = np.array([False] * (len(real) * repeats) + [True] * len(synthetic), dtype=bool)
    return items, flags


def method_epoch_length(cfg: ExperimentConfig, data: TrainData) -> int:
    """Items in one epoch of the method on this data: the shots oversampled against the synthetic set, plus it.

    The synthetic set's size is the loaded one, or generator.images_per_class x classes for a baseline that
    loads none (real-only), so every baseline can be given the method's number of optimiser steps.
    """
    n_real = len(data.real)
    n_synth = len(data.synthetic) or cfg.generator.images_per_class * data.num_classes
    return n_real * real_repeats(n_real, n_synth, cfg.training.real_per_synthetic) + n_synth


def epoch_items(cfg: ExperimentConfig, data: TrainData) -> tuple[list[Sample], np.ndarray]:
    """The items of one epoch and their domain flags [N] bool, as `cfg.training` says.

    With training.match_steps, a baseline whose own epoch is shorter than the method's (real-only,
    synthetic-only) cycles through its images up to the method's length: the same batches per epoch, so the
    same number of optimiser steps, and a comparison of data rather than of step counts.
    """
    t = cfg.training
    real = data.real if t.use_real else []
    synthetic = data.synthetic if t.use_synthetic else []
    items, flags = training_items(real, synthetic, real_repeats(len(real), len(synthetic), t.real_per_synthetic))
    target = method_epoch_length(cfg, data) if t.match_steps and items else 0
    if target > len(items):
        order = np.arange(target) % len(items)
        items, flags = [items[i] for i in order], flags[order]
    return items, flags


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, workers: int,
                drop_last: bool = False) -> DataLoader:
    """A loader whose order (and workers' seeds) depend only on `seed`, so an epoch replays exactly on resume."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=workers,
                      drop_last=drop_last, persistent_workers=False)
