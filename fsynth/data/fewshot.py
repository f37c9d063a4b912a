"""Few-shot sampling, the manifest table (parquet) and the DataDream folder export."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fsynth.cache import atomic_write, atomic_write_json
from fsynth.data.records import RealDataset, Sample, load_image
from fsynth.data.splits import by_label, class_rng
from fsynth.errors import DataError

MANIFEST_COLUMNS = ("sample_id", "path", "index", "label", "class_name", "domain", "split", "seed")
_SHOTS, _VAL_CAP = 1, 2  # seeded-draw purposes, so the shot draw and the val cap are independent streams


@dataclass(frozen=True)
class FewShotSet:
    """The real data of one experiment: k shots per class, the validation and the test samples."""

    dataset: RealDataset
    shots: int
    seed: int
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]


def sample_shots(train: list[Sample], shots: int, seed: int, classnames: tuple[str, ...]) -> list[Sample]:
    """`shots` samples per class, drawn with `seed`; deterministic, and nested (the 4 shots are in the 8)."""
    if shots <= 0:
        raise DataError(f"shots must be at least 1, got {shots}; pass --shots 1, 2, 4, 8 or 16")
    groups = by_label(train)
    short = {label: len(g) for label, g in groups.items() if len(g) < shots}
    if short:
        label, have = min(short.items(), key=lambda kv: kv[1])
        raise DataError(
            f"class '{classnames[label]}' has only {have} training images, fewer than the {shots} shots asked "
            f"({len(short)} classes short); pass --shots {have} or fewer, or add images to that class"
        )
    picked = []
    for label, group in groups.items():
        order = class_rng(seed, label, _SHOTS).permutation(len(group))
        picked.extend(group[i] for i in sorted(order[:shots]))
    return picked


def cap_per_class(samples: list[Sample], per_class: int, seed: int) -> list[Sample]:
    """At most `per_class` samples of each class (seeded), or all of them when `per_class` is 0."""
    if per_class <= 0:
        return list(samples)
    out = []
    for label, group in by_label(samples).items():
        order = class_rng(seed, label, _VAL_CAP).permutation(len(group))
        out.extend(group[i] for i in sorted(order[:per_class]))
    return out


def build_fewshot(
    dataset: RealDataset, shots: int, seed: int, val_per_class: int = 0, verify: bool = True,
    test_per_class: int = 0,
) -> FewShotSet:
    """Draw the shots from the train partition; validation comes from the val partition and never overlaps.

    With `verify`, every shot is decoded once, so an unreadable image fails here and not mid-training.
    `test_per_class` > 0 keeps a deterministic subset of the test split (laptop demos); 0 keeps all of it.
    """
    train = sample_shots(dataset.train, shots, seed, dataset.classnames)
    if verify:
        for s in train:
            load_image(s)
    val = cap_per_class(dataset.val, val_per_class, seed)
    overlap = {s.id for s in train} & {s.id for s in val}
    if overlap:  # the partitions are disjoint by construction; this guards against a broken split file
        raise DataError(f"{len(overlap)} shots are also validation samples (e.g. {min(overlap)}); "
                        "the split file lists an image in both train and val: fix or remove it")
    test = cap_per_class(dataset.test, test_per_class, seed)
    return FewShotSet(dataset, shots, seed, train, val, test)


def manifest_frame(fs: FewShotSet) -> pd.DataFrame:
    """One row per real sample of the experiment (shots as split 'train', then 'val' and 'test')."""
    names = fs.dataset.classnames
    rows = [
        (s.id, s.path, s.index, s.label, names[s.label], "real", split, fs.seed)
        for split, samples in (("train", fs.train), ("val", fs.val), ("test", fs.test))
        for s in samples
    ]
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    return frame.astype({"index": "int64", "label": "int64", "seed": "int64"})


def write_manifest(fs: FewShotSet, out_dir: str | Path) -> Path:
    """Write `manifest.parquet` and `fewshot.json` (provenance) into `out_dir`, atomically; return the parquet."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = manifest_frame(fs)
    path = atomic_write(out / "manifest.parquet", lambda f: frame.to_parquet(f, index=False))
    info = {
        "dataset": fs.dataset.name, "root": fs.dataset.root, "shots": fs.shots, "seed": fs.seed,
        "split_source": fs.dataset.split_source, "num_classes": fs.dataset.num_classes,
        "counts": {"train": len(fs.train), "val": len(fs.val), "test": len(fs.test)},
        "classnames": list(fs.dataset.classnames),
    }
    atomic_write_json(out / "fewshot.json", info, indent=2)
    return path


def load_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest written by `write_manifest`, checking its columns."""
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read manifest {path} ({exc}); run `python -m fsynth.data prepare` again") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"manifest {path} lacks columns {missing}; run `python -m fsynth.data prepare` again")
    return frame


def folder_name(classname: str) -> str:
    """A class name usable as a folder name ('T-shirt/top' -> 'T-shirt-top')."""
    return classname.replace("/", "-").replace(os.sep, "-")


def export_datadream(fs: FewShotSet, out_dir: str | Path) -> Path:
    """Copy the shots into DataDream's layout `out_dir/shot{K}_seed{S}/{class}/{file}`; return that folder."""
    base = Path(out_dir) / f"shot{fs.shots}_seed{fs.seed}"
    for s in fs.train:
        folder = base / folder_name(fs.dataset.classnames[s.label])
        folder.mkdir(parents=True, exist_ok=True)
        if s.index >= 0:  # an array-backed sample has no file of its own: write it as PNG
            load_image(s).save(folder / f"{s.id.replace('/', '_')}.png")
        else:
            shutil.copy2(s.path, folder / Path(s.path).name)
    return base
