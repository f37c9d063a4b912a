"""From a config to a synthetic set, without Ray: the generator artefact, the backend, the prompt table, a direct run.

The Ray Data job (fsynth.jobs.generation) uses the same pieces and only replaces `run_groups_direct` by an actor pool.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fsynth.cache import artefact_lock
from fsynth.config import ExperimentConfig, GeneratorConfig, config_to_dict
from fsynth.data.records import load_image
from fsynth.data.registry import get_spec
from fsynth.errors import FsynthError
from fsynth.generators import ImageGenerator, SourceShots, denoising_steps
from fsynth.synthetic import (
    finish_synthetic_set,
    load_shots,
    missing_groups,
    plan_rows,
    prepare_synthetic_set,
    run_groups_direct,
    shot_sources,
)

Log = Callable[[str], None]
ARTEFACTS_DIR = "generators"


def _quiet(line: str) -> None:
    pass


def shots_channels(images) -> int:
    """1 when every shot is grey (R == G == B everywhere), else 3: the `ddpm` backend models grey data in grey."""
    return 1 if all(img.mode == "L" or _is_grey(np.asarray(img.convert("RGB"))) for img in images) else 3


def _is_grey(a: np.ndarray) -> bool:
    return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def ddpm_settings(g: GeneratorConfig, shots: int, channels: int) -> dict:
    """train_ddpm's settings from generator.finetune: `steps` optimiser steps, or (steps 0) epochs over the shots.

    Only the resulting count enters the settings (and the DDPM's address): a budget equal to the epochs' count
    names the same artefact.
    """
    from fsynth.generators.ddpm import DEFAULT_WIDTHS, training_steps

    f = g.finetune
    steps = f.steps if f.steps > 0 else training_steps(f.epochs, shots, f.batch_size)
    return {"steps": steps, "batch_size": f.batch_size, "lr": f.lr,
            "weight_decay": f.weight_decay, "warmup_steps": f.warmup_steps, "seed": g.base_seed,
            "resolution": g.resolution, "channels": channels, "widths": list(DEFAULT_WIDTHS)}


def ensure_generator_artefact(cfg: ExperimentConfig, fewshot_dir: str | Path, root: str | Path,
                              device: str | torch.device = "cpu", log: Log = _quiet) -> Path | None:
    """The trained/fine-tuned generator the set needs, under root/generators (made once, then reused).

    `ddpm`: the DDPM trained on the shots. `sd`: the DataDream LoRA when generator.finetune.enabled, else None
    (the base pipeline, or generator.lora_path, is used as it is).
    """
    g = cfg.generator
    out = Path(root).resolve() / ARTEFACTS_DIR
    if g.backend == "ddpm":
        from fsynth.generators.ddpm import ensure_ddpm_generator

        images, labels, classnames, digest = load_shots(fewshot_dir)
        settings = ddpm_settings(g, len(images), shots_channels(images))
        return ensure_ddpm_generator(images, labels, len(classnames), digest, settings, out, device=device, log=log)
    if g.finetune.enabled:
        from fsynth.generators.sd_finetune import ensure_sd_lora

        return ensure_sd_lora(**lora_arguments(cfg, fewshot_dir, root), device=device, log=log)
    return None


def lora_arguments(cfg: ExperimentConfig, fewshot_dir: str | Path, root: str | Path) -> dict:
    """The keyword arguments of sd_finetune's ensure_sd_lora / plan_sd_lora for this config (LoRAs under root)."""
    return {"base_model": cfg.generator.model, "fewshot_manifest": Path(fewshot_dir) / "manifest.parquet",
            "gcfg": cfg.generator, "out_root": Path(root).resolve() / ARTEFACTS_DIR, "dataset": cfg.data.dataset,
            "domain": get_spec(cfg.data.dataset).domain}


def check_init(cfg: ExperimentConfig, fewshot_dir: str | Path | None) -> None:
    """Refuse, before any training or image, an image-to-image set that cannot be made: no few-shot set, a class
    without shots, or a strength that leaves no denoising step (one-line ConfigErrors)."""
    g = cfg.generator
    if g.init_from == "shots":
        shot_sources(fewshot_dir)
        denoising_steps(g.steps, g.strength)


def load_sources(g: GeneratorConfig, fewshot_dir: str | Path | None) -> SourceShots | None:
    """The real shots image-to-image starts from (every shot of `fewshot_dir`, decoded), None for init_from=noise."""
    if g.init_from != "shots":
        return None
    _, samples, digest = shot_sources(fewshot_dir)
    return SourceShots({sid: load_image(s) for sid, s in samples.items()}, g.strength, digest)


def build_generator(g: GeneratorConfig, artefact: str | Path | None, device: str | torch.device = "cpu",
                    fewshot_dir: str | Path | None = None) -> ImageGenerator:
    """The backend of generator config `g`, using the artefact of `ensure_generator_artefact`; with
    init_from=shots it starts from the shots of `fewshot_dir`."""
    sources = load_sources(g, fewshot_dir)
    if g.backend == "ddpm":
        from fsynth.generators.ddpm import DDPMBackend, load_generator

        if artefact is None:
            raise FsynthError("the ddpm backend needs a trained generator; make it with ensure_generator_artefact")
        return DDPMBackend(load_generator(artefact), steps=g.steps, device=device, sources=sources)
    from fsynth.generators.sd_build import build_sd_generator

    return build_sd_generator(g, device=device, lora_path=str(artefact) if artefact else None, sources=sources)


def generator_key(cfg: ExperimentConfig) -> dict:
    """The generator config as a set's address sees it: settings at the value they had before they existed
    (init_from=noise with its strength, finetune.steps 0) are left out, so the sets made then keep their folder."""
    g = config_to_dict(cfg)["generator"]
    if g["init_from"] == "noise":  # text-to-image never reads the strength
        g = {k: v for k, v in g.items() if k not in ("init_from", "strength")}
    if g["finetune"]["steps"] == 0:
        g["finetune"] = {k: v for k, v in g["finetune"].items() if k != "steps"}
    return g


def plan_synthetic_set(cfg: ExperimentConfig, fewshot_dir: str | Path, fingerprint: str
                       ) -> tuple[dict, pd.DataFrame]:
    """(the set's address key, its prompt table) for the classes of `fewshot_dir` and a backend fingerprint."""
    g = cfg.generator
    info = json.loads((Path(fewshot_dir) / "fewshot.json").read_text())
    dataset, classnames = info["dataset"], list(info["classnames"])
    domain = get_spec(dataset).domain
    key = {"format": "fsynth-synthetic/1", "dataset": dataset, "backend": g.backend, "generator": fingerprint,
           "classnames": classnames, "domain": domain, "images_per_class": g.images_per_class,
           "base_seed": g.base_seed, "group_size": g.batch_size, "generator_config": generator_key(cfg)}
    sources = None
    if g.init_from == "shots":
        sources, _, key["source_shots"] = shot_sources(fewshot_dir)
    table = plan_rows(dataset, classnames, domain, g.images_per_class, g.base_seed, fingerprint, g.batch_size,
                      sources)
    return key, table


def run_generation_direct(cfg: ExperimentConfig, fewshot_dir: str | Path, root: str | Path,
                          device: str | torch.device = "cpu", log: Log = _quiet) -> Path:
    """Make the whole synthetic set of `cfg` in this process, resuming a partial one; return its manifest."""
    check_init(cfg, fewshot_dir)
    artefact = ensure_generator_artefact(cfg, fewshot_dir, root, device, log)
    generator = build_generator(cfg.generator, artefact, device, fewshot_dir)
    key, table = plan_synthetic_set(cfg, fewshot_dir, generator.fingerprint)
    out = prepare_synthetic_set(root, key, table)
    with artefact_lock(out, log):  # a concurrent maker of the same set waits, then finds nothing left to make
        groups = missing_groups(table, out)
        log(f"{out}: {len(table)} images in {table['group'].nunique()} groups, {len(groups)} groups to make")
        run_groups_direct(generator, table, out, groups, log)
        return finish_synthetic_set(out, table)


def ensure_quality(cfg: ExperimentConfig, fewshot_dir: str | Path, manifest: str | Path,
                   device: str | torch.device = "cpu", log: Log = _quiet) -> dict | None:
    """The set's embedding gap to the real shots and the starting model's accuracy on it (quality.json beside the
    manifest; measured once per encoder and head, again for a file from before starting_model_accuracy).

    None, with the reason logged, when the frozen encoder of cfg.model cannot be built here (e.g. offline
    hub weights): the set itself stays complete and usable.
    """
    from fsynth.quality import QUALITY_NAME, encoder_name, load_quality, measure_synthetic_quality, write_quality
    from fsynth.trainset import load_train_data

    path = Path(manifest).parent / QUALITY_NAME
    if path.is_file():
        stored = load_quality(path)
        same = stored.get("encoder") == encoder_name(cfg) and stored.get("head") == cfg.model.head
        if same and "starting_model_accuracy" in stored:
            return stored
    try:
        metrics = measure_synthetic_quality(cfg, load_train_data(fewshot_dir, manifest), device=device)
    except FsynthError as exc:
        log(f"quality: skipped ({exc})")
        return None
    write_quality(path.parent, metrics)
    log("quality: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return metrics
