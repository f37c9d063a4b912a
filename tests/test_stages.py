"""Stages before training: few-shot data reused, the model built, static regions cached and joined by id."""

import random

import numpy as np

from fsynth.config import build_config
from fsynth.stages import build_model, build_regions, ensure_fewshot
from fsynth.trainset import load_train_data
from tests.data.fake_roots import make_root


def test_fewshot_is_written_once(tmp_path):
    make_root("dtd", tmp_path / "data")
    cfg = build_config(overrides=["data.dataset=dtd", f"data.root={tmp_path / 'data'}", "data.shots=2"])
    out = ensure_fewshot(cfg, tmp_path / "fs")
    stamp = (out / "manifest.parquet").stat().st_mtime_ns
    assert ensure_fewshot(cfg, tmp_path / "fs") == out
    assert (out / "manifest.parquet").stat().st_mtime_ns == stamp


def test_static_regions_cached_and_joined_by_id(tmp_path):
    make_root("eurosat", tmp_path / "data")
    base = ["data.dataset=eurosat", f"data.root={tmp_path / 'data'}", "data.shots=3", "model.arch=tiny-clip",
            "model.pretrained=", "model.head=zeroshot", "partition.mode=static", "partition.cluster_multiple=0.5",
            "partition.iterations=20", "training.use_synthetic=false"]
    cfg = build_config(overrides=base)
    data = load_train_data(ensure_fewshot(cfg, tmp_path / "fs"))
    model = build_model(cfg, data)
    lookup = build_regions(cfg, data, model, tmp_path / "cache")
    ids = [s.id for s in data.real]
    regions = lookup(ids)
    assert regions.shape == (30,) and set(regions.tolist()) <= set(range(5))
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    assert np.array_equal(lookup(shuffled), regions[[ids.index(i) for i in shuffled]])
    assert len(list((tmp_path / "cache").glob("regions-*"))) == 1
    again = build_regions(cfg, data, model, tmp_path / "cache")(ids)  # a cache hit, same answer
    assert np.array_equal(again, regions) and len(list((tmp_path / "cache").glob("regions-*"))) == 1
    pixels = build_regions(build_config(overrides=[*base, "partition.features=pixels"]), data, model,
                           tmp_path / "cache")
    assert pixels(ids).shape == (30,) and len(list((tmp_path / "cache").glob("regions-*"))) == 2
    single = build_config(overrides=[*base, "partition.mode=single"])
    assert build_regions(single, data, model, tmp_path / "cache") is None

