"""The data CLI: `list` the registered datasets, `prepare` a few-shot manifest (and DataDream's folder layout)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from fsynth.cli import ArgumentParser, writable_folder
from fsynth.config import DataConfig
from fsynth.data.fewshot import build_fewshot, export_datadream, write_manifest
from fsynth.data.registry import list_specs, load_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fsynth.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print every registered dataset with its class count")
    prep = sub.add_parser("prepare", help="draw the few shots and write the manifest")
    defaults = DataConfig()
    prep.add_argument("--dataset", required=True, help="a name from `python -m fsynth.data list`")
    prep.add_argument("--root", default="", help="data root (default: the dataset's usual place)")
    prep.add_argument("--shots", type=int, default=defaults.shots, help="real images per class")
    prep.add_argument("--seed", type=int, default=defaults.seed, help="few-shot sampling seed")
    prep.add_argument("--out", default="", help="output folder (default runs/data/NAME/shotK_seedS)")
    prep.add_argument("--split-seed", type=int, default=defaults.split_seed,
                      help="seed of the train/val/test split used when the dataset has no split file")
    prep.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                      help="share of train held out as validation when the dataset has no val split")
    prep.add_argument("--val-per-class", type=int, default=defaults.val_per_class,
                      help="cap the validation set per class (0 = all)")
    prep.add_argument("--download", action="store_true", help="fetch the dataset with torchvision first")
    prep.add_argument("--export-datadream", action="store_true",
                      help="also copy the shots to OUT/shot{K}_seed{S}/{class}/ (DataDream's layout)")
    return parser


def run_list() -> None:
    print(f"{'dataset':<15} {'classes':>7}  {'domain':<10} title")
    for spec in list_specs():
        count = spec.num_classes if spec.num_classes is not None else "any"
        print(f"{spec.name:<15} {count:>7}  {spec.domain or '-':<10} {spec.title}")


def run_prepare(args: argparse.Namespace) -> Path:
    # DataConfig checks shots, val fraction and cap once, with the same messages as a YAML config.
    data = DataConfig(dataset=args.dataset, root=args.root, shots=args.shots, seed=args.seed,
                      split_seed=args.split_seed, val_fraction=args.val_fraction,
                      val_per_class=args.val_per_class, download=args.download)
    out = writable_folder(args.out or Path("runs") / "data" / data.dataset / f"shot{data.shots}_seed{data.seed}",
                          "--out")
    dataset = load_dataset(data.dataset, data.root, split_seed=data.split_seed,
                           val_fraction=data.val_fraction, fetch=data.download)
    fewshot = build_fewshot(dataset, data.shots, data.seed, data.val_per_class, test_per_class=data.test_per_class)
    manifest = write_manifest(fewshot, out)
    print(f"{dataset.name}: {dataset.num_classes} classes, split from {dataset.split_source}")
    print(f"shots {len(fewshot.train)} ({data.shots}/class, seed {data.seed}), val {len(fewshot.val)}, "
          f"test {len(fewshot.test)}")
    if args.export_datadream:
        print(f"DataDream layout: {export_datadream(fewshot, out)}")
    print(f"manifest: {manifest}")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        run_list()
    else:
        run_prepare(args)
    return 0
