"""Seeded per-class splits and how a loader's parts become train/val/test."""

import pytest

from fsynth.data.records import Sample
from fsynth.data.splits import complete_splits, split_per_class


def pool(n_classes=3, per_class=10):
    return [Sample(f"d/c{c}/{i}", c, f"/x/c{c}/{i}.jpg") for c in range(n_classes) for i in range(per_class)]


def test_split_per_class_sizes_disjoint_and_deterministic():
    parts = split_per_class(pool(), 0, {"train": 0.5, "val": 0.2, "test": 0.3})
    assert [len(parts[k]) for k in ("train", "val", "test")] == [15, 6, 9]
    all_ids = [s.id for p in parts.values() for s in p]
    assert len(all_ids) == len(set(all_ids)) == 30
    again = split_per_class(list(reversed(pool())), 0, {"train": 0.5, "val": 0.2, "test": 0.3})
    assert [s.id for s in again["val"]] == [s.id for s in parts["val"]]
    other = split_per_class(pool(), 1, {"train": 0.5, "val": 0.2, "test": 0.3})
    assert [s.id for s in other["val"]] != [s.id for s in parts["val"]]


def test_tiny_classes_get_one_per_part_or_a_clear_error():
    parts = split_per_class(pool(per_class=3), 0, {"train": 0.5, "val": 0.2, "test": 0.3})
    assert [len(parts[k]) for k in ("train", "val", "test")] == [3, 3, 3]
    with pytest.raises(Exception, match="class 0 has 2 images, fewer than the 3 parts"):
        split_per_class(pool(per_class=2), 0, {"train": 0.5, "val": 0.2, "test": 0.3})


def test_complete_splits_sources():
    out, source = complete_splits({"all": pool()}, 3, 0.2)
    assert source == "seeded split per class (seed 3; train/val/test 0.5/0.2/0.3)"
    out, source = complete_splits({"train": pool(), "test": pool(1, 2)}, 0, 0.2)
    assert source == "official train/test split; val = 0.2 of train per class (seed 0)"
    assert len(out["val"]) == 6 and len(out["train"]) == 24 and len(out["test"]) == 2
    out, source = complete_splits({"train": pool(), "val": pool(1, 2)}, 0, 0.2)
    assert source == "official train/val split; test = 0.3 of train per class (seed 0)"
    assert len(out["test"]) == 9 and not {s.id for s in out["test"]} & {s.id for s in out["train"]}
    out, source = complete_splits({"train": pool(), "val": pool(1, 1), "test": pool(1, 1)}, 0, 0.2)
    assert source == "official train/val/test split" and len(out["train"]) == 30
