"""The synthetic-set quality signal: embedding gaps on toy arrays, then measured through a tiny CLIP."""

import math
from itertools import pairwise

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from fsynth.config import build_config
from fsynth.data.records import Sample
from fsynth.errors import FsynthError
from fsynth.quality import (
    embedding_gap,
    frechet_distance,
    head_accuracy,
    load_quality,
    measure_synthetic_quality,
    write_quality,
)
from fsynth.stages import build_model
from fsynth.trainset import TrainData

GAPS = ("centroid_distance", "frechet", "nearest_real_distance")


def clusters(rng, classes=4, per_class=8, dim=16, spread=1.0):
    """Points [classes * per_class, dim] around well-separated random centres, and their labels."""
    centres = rng.normal(size=(classes, dim)) * 4
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def reference_frechet(a, b):
    """The textbook formula through scipy's sqrtm (fine for full-rank covariances)."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    return diff @ diff + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real)


def test_identical_sets_have_no_gap():
    real, labels = clusters(np.random.default_rng(0))
    gap = embedding_gap(real, labels, real.copy(), labels, 4)
    assert abs(gap["centroid_distance"]) < 1e-12 and abs(gap["frechet"]) < 1e-9
    assert abs(gap["nearest_real_distance"]) < 1e-12 and gap["synthetic_accuracy"] == 1.0
    assert gap["real_images"] == gap["synthetic_images"] == 32 and gap["classes"] == 4


def test_gaps_grow_with_the_shift():
    rng = np.random.default_rng(1)
    real, labels = clusters(rng)
    direction = rng.normal(size=real.shape[1])
    gaps = [embedding_gap(real, labels, real + t * direction, labels, 4) for t in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)]
    for key in GAPS:
        values = [g[key] for g in gaps]
        assert all(a < b for a, b in pairwise(values)), (key, values)
    accuracy = [g["synthetic_accuracy"] for g in gaps]
    assert accuracy[0] == 1.0 and accuracy[-1] < 1.0
    assert all(a >= b for a, b in pairwise(accuracy))


def test_frechet_matches_closed_form_and_scipy():
    real = np.array([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])  # mean 0, covariance 4/3 I
    synth = 2 * real + [3.0, 0.0]  # mean (3, 0), covariance 16/3 I
    # ||mu||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 for diagonal covariances: 9 + 2 (4/sqrt3 - 2/sqrt3)^2 = 35/3
    assert frechet_distance(real, synth) == pytest.approx(35 / 3, rel=1e-12)
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(60, 6)), 1.5 * rng.normal(size=(50, 6)) + 0.2
    assert frechet_distance(a, b) == pytest.approx(reference_frechet(a, b), rel=1e-9)


def test_centroid_distance_by_hand():
    theta = 0.3
    real, synth = np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[math.cos(theta), math.sin(theta)], [0.0, 5.0]])
    gap = embedding_gap(real, [0, 1], synth, [0, 1], 2)
    assert gap["centroid_distance"] == pytest.approx((1 - math.cos(theta)) / 2, rel=1e-12)
    assert gap["nearest_real_distance"] == pytest.approx((1 - math.cos(theta)) / 2, rel=1e-12)


def test_rank_deficient_frechet_is_finite():
    rng = np.random.default_rng(3)
    real, real_labels = clusters(rng, classes=2, per_class=3, dim=64)  # 6 real points in 64 dimensions
    synth, synth_labels = clusters(rng, classes=2, per_class=5, dim=64)
    gap = embedding_gap(real, real_labels, synth, synth_labels, 2)
    assert math.isfinite(gap["frechet"]) and gap["frechet"] >= 0
    a, b = rng.normal(size=(5, 32)), rng.normal(size=(7, 32))  # sqrtm still copes here: agree with it
    assert frechet_distance(a, b) == pytest.approx(reference_frechet(a, b), rel=1e-6)
    assert frechet_distance(a[:1], a[:1]) == 0.0  # one sample: zero covariance


@pytest.mark.parametrize("args, message", [
    ((np.zeros((0, 4)), [], np.ones((3, 4)), [0, 0, 0], 2), "real embeddings must be a non-empty"),
    ((np.ones((3, 4)), [0, 0], np.ones((3, 4)), [0, 0, 0], 2), "3 real embeddings but labels of shape"),
    ((np.ones((3, 4)), [0, 0, 0], np.ones((3, 5)), [0, 0, 0], 2), "dim 4, synthetic 5"),
    ((np.ones((3, 4)), [0, 0, 0], np.ones((2, 4)), [0, 2], 2), r"synthetic labels must lie in \[0, 2\)"),
    ((np.ones((3, 4)), [0, 0, 0], np.ones((2, 4)), [1, 1], 2), "no class has both real and synthetic"),
    ((np.full((3, 4), np.nan), [0, 0, 0], np.ones((2, 4)), [0, 0], 2), "NaN or infinite"),
])
def test_bad_input_is_one_line(args, message):
    with pytest.raises(FsynthError, match=message) as info:
        embedding_gap(*args)
    assert "\n" not in str(info.value)


def test_quality_file_roundtrip(tmp_path):
    path = write_quality(tmp_path / "run", {"frechet": 0.5, "encoder": "tiny-clip"})
    assert path.name == "quality.json" and not list(path.parent.glob(".*tmp"))
    assert load_quality(path) == load_quality(path.parent) == {"frechet": 0.5, "encoder": "tiny-clip"}
    with pytest.raises(FsynthError, match="cannot read synthetic-set quality"):
        load_quality(tmp_path / "missing.json")


def tiny_data(tmp_path) -> TrainData:
    """Two classes of 3 real and 3 synthetic 32x32 PNGs (a colour per class; the synthetic ones noisier)."""
    rng = np.random.default_rng(0)
    samples = {"real": [], "synthetic": []}
    for domain, noise in (("real", 10), ("synthetic", 80)):
        for label, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            for i in range(3):
                pixels = np.clip(np.array(colour) + rng.normal(0, noise, (32, 32, 3)), 0, 255).astype(np.uint8)
                path = tmp_path / f"{domain}-{label}-{i}.png"
                Image.fromarray(pixels).save(path)
                samples[domain].append(Sample(f"{domain}/{label}/{i}", label, str(path)))
    return TrainData("toy", ("red", "blue"), ("a photo of a {}.",), samples["real"], samples["synthetic"], [], [])


def test_measure_with_tiny_clip(tmp_path, one_thread):
    cfg = build_config(overrides=["model.arch=tiny-clip", "model.pretrained=", "model.head=zeroshot"])
    data = tiny_data(tmp_path)
    quality = measure_synthetic_quality(cfg, data, batch_size=4)
    assert quality["encoder"] == "tiny-clip" and quality["image_size"] == 32
    assert quality["real_images"] == quality["synthetic_images"] == 6
    assert all(math.isfinite(quality[k]) for k in (*GAPS, "synthetic_accuracy")) and quality["frechet"] > 0
    model = build_model(cfg, data)
    same = TrainData(**{**data.__dict__, "synthetic": data.real})
    zero = measure_synthetic_quality(cfg, same, model=model)
    assert zero["centroid_distance"] < 1e-6 and zero["frechet"] < 1e-6 and zero["nearest_real_distance"] < 1e-6

    # A trained model measures with its adapters off: the same gap as the fresh one, adapters back on afterwards.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    image = torch.randn(1, 3, 32, 32)
    before = model.eval().encode(image)
    grads = [p.requires_grad for p in model.parameters()]
    trained = measure_synthetic_quality(cfg, data, model=model)
    assert trained["frechet"] == pytest.approx(quality["frechet"], rel=1e-5)
    assert torch.equal(model.encode(image), before) and [p.requires_grad for p in model.parameters()] == grads


def test_head_accuracy_by_hand():
    weights = np.array([[1.0, 0.0], [0.0, 1.0]])
    embeddings = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    assert head_accuracy(embeddings, np.array([0, 1, 1]), weights) == pytest.approx(2 / 3)


def test_starting_model_accuracy_is_the_fresh_classifier_s_even_for_a_trained_one(tmp_path, one_thread):
    from fsynth.augment import build_eval_transform
    from fsynth.data.records import load_image

    cfg = build_config(overrides=["model.arch=tiny-clip", "model.pretrained=", "model.head=zeroshot"])
    data = tiny_data(tmp_path)
    model = build_model(cfg, data).eval()
    transform = build_eval_transform(model.image_size, model.mean, model.std)
    images = torch.stack([transform(load_image(s)) for s in data.synthetic])
    labels = np.array([s.label for s in data.synthetic])
    with torch.no_grad():
        fresh = model(images)
    expected = float((fresh.argmax(1).numpy() == labels).mean())
    quality = measure_synthetic_quality(cfg, data, model=model)
    assert quality["starting_model_accuracy"] == pytest.approx(expected) and quality["head"] == "zeroshot"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        adapted = model(images)
    assert not torch.allclose(adapted, fresh)
    assert measure_synthetic_quality(cfg, data, model=model)["starting_model_accuracy"] == pytest.approx(expected)
    with torch.no_grad():
        assert torch.allclose(model(images), adapted)  # the adapted model's own head is back
