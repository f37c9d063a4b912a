"""`python -m fsynth.generate`: make (or finish) a synthetic set with the Ray Data job and print its manifest.

Ray is imported only when the job runs, so `--direct` (one process, no Ray) works where Ray is not wanted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fsynth.cli import ArgumentParser, require_gpus, run_main, writable_folder
from fsynth.config import ExperimentConfig, build_config
from fsynth.errors import ConfigError
from fsynth.generators import BACKENDS, check_source
from fsynth.stages import ensure_fewshot


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fsynth.generate", description=__doc__)
    p.add_argument("--dataset", required=True, help="a name from `python -m fsynth.data list`")
    p.add_argument("--root", default=None, help="data root (default: the dataset's usual place)")
    p.add_argument("--images-per-class", type=int, default=None, help="synthetic images per class (default: preset)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="generator backend (default: the preset's)")
    p.add_argument("--preset", default=None,
                   help="config preset (default: embedded for ddpm and fashion-mnist, else full)")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) applied after the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set generator.steps=25 (repeatable)")
    p.add_argument("--out", default="runs/synthetic", help="root of synthetic sets and generators (default "
                   "runs/synthetic)")
    p.add_argument("--actors", type=int, default=None, help="generator actors (default resources.generator_actors)")
    p.add_argument("--direct", action="store_true", help="generate in this process without Ray")
    p.add_argument("--no-quality", action="store_true", help="skip the embedding-gap quality signal")
    return p


def resolve(args: argparse.Namespace) -> ExperimentConfig:
    """The config: preset (picked by backend/dataset when not given), YAML files, --set, then the flags."""
    preset = args.preset or ("embedded" if args.backend == "ddpm" or (args.backend is None and
                                                                     args.dataset == "fashion-mnist") else "full")
    extra: dict = {"data": {"dataset": args.dataset}, "generator": {}}
    if args.root is not None:
        extra["data"]["root"] = str(Path(args.root).expanduser().resolve())
    if args.backend is not None:
        extra["generator"]["backend"] = args.backend
    if args.images_per_class is not None:
        extra["generator"]["images_per_class"] = args.images_per_class
    cfg = build_config(preset, files=args.config, overrides=args.overrides, extra=extra)
    print(f"preset {preset}: {cfg.generator.backend} backend, {cfg.generator.images_per_class} images per class",
          flush=True)
    return cfg


def _print(line: str) -> None:
    print(line, flush=True)


def run_generate(args: argparse.Namespace) -> Path:
    if args.actors is not None and args.actors < 1:
        raise ConfigError(f"--actors must be at least 1, got {args.actors}; pass --actors 1 or more")
    cfg = resolve(args)
    out = writable_folder(args.out, "--out")
    if args.direct or not os.environ.get("RAY_ADDRESS"):  # on a cluster, the model and GPUs are the workers'
        check_source(cfg.generator)
        if not args.direct:  # a local Ray job would wait for the GPU forever
            require_gpus(cfg.resources.gpus_per_generator_actor, "resources.gpus_per_generator_actor")
    from fsynth.generation import ensure_quality, run_generation_direct
    from fsynth.loop import pick_device

    fewshot = ensure_fewshot(cfg, out / "fewshot")
    if args.direct:
        manifest = run_generation_direct(cfg, fewshot, out, pick_device(), log=_print)
    else:
        from fsynth.jobs.generation import run_generation_on_ray

        manifest = run_generation_on_ray(cfg, fewshot, out, os.environ.get("RAY_ADDRESS"), args.actors, log=_print)
    if not args.no_quality:
        ensure_quality(cfg, fewshot, manifest, pick_device(), log=_print)
    print(f"manifest: {manifest}", flush=True)
    print(f"sample grid: {manifest.parent / 'samples.png'}", flush=True)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    run_generate(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
