"""Train/val/test partitions: CoOp split files when present, else deterministic seeded splits per class."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from fsynth.data.records import SPLITS, Sample, relative_id
from fsynth.errors import DataError

# CoOp's proportions for datasets without an official split (read_and_split_data: 50% / 20% / 30%).
SPLIT_FRACTIONS = {"train": 0.5, "val": 0.2, "test": 0.3}


def by_label(samples: list[Sample]) -> dict[int, list[Sample]]:
    """Samples grouped by label, each group sorted by id so that seeded draws do not depend on scan order."""
    groups: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.label].append(s)
    return {label: sorted(group, key=lambda s: s.id) for label, group in sorted(groups.items())}


def class_rng(seed: int, label: int, purpose: int) -> np.random.Generator:
    """A generator for one class and one purpose, so that classes and purposes draw independently."""
    return np.random.default_rng([seed, label, purpose])


def read_split_file(path: Path, image_dir: Path, dataset: str, num_classes: int) -> dict[str, list[Sample]]:
    """Read a CoOp `split_zhou_*.json` ({split: [[relative path, label, classname], ...]})."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"split file {path} cannot be read ({exc}); replace it with CoOp's original") from None
    out: dict[str, list[Sample]] = {}
    for split in SPLITS:
        rows = table.get(split)
        if not isinstance(rows, list):
            raise DataError(f"split file {path} has no '{split}' list; replace it with CoOp's original")
        samples = []
        for row in rows:
            rel, label = row[0], int(row[1])
            if not 0 <= label < num_classes:
                raise DataError(f"split file {path}: label {label} of {rel} is outside 0..{num_classes - 1}")
            file = image_dir / rel
            samples.append(Sample(relative_id(dataset, file, image_dir), label, str(file)))
        out[split] = samples
    missing = [s.path for split in SPLITS for s in out[split] if not Path(s.path).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} images named in {path.name} are missing under {image_dir} (first: {missing[0]}); "
            "the dataset root is incomplete: re-extract the dataset there"
        )
    return out


def split_per_class(
    samples: list[Sample], seed: int, fractions: dict[str, float], purpose: int = 0
) -> dict[str, list[Sample]]:
    """Deterministic per-class split of `samples` into the named parts; every part gets at least one per class."""
    out: dict[str, list[Sample]] = {name: [] for name in fractions}
    names = list(fractions)
    for label, group in by_label(samples).items():
        if len(group) < len(names):
            raise DataError(
                f"class {label} has {len(group)} images, fewer than the {len(names)} parts of the split "
                f"({', '.join(names)}); add images to that class"
            )
        order = class_rng(seed, label, purpose).permutation(len(group))
        counts = [max(1, round(len(group) * fractions[n])) for n in names[1:]]
        first = len(group) - sum(counts)
        if first < 1:
            counts[-1] -= 1 - first
            first = 1
        start = 0
        for name, count in zip(names, [first, *counts], strict=True):
            out[name].extend(group[i] for i in order[start : start + count])
            start += count
    return out


def complete_splits(
    parts: dict[str, list[Sample]], seed: int, val_fraction: float
) -> tuple[dict[str, list[Sample]], str]:
    """Turn what a loader found into train/val/test, and say how (the provenance recorded in the manifest).

    `parts` is {all} or has `train` with optional `val` and `test`. An unsplit pool gets CoOp's 50/20/30 split
    per class; a missing test set is 30% of train held out, a missing val set `val_fraction` of train held out,
    so validation never overlaps the shots, which are drawn from what remains of train.
    """
    if set(parts) == {"all"}:
        source = "seeded split per class (seed {}; train/val/test {:g}/{:g}/{:g})".format(
            seed, *SPLIT_FRACTIONS.values()
        )
        return split_per_class(parts["all"], seed, SPLIT_FRACTIONS), source
    if "train" not in parts or not set(parts) <= set(SPLITS):
        raise ValueError(f"loader returned parts {sorted(parts)}")
    out, notes = dict(parts), []
    for split, fraction, purpose in (("test", SPLIT_FRACTIONS["test"], 3), ("val", val_fraction, 4)):
        if split not in out:
            held = split_per_class(out["train"], seed, {"train": 1 - fraction, split: fraction}, purpose)
            out["train"], out[split] = held["train"], held[split]
            notes.append(f"{split} = {fraction:g} of train per class")
    official = "/".join(k for k in SPLITS if k in parts)
    source = f"official {official} split" + (f"; {'; '.join(notes)} (seed {seed})" if notes else "")
    return out, source
