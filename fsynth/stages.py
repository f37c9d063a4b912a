"""The stages before training: few-shot data on disk, the classifier, the static regions (cached), and
`setup_run`, the one set-up of a run (data -> model -> regions) every runner calls."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fsynth.augment import build_eval_transform
from fsynth.baselines import needs_synthetic
from fsynth.batch_regions import uses_outputs
from fsynth.cache import content_key
from fsynth.config import ExperimentConfig
from fsynth.data.fewshot import build_fewshot, write_manifest
from fsynth.data.records import Sample, load_image
from fsynth.data.registry import load_dataset
from fsynth.errors import ConfigError
from fsynth.models import build_classifier, preprocess_spec
from fsynth.partition import build_static_regions, embedding_features, ensure_regions, num_regions, pixel_features
from fsynth.trainset import TrainData, check_regions, load_train_data

Lookup = Callable[[Sequence[str]], np.ndarray]


def ensure_fewshot(cfg: ExperimentConfig, out_dir: str | Path) -> Path:
    """The few-shot directory of `cfg.data` under `out_dir` (written once, reused while it exists)."""
    d = cfg.data
    name = f"{d.dataset}-shot{d.shots}-seed{d.seed}-split{d.split_seed}-v{d.val_per_class}"
    out = Path(out_dir).resolve() / (name + (f"-t{d.test_per_class}" if d.test_per_class else ""))
    if not (out / "manifest.parquet").is_file() or not (out / "fewshot.json").is_file():
        dataset = load_dataset(d.dataset, d.root, split_seed=d.split_seed, val_fraction=d.val_fraction,
                               fetch=d.download)
        write_manifest(build_fewshot(dataset, d.shots, d.seed, d.val_per_class,
                                     test_per_class=d.test_per_class), out)
    return out


class LazyImages(Sequence):
    """Images of `samples`, decoded on access, so a partition over tens of thousands never holds them all."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Image.Image:
        return load_image(self.samples[i])


def build_model(cfg: ExperimentConfig, data: TrainData, device: torch.device | None = None) -> torch.nn.Module:
    """The classifier of `cfg.model` for `data`'s classes; a prototype head is built from the real shots, or from
    the synthetic images when the run uses no real image (training.use_real=false, the synthetic-only baseline)."""
    torch.manual_seed(cfg.training.seed)  # LoRA's A matrices (and random test backbones) draw from the global RNG
    batches = None
    if cfg.model.head == "prototype":
        size, mean, std = preprocess_spec(cfg.model)
        transform = build_eval_transform(size, mean, std)
        shots = data.real if cfg.training.use_real else _synthetic_head_samples(data)
        # A generator, read once by the head: tens of thousands of synthetic images are never all decoded at once.
        batches = (
            (torch.stack([transform(load_image(s)) for s in shots[i:i + 64]]),
             torch.tensor([s.label for s in shots[i:i + 64]]))
            for i in range(0, len(shots), 64)
        )
    model = build_classifier(cfg.model, data.classnames, data.templates, prototype_batches=batches)
    return model.to(device) if device is not None else model


def _synthetic_head_samples(data: TrainData) -> list[Sample]:
    """The synthetic images a real-free prototype head is built from; every class needs at least one."""
    have = {s.label for s in data.synthetic}
    missing = [name for c, name in enumerate(data.classnames) if c not in have]
    if missing:
        raise ConfigError(f"training.use_real=false builds the prototype head from synthetic images, but class "
                          f"'{missing[0]}' has none; generate synthetic images for every class or set "
                          "model.head=zeroshot")
    return data.synthetic


def _ids_digest(samples: list[Sample]) -> str:
    return content_key("\n".join(s.id for s in samples), 64)


def build_regions(cfg: ExperimentConfig, data: TrainData, model: torch.nn.Module, cache_dir: str | Path
                  ) -> Lookup | None:
    """Static k-means regions of real ∪ synthetic (cached by everything that determines them), as an id lookup.

    None when the run needs no static partition (a single region, online regions, prediction-space regions,
    which the training loop fits on the starting model and assigns per batch, or no real/synthetic pair).
    """
    p = cfg.partition
    samples = (data.real if cfg.training.use_real else []) + (data.synthetic if cfg.training.use_synthetic else [])
    if p.mode != "static" or uses_outputs(cfg) or not samples:
        return None
    k = min(num_regions(p.mode, p.cluster_multiple, data.num_classes), len(samples))
    key = {"dataset": data.dataset, "ids": _ids_digest(samples), "count": len(samples), "features": p.features,
           "k": k, "iterations": p.iterations, "seed": p.seed}
    if p.features == "embedding":
        key.update(arch=cfg.model.arch, pretrained=cfg.model.pretrained, image_size=model.image_size)
    else:
        key.update(pixel_side=p.pixel_side)

    def compute():
        images = LazyImages(samples)
        if p.features == "pixels":
            feats = pixel_features(images, p.pixel_side)
        else:
            feats = embedding_features(model.encode, images,
                                       build_eval_transform(model.image_size, model.mean, model.std))
        return build_static_regions([s.id for s in samples], feats, k, iterations=p.iterations, seed=p.seed,
                                    features_kind=p.features)

    return ensure_regions(cache_dir, key, compute).lookup


@dataclass
class RunSetup:
    """What `fit` is given: the run's data, its starting classifier and its static regions (None: none needed)."""

    data: TrainData
    model: torch.nn.Module
    regions: Lookup | None


def setup_run(cfg: ExperimentConfig, fewshot_dir: str | Path, synthetic_manifest: str | Path | None,
              cache_dir: str | Path, device: torch.device | None = None, check: bool = True) -> RunSetup:
    """Data -> model -> regions for one run of `cfg`: the synthetic set is read only when the baseline trains on
    it, a partition that cannot fit the images is refused before the model is built (`check`; Ray's workers and
    region tasks leave it to the driver, which checks every partition a sweep can give before Ray starts), and
    the static regions are built once and cached under `cache_dir`."""
    synthetic = str(synthetic_manifest) if synthetic_manifest and needs_synthetic(cfg) else None
    data = load_train_data(fewshot_dir, synthetic)
    if check:  # before the model: in seconds
        check_regions(cfg, data.num_classes, len(data.real), len(data.synthetic))
    model = build_model(cfg, data, device)
    return RunSetup(data, model, build_regions(cfg, data, model, cache_dir))
