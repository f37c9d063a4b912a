"""Stages before training: few-shot data reused, the model built, static regions cached and joined by id."""

import dataclasses
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsynth.augment import build_eval_transform
from fsynth.baselines import apply_baseline
from fsynth.config import build_config
from fsynth.data.records import load_image
from fsynth.errors import ConfigError
from fsynth.models import preprocess_spec
from fsynth.stages import build_model, build_regions, ensure_fewshot
from fsynth.trainset import load_train_data
from tests.data.fake_roots import make_root
from tests.test_loop import toy_data


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



def class_means(model, cfg, samples, num_classes):
    """[C, D] L2-normalised class means of the L2-normalised features of `samples`, computed here by hand."""
    transform = build_eval_transform(*preprocess_spec(cfg.model))
    model.eval()
    with torch.no_grad():
        feats = model.encode(torch.stack([transform(load_image(s)) for s in samples]))
    labels = torch.tensor([s.label for s in samples])
    return F.normalize(torch.stack([feats[labels == c].mean(dim=0) for c in range(num_classes)]), dim=-1)


def test_synthetic_only_prototype_head_uses_no_real_image(tmp_path):
    data = toy_data(tmp_path)
    base = build_config(overrides=["model.arch=tiny-clip", "model.pretrained=", "model.head=prototype",
                                   "model.image_size=32", "model.lora.rank=2", "model.lora.dropout=0.0"])
    cfg = apply_baseline(base, "synthetic-only")
    assert not cfg.training.use_real
    synthetic_head = build_model(cfg, data)
    weights = synthetic_head.class_weights()
    assert torch.allclose(weights, class_means(synthetic_head, cfg, data.synthetic, 3), atol=1e-5)
    real_head = build_model(base, data)  # same seed, so the same backbone: only the head's images differ
    assert torch.allclose(real_head.class_weights(), class_means(real_head, base, data.real, 3), atol=1e-5)
    assert not torch.allclose(weights, real_head.class_weights(), atol=1e-3)
    # With no real image at all, the head still builds: it never reads one.
    no_real = dataclasses.replace(data, real=[])
    assert torch.equal(build_model(cfg, no_real).class_weights(), weights)
    blue_missing = dataclasses.replace(data, synthetic=[s for s in data.synthetic if s.label != 2])
    with pytest.raises(ConfigError, match=r"^training.use_real=false builds the prototype head from synthetic "
                                          r"images, but class 'blue' has none; .*model.head=zeroshot$"):
        build_model(cfg, blue_missing)
