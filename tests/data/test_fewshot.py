"""Few-shot sampling: deterministic, nested, disjoint from validation; the manifest and DataDream's layout."""

from pathlib import Path

import pandas as pd
import pytest

from fsynth.data.fewshot import (
    MANIFEST_COLUMNS,
    build_fewshot,
    cap_per_class,
    export_datadream,
    load_manifest,
    sample_shots,
    write_manifest,
)
from fsynth.data.registry import load_dataset
from fsynth.errors import DataError
from tests.data.fake_roots import make_root


@pytest.fixture
def food(tmp_path):
    make_root("food101", tmp_path, per_class=8)
    return load_dataset("food101", tmp_path)


def ids(samples):
    return [s.id for s in samples]


def test_k_per_class_deterministic_and_seed_dependent(food):
    a = sample_shots(food.train, 4, 1, food.classnames)
    assert ids(a) == ids(sample_shots(food.train, 4, 1, food.classnames))
    assert ids(a) != ids(sample_shots(food.train, 4, 2, food.classnames))
    counts = pd.Series([s.label for s in a]).value_counts()
    assert len(counts) == 101 and set(counts) == {4}


def test_shots_are_nested_across_k(food):
    two = set(ids(sample_shots(food.train, 2, 3, food.classnames)))
    four = set(ids(sample_shots(food.train, 4, 3, food.classnames)))
    assert two < four


def test_draw_does_not_depend_on_scan_order(food):
    shuffled = list(reversed(food.train))
    assert set(ids(sample_shots(shuffled, 3, 5, food.classnames))) == set(ids(sample_shots(food.train, 3, 5,
                                                                                            food.classnames)))


def test_validation_never_overlaps_the_shots(tmp_path):
    make_root("fashion-mnist", tmp_path, per_class=20)
    ds = load_dataset("fashion-mnist", tmp_path, val_fraction=0.3)
    for seed in range(5):
        fs = build_fewshot(ds, 8, seed)
        assert not set(ids(fs.train)) & set(ids(fs.val))
        assert not set(ids(fs.train)) & set(ids(fs.test))


def test_too_few_images_names_the_class_and_the_fix(food):
    with pytest.raises(DataError) as info:
        sample_shots(food.train, 7, 1, food.classnames)
    message = str(info.value)
    assert "class 'apple_pie' has only 6 training images, fewer than the 7 shots asked (101 classes short)" in message
    assert "pass --shots 6 or fewer" in message
    with pytest.raises(DataError, match="shots must be at least 1"):
        sample_shots(food.train, 0, 1, food.classnames)


def test_val_cap_per_class(food):
    capped = cap_per_class(food.train, 2, 0)
    assert set(pd.Series([s.label for s in capped]).value_counts()) == {2}
    assert cap_per_class(food.train, 0, 0) == food.train


def test_unreadable_shot_fails_before_training(tmp_path):
    make_root("eurosat", tmp_path, per_class=6)
    ds = load_dataset("eurosat", tmp_path)
    fs = build_fewshot(ds, 3, 0)
    Path(fs.train[0].path).write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read image .* replace or delete the file"):
        build_fewshot(ds, 3, 0)


def test_manifest_round_trip(food, tmp_path):
    fs = build_fewshot(food, 2, 7, val_per_class=1)
    path = write_manifest(fs, tmp_path / "out")
    frame = load_manifest(path)
    assert tuple(frame.columns) == MANIFEST_COLUMNS
    assert (frame.split == "train").sum() == 202 and (frame.split == "val").sum() == 101
    assert (frame.split == "test").sum() == len(food.test)
    assert set(frame.domain) == {"real"} and set(frame.seed) == {7}
    train = frame[frame.split == "train"]
    assert list(train.sample_id) == ids(fs.train)
    assert all(food.classnames[lbl] == name for lbl, name in zip(train.label, train.class_name, strict=True))
    info = (tmp_path / "out" / "fewshot.json").read_text()
    assert '"split_source": "official train/test split; val = 0.2 of train per class (seed 0)"' in info
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    with pytest.raises(DataError, match="cannot read manifest"):
        load_manifest(tmp_path / "bad.parquet")


def test_array_backed_manifest_has_indices(tmp_path):
    make_root("fashion-mnist", tmp_path / "fm", per_class=6)
    fs = build_fewshot(load_dataset("fashion-mnist", tmp_path / "fm"), 2, 0)
    frame = load_manifest(write_manifest(fs, tmp_path / "out"))
    assert (frame["index"] >= 0).all() and frame.path.str.endswith("idx3-ubyte.gz").all()


def test_datadream_export(tmp_path):
    make_root("folder", tmp_path / "data", per_class=5)
    fs = build_fewshot(load_dataset("folder", tmp_path / "data"), 2, 4)
    base = export_datadream(fs, tmp_path / "dd")
    assert base == tmp_path / "dd" / "shot2_seed4"
    assert sorted(p.name for p in base.iterdir()) == ["grey wolf", "lynx", "red fox"]
    assert all(len(list((base / c).iterdir())) == 2 for c in ("grey wolf", "lynx", "red fox"))
    make_root("fashion-mnist", tmp_path / "fm", per_class=6)
    fm = export_datadream(build_fewshot(load_dataset("fashion-mnist", tmp_path / "fm"), 1, 0), tmp_path / "dd2")
    assert len(list((fm / "T-shirt-top").glob("*.png"))) == 1
