"""The synthetic set: seeds, ids, the prompt table, files and manifest, and the resumable DDPM build."""

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import fsynth.synthetic as synthetic
from fsynth.data.fewshot import MANIFEST_COLUMNS
from fsynth.errors import FsynthError
from fsynth.synthetic import (
    SYNTHETIC_COLUMNS,
    build_ddpm_synthetic_set,
    image_seed,
    load_synthetic_manifest,
    plan_rows,
    write_synthetic_images,
    write_synthetic_manifest,
)

CLASSES = ("T-shirt/top", "Ankle boot")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_columns_extend_the_real_manifest():
    assert SYNTHETIC_COLUMNS[:6] == MANIFEST_COLUMNS[:6]
    assert set(MANIFEST_COLUMNS) - set(SYNTHETIC_COLUMNS) == {"split"}


def test_image_seed_is_stable_and_distinct():
    seed = image_seed("fashion-mnist", "Trouser", 3, 0)
    expected = int.from_bytes(hashlib.sha256(json.dumps(["fashion-mnist", "Trouser", 3, 0]).encode()).digest()[:8],
                              "big") >> 1
    assert seed == expected and 0 <= seed < 2**63
    others = {image_seed("fashion-mnist", "Trouser", 4, 0), image_seed("fashion-mnist", "Trouser", 3, 1),
              image_seed("fashion-mnist", "Dress", 3, 0), image_seed("dtd", "Trouser", 3, 0)}
    assert len(others | {seed}) == 5


def test_plan_rows():
    rows = plan_rows("fashion-mnist", CLASSES, "", 3, 7, "abcd")
    assert tuple(rows.columns) == SYNTHETIC_COLUMNS and len(rows) == 6
    assert rows["sample_id"].is_unique
    assert rows["sample_id"].iloc[4] == "synthetic/fashion-mnist/abcd/Ankle boot/00001"
    assert rows["sample_id"].iloc[0] == "synthetic/fashion-mnist/abcd/T-shirt-top/00000"
    assert list(rows["label"]) == [0, 0, 0, 1, 1, 1] and set(rows["domain"]) == {"synthetic"}
    assert set(rows["index"]) == {-1} and set(rows["generator"]) == {"abcd"} and set(rows["path"]) == {""}
    assert rows["prompt"].iloc[0] == "a photo of a T-shirt/top"
    assert rows["seed"].iloc[5] == image_seed("fashion-mnist", "Ankle boot", 2, 7)
    assert rows["seed"].dtype == "int64"
    assert plan_rows("dtd", ["banded"], "texture", 1, 0, "f")["prompt"].iloc[0] == "a texture photo of a banded"


def test_zero_images_per_class_is_one_line_error():
    with pytest.raises(FsynthError) as err:
        plan_rows("fashion-mnist", CLASSES, "", 0, 0, "abcd")
    assert "\n" not in str(err.value) and "images_per_class" in str(err.value)


def test_write_and_load_round_trip(tmp_path):
    rows = plan_rows("fashion-mnist", CLASSES, "", 2, 0, "abcd")
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]
    written = write_synthetic_images(rows, images, tmp_path)
    assert written["path"].iloc[3] == str(tmp_path.resolve() / "Ankle boot" / "00001.png")
    with Image.open(written["path"].iloc[2]) as img:
        assert np.asarray(img)[0, 0, 0] == 80 and img.text["fsynth:sample_id"] == rows["sample_id"].iloc[2]
    path = write_synthetic_manifest(written, tmp_path)
    assert path == tmp_path.resolve() / "manifest.parquet"
    pd.testing.assert_frame_equal(load_synthetic_manifest(path), written)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_load_bad_manifest_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"sample_id": ["x"]}).to_parquet(bad)
    for path in (bad, tmp_path / "missing.parquet"):
        with pytest.raises(FsynthError) as err:
            load_synthetic_manifest(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)


def fewshot_manifest(tmp_path):
    """A tiny real manifest: 2 classes x 2 grey 28x28 PNG shots (split train) and one val row."""
    rows = []
    for label, name in enumerate(CLASSES):
        for i in range(3):
            path = tmp_path / "real" / f"{label}_{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(np.full((28, 28), 60 + 100 * label + 20 * i, np.uint8)).save(path)
            split = "train" if i < 2 else "val"
            rows.append((f"toy/{label}_{i}.png", str(path), -1, label, name, "real", split, 1))
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).to_parquet(manifest)
    return manifest


def test_build_is_resumable(tmp_path, monkeypatch):
    calls = {"train": 0, "sampled": []}
    real_train, real_sample = synthetic.train_ddpm, synthetic.sample_images

    def counting_train(*args, **kwargs):
        calls["train"] += 1
        return real_train(*args, **kwargs)

    def counting_sample(gen, labels, seeds, **kwargs):
        calls["sampled"].extend(seeds)
        return real_sample(gen, labels, seeds, **kwargs)

    monkeypatch.setattr(synthetic, "train_ddpm", counting_train)
    monkeypatch.setattr(synthetic, "sample_images", counting_sample)
    manifest, out = fewshot_manifest(tmp_path), tmp_path / "synth"
    settings = dict(images_per_class=3, train_steps=2, batch_size=4, lr=1e-3, weight_decay=0.0, warmup_steps=1,
                    sample_steps=2, seed=0, dataset="fashion-mnist")

    path = build_ddpm_synthetic_set(manifest, out, **settings)
    rows = load_synthetic_manifest(path)
    assert len(rows) == 6 and calls["train"] == 1 and len(calls["sampled"]) == 6
    assert (out / "generator" / "generator.json").is_file()
    assert Image.open(rows["path"].iloc[0]).size == (32, 32)
    before = {p: Image.open(p).tobytes() for p in rows["path"]}

    calls["sampled"].clear()
    build_ddpm_synthetic_set(manifest, out, **settings)
    assert calls["train"] == 1 and calls["sampled"] == []  # generator loaded, every image present

    gone, corrupt = rows.iloc[1], rows.iloc[4]
    (out / "T-shirt-top" / "00001.png").unlink()
    data = open(corrupt["path"], "rb").read()
    open(corrupt["path"], "wb").write(data[: len(data) // 2])  # a partial write
    assert pd.read_parquet(build_ddpm_synthetic_set(manifest, out, **settings)).equals(rows)
    assert calls["train"] == 1 and sorted(calls["sampled"]) == sorted([gone["seed"], corrupt["seed"]])
    assert {p: Image.open(p).tobytes() for p in rows["path"]} == before  # same seeds, same images

    with pytest.raises(FsynthError, match="trained on other shots or settings"):
        build_ddpm_synthetic_set(manifest, out, **{**settings, "train_steps": 3})

    # A new generator at the same paths: every old PNG is another generator's image, so all are made again.
    shutil.rmtree(out / "generator")
    calls["sampled"].clear()
    new_rows = load_synthetic_manifest(build_ddpm_synthetic_set(manifest, out, **{**settings, "train_steps": 3}))
    assert calls["train"] == 2 and len(calls["sampled"]) == 6
    assert set(new_rows["generator"]) != set(rows["generator"]) and list(new_rows["path"]) == list(rows["path"])
