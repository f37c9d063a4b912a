"""`python -m fsynth.train`: one training run on this machine (no Ray), printing validation and test accuracy."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fsynth.baselines import BASELINES, apply_baseline, needs_synthetic
from fsynth.cache import atomic_write_json
from fsynth.checkpoints import latest
from fsynth.cli import ArgumentParser, require_gpus, run_main, writable_folder
from fsynth.config import ExperimentConfig, build_config, save_config
from fsynth.errors import ConfigError
from fsynth.loop import FitResult, fit, pick_device
from fsynth.models import check_model
from fsynth.names import run_name
from fsynth.stages import ensure_fewshot, setup_run


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fsynth.train", description=__doc__)
    p.add_argument("--dataset", required=True, help="a name from `python -m fsynth.data list`")
    p.add_argument("--root", default=None, help="data root (default: the dataset's usual place)")
    p.add_argument("--preset", default="embedded", help="full, lightweight or embedded (default)")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) applied after the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.lr=1e-5 (repeatable)")
    p.add_argument("--baseline", default="method", choices=list(BASELINES), help="which method to train")
    p.add_argument("--synthetic", default=None, help="synthetic manifest (parquet) of an existing synthetic set")
    p.add_argument("--out", default="runs/train", help="where runs are written (default runs/train)")
    p.add_argument("--resume", action="store_true", help="continue this config's run from its last checkpoint")
    return p


def resolve(args: argparse.Namespace) -> ExperimentConfig:
    extra = {"data": {"dataset": args.dataset}}
    if args.root is not None:
        extra["data"]["root"] = str(Path(args.root).expanduser().resolve())
    cfg = build_config(args.preset, files=args.config, overrides=args.overrides, extra=extra)
    return apply_baseline(cfg, args.baseline)


def print_epoch(metrics: dict, checkpoint: str | None) -> None:
    if "best/val_accuracy" in metrics:  # fit's final report, printed by run_train
        return
    extra = "".join(f"  {k.split('/')[1]} {metrics[k]:.4f}" for k in ("measured/discrepancy", "measured/robustness")
                    if k in metrics)
    extra += mixing_text(metrics)
    print(f"epoch {metrics['epoch']:3d}  loss {metrics['train/loss']:.4f}  train acc "
          f"{metrics['train/accuracy']:.3f}  val acc {metrics['val/accuracy']:.4f}{extra}", flush=True)


def mixing_text(metrics: dict) -> str:
    """The epoch line's mixing figures: synthetic samples in a region with a real one, over the epoch and in the
    batch (what the regularisers saw), and the regions holding both kinds."""
    if "mixing/batch_synthetic_in_t" not in metrics:
        return ""
    return (f"  mixing {100 * metrics['mixing/synthetic_in_mixed']:.0f}% (batch "
            f"{100 * metrics['mixing/batch_synthetic_in_t']:.0f}%, {metrics['mixing/regions_mixed']:.0f} regions)")


def run_train(args: argparse.Namespace) -> FitResult:
    cfg = resolve(args)
    synthetic = str(Path(args.synthetic).resolve()) if args.synthetic else None
    if needs_synthetic(cfg) and synthetic is None:
        raise ConfigError(f"baseline '{args.baseline}' trains on synthetic images; pass --synthetic MANIFEST "
                          "(a synthetic set's manifest.parquet), or use --baseline real-only / zero-shot")
    out = writable_folder(args.out, "--out")
    check_model(cfg.model)  # weights, tags, hub cache: in a second, before the data is read
    require_gpus(cfg.resources.gpus_per_worker, "resources.gpus_per_worker")
    fewshot = ensure_fewshot(cfg, out / "fewshot")
    workdir = out / run_name(cfg, fewshot, synthetic)  # the same run resumes in place
    resume = latest(workdir) if args.resume else None
    device = pick_device()
    run = setup_run(cfg, fewshot, synthetic, out / "cache", device)
    data = run.data
    save_config(cfg, workdir / "config.yaml")
    print(f"{cfg.name} on {data.dataset}: {len(data.real)} real, {len(data.synthetic)} synthetic, "
          f"{len(data.val)} val, {len(data.test)} test; run dir {workdir}"
          + (f"; resuming from {resume.name}" if resume else ""), flush=True)
    result = fit(cfg, data, run.model, print_epoch, workdir=workdir, regions=run.regions, resume_from=resume,
                 device=device)
    tested = f"test accuracy {result.test.accuracy:.4f} (evaluated once)" if result.test else "not tested"
    print(f"best epoch {result.best_epoch}: val accuracy {result.best_val_accuracy:.4f}; {tested}")
    print(f"final adapters: {result.checkpoint}")
    summary = {"dataset": data.dataset, "baseline": cfg.name, "synthetic": synthetic, "best_epoch": result.best_epoch,
               "val_accuracy": result.best_val_accuracy, "test_accuracy": result.test.accuracy if result.test else None,
               "test_count": result.test.count if result.test else 0, "history": result.history,
               "synthetic_quality": synthetic_quality(synthetic)}
    atomic_write_json(workdir / "result.json", summary, indent=2)
    return result


def synthetic_quality(manifest: str | None) -> dict | None:
    """The quality.json `python -m fsynth.generate` wrote beside a synthetic manifest, if there is one."""
    from fsynth.quality import QUALITY_NAME, load_quality

    path = Path(manifest).parent / QUALITY_NAME if manifest else None
    return load_quality(path) if path is not None and path.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    run_train(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
