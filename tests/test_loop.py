"""The one training loop on a tiny separable toy set: it learns, is deterministic, resumes, runs every baseline."""

import math

import numpy as np
import pytest
from PIL import Image

from fsynth.baselines import BASELINES, apply_baseline
from fsynth.config import build_config
from fsynth.data.records import Sample
from fsynth.loop import LoopHooks, fit
from fsynth.stages import build_model, build_regions
from fsynth.trainset import TrainData

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]


def toy_images(folder, prefix, per_class, noise, seed, write=True):
    """Colour squares per class; `noise` makes the synthetic ones visibly worse (write=False: only the samples)."""
    rng = np.random.default_rng(seed)
    samples = []
    for label, colour in enumerate(COLOURS):
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, noise, (24, 24, 3)), 0, 255).astype(np.uint8)
            path = folder / f"{prefix}_{label}_{i}.png"
            if write:
                Image.fromarray(pixels).save(path)
            samples.append(Sample(f"{prefix}/{label}/{i}", label, str(path)))
    return samples


def toy_data(folder, write=True) -> TrainData:
    parts = (("real", 4, 30, 0), ("synth", 8, 60, 1), ("val", 6, 30, 2), ("test", 6, 30, 3))
    images = {name: toy_images(folder, name, n, noise, seed, write) for name, n, noise, seed in parts}
    return TrainData("folder", ("red", "green", "blue"), ("a photo of a {}.",), real=images["real"],
                     synthetic=images["synth"], val=images["val"], test=images["test"])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_data(tmp_path_factory.mktemp("toy"))


def toy_config(*overrides):
    return build_config(overrides=[
        "model.arch=tiny-clip", "model.pretrained=", "model.head=zeroshot", "model.image_size=32",
        "model.lora.rank=4", "model.lora.alpha=8", "model.lora.dropout=0.0",
        "training.epochs=4", "training.batch_size=12", "training.lr=3e-3", "training.weight_decay=0.0",
        "training.mixed_precision=false", "training.augment=none", "training.mix_prob=0.0",
        "partition.mode=static", "partition.cluster_multiple=1", "partition.iterations=10",
        "loss.preset=paper", "loss.lambda_discrepancy=0.1", "loss.lambda_robustness=0.1", *overrides])


def run(cfg, data, workdir, **kwargs):
    reports = []
    model = build_model(cfg, data)
    regions = build_regions(cfg, data, model, workdir / "cache")
    result = fit(cfg, data, model, lambda m, c: reports.append((m, c)), workdir=workdir, regions=regions, **kwargs)
    return result, reports


@pytest.mark.slow
def test_fit_learns_reports_every_epoch_and_tests_once(toy, tmp_path):
    result, reports = run(toy_config("training.epochs=6"), toy, tmp_path)
    assert len(reports) == 7 and "test/accuracy" in reports[-1][0]
    assert sum("test/accuracy" in m for m, _ in reports) == 1
    epochs = [m for m, _ in reports[:-1]]
    for key in ("train/ce_real", "train/ce_synth", "train/discrepancy", "train/robustness", "train/accuracy",
                "val/accuracy", "measured/discrepancy", "measured/robustness", "lr"):
        assert all(math.isfinite(m[key]) for m in epochs), key
    assert epochs[-1]["lr"] < epochs[0]["lr"]  # per-step cosine decay
    assert result.test.accuracy >= 0.9, result.history  # chance is 1/3
    assert result.val.accuracy == max(m["val/accuracy"] for m in epochs)  # best-on-validation model is tested
    assert all(c is not None for _, c in reports)


@pytest.mark.slow
def test_deterministic_and_resume_gives_the_same_result(toy, tmp_path):
    cfg = toy_config("training.augment=datadream", "training.mix_prob=0.5", "model.lora.dropout=0.1")
    first, reports = run(cfg, toy, tmp_path / "a")
    again, _ = run(cfg, toy, tmp_path / "b")
    assert again.history == first.history and again.test.accuracy == first.test.accuracy
    midway = reports[1][1]  # checkpoint after epoch 1
    resumed, resumed_reports = run(cfg, toy, tmp_path / "c", resume_from=midway)
    assert [m["epoch"] for m, _ in resumed_reports[:-1]] == [2, 3]
    # Same batches, augmentations and optimiser state: equal up to float32 rounding of the restored state.
    assert len(resumed.history) == len(first.history)
    for got, want in zip(resumed.history, first.history, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert resumed.test.accuracy == first.test.accuracy and resumed.best_epoch == first.best_epoch


@pytest.mark.slow
@pytest.mark.parametrize("baseline", list(BASELINES))
def test_every_baseline_runs_through_the_same_loop(toy, tmp_path, baseline):
    cfg = apply_baseline(toy_config("training.epochs=2"), baseline)
    result, reports = run(cfg, toy, tmp_path)
    assert math.isfinite(result.test.accuracy)
    trained = [m for m, _ in reports if "train/loss" in m]
    if baseline == "zero-shot":
        assert not trained and len(reports) == 1
    if baseline == "real-only":
        assert all(m["train/ce_synth"] == 0 and m["train/discrepancy"] == 0 for m in trained)
    if baseline == "synthetic-only":
        assert all(m["train/ce_real"] == 0 for m in trained)
    if baseline == "real-synthetic-ce":
        assert all(m["train/ce_synth"] > 0 for m in trained)


@pytest.mark.slow
def test_online_partition_and_protoaug(toy, tmp_path):
    cfg = toy_config("partition.mode=online", "partition.cluster_multiple=2", "loss.preset=protoaug")
    result, reports = run(cfg, toy, tmp_path)
    assert math.isfinite(result.test.accuracy)
    assert any(m.get("train/robustness", 0) > 0 for m, _ in reports)


def test_sweep_trial_never_evaluates_the_test_set(toy, tmp_path):
    """training.evaluate_test=false (Tune trials): the final report has the best validation model, no test."""
    class NoTest(list):  # the test set itself must not be read: any access fails the run
        def __iter__(self):
            raise AssertionError("the test set was read")

        def __getitem__(self, i):
            raise AssertionError("the test set was read")

    data = TrainData(toy.dataset, toy.classnames, toy.templates, toy.real, toy.synthetic, toy.val,
                     NoTest(toy.test))
    result, reports = run(toy_config("training.epochs=1", "training.evaluate_test=false"), data, tmp_path)
    final = reports[-1][0]
    assert "best/val_accuracy" in final and not any(k.startswith("test/") for k in final)
    assert result.test is None and result.val is not None
    assert not (tmp_path / "final" / "confusion_test.csv").exists()
    assert (tmp_path / "final" / "adapters.safetensors").exists()


# ------------------------------------------------------------------------------------ prediction-space regions


def _recording(monkeypatch):
    """Record the logits and regions of every batch the loss sees (the real compute_loss still runs)."""
    import fsynth.loop as loop

    seen, real_loss = [], loop.compute_loss

    def record(cfg, data, logits, targets, synthetic, regions, lambdas=None):
        if lambdas is None:  # a training batch (measure_regularisers passes its own λ = 1)
            seen.append((logits.detach().clone(), synthetic.clone(), regions.clone()))
        return real_loss(cfg, data, logits, targets, synthetic, regions, lambdas)

    monkeypatch.setattr(loop, "compute_loss", record)
    return seen


def _centroids(checkpoint):
    from safetensors.torch import load_file

    return load_file(f"{checkpoint}/partitioner.safetensors")["centroids"]


def _starting_centroids(cfg, data):
    """What the loop must fit before epoch 0: k-means over the starting model's outputs of real ∪ synthetic."""
    import torch

    from fsynth.augment import build_eval_transform
    from fsynth.batch_regions import dataset_features, fit_centroids
    from fsynth.trainset import ImageSet, make_loader

    model = build_model(cfg, data)
    samples = data.real + data.synthetic
    plain = ImageSet(samples, np.zeros(len(samples), dtype=bool), np.zeros(len(samples), dtype=np.int64),
                     build_eval_transform(model.image_size, model.mean, model.std))
    feats = dataset_features(cfg, model, make_loader(plain, 64, shuffle=False, seed=0, workers=0), torch.device("cpu"))
    return fit_centroids(cfg, feats, data.num_classes, lambda t: t).centroids


@pytest.mark.slow
def test_outputs_regions_are_fitted_on_the_starting_model_and_assigned_per_batch(toy, tmp_path, monkeypatch):
    import torch

    from fsynth.batch_regions import output_features

    cfg = toy_config("partition.features=outputs", "partition.cluster_multiple=2", "training.epochs=2")
    seen = _recording(monkeypatch)
    result, reports = run(cfg, toy, tmp_path)
    assert math.isfinite(result.test.accuracy)
    centroids = _centroids(reports[0][1])
    assert centroids.shape == (6, 3)  # K = 2 x 3 classes, in the 3-dim prediction space (probabilities: paper)
    torch.testing.assert_close(centroids, _starting_centroids(cfg, toy))
    assert torch.equal(_centroids(reports[1][1]), centroids)  # refit_every = 0: fixed for the run
    for logits, _, regions in seen:  # Algorithm 1, line 7: nearest centroid of each batch's current outputs
        assert torch.equal(regions, torch.cdist(output_features(cfg, logits), centroids).argmin(1))
    epochs = [m for m, _ in reports[:-1]]
    for m in epochs:  # the mixing figures, as the loss saw them
        assert 0 <= m["mixing/batch_synthetic_in_t"] <= m["mixing/synthetic_in_mixed"] <= 1
        assert 1 <= m["mixing/regions_mixed"] <= m["mixing/regions_used"] <= 6
    batches = [(s, r) for _, s, r in seen[: len(seen) // 2]]  # epoch 0's batches
    hits = sum(int((s & torch.isin(r, r[~s])).sum()) for s, r in batches)
    assert epochs[0]["mixing/batch_synthetic_in_t"] == pytest.approx(hits / sum(int(s.sum()) for s, _ in batches))
    assert any(m["train/robustness"] > 0 for m in epochs)  # the regularisers act on synthetic samples


@pytest.mark.slow
def test_outputs_regions_refit_and_resume_replays_them(toy, tmp_path):
    import torch

    cfg = toy_config("partition.features=outputs", "partition.cluster_multiple=2", "partition.refit_every=1",
                     "loss.preset=protoaug", "training.augment=datadream", "model.lora.dropout=0.1")
    first, reports = run(cfg, toy, tmp_path / "a")
    per_epoch = [_centroids(c) for _, c in reports[:-1]]
    assert not torch.equal(per_epoch[0], per_epoch[1])  # refitted after every epoch with the model being trained
    assert per_epoch[0].abs().max() > 1.5  # logits, not probabilities, for the protoaug preset
    resumed, resumed_reports = run(cfg, toy, tmp_path / "b", resume_from=reports[1][1])
    assert [m["epoch"] for m, _ in resumed_reports[:-1]] == [2, 3]
    for got, want in zip(resumed.history, first.history, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(_centroids(resumed_reports[-2][1]), per_epoch[-1])
    assert resumed.test.accuracy == first.test.accuracy


@pytest.mark.slow
def test_online_regions_in_the_prediction_space(toy, tmp_path):
    cfg = toy_config("partition.mode=online", "partition.features=outputs", "partition.cluster_multiple=2",
                     "training.epochs=2")
    result, reports = run(cfg, toy, tmp_path)
    assert math.isfinite(result.test.accuracy)
    assert _centroids(reports[0][1]).shape == (6, 3)  # MacQueen centroids over the outputs
    assert all("mixing/batch_synthetic_in_t" in m for m, _ in reports[:-1])


def test_regions_that_separate_real_from_synthetic_warn_once(toy, tmp_path):
    """Regions holding no real and synthetic sample together leave the regularisers nothing: one warning line."""
    cfg = toy_config("training.epochs=2", "training.measure_regularisers=false")
    lines, reports = [], []
    synthetic_ids = {s.id for s in toy.synthetic}
    split = lambda ids: np.array([int(i in synthetic_ids) for i in ids], dtype=np.int64)  # noqa: E731
    fit(cfg, toy, build_model(cfg, toy), lambda m, c: reports.append(m), workdir=tmp_path, regions=split,
        hooks=LoopHooks(log=lines.append))
    assert [m["mixing/batch_synthetic_in_t"] for m in reports[:-1]] == [0.0, 0.0]
    assert [m["mixing/regions_mixed"] for m in reports[:-1]] == [0.0, 0.0]
    assert all(m["train/discrepancy"] == 0 and m["train/robustness"] == 0 for m in reports[:-1])
    assert len(lines) == 1 and lines[0].startswith("warning: epoch 0: the regularisers saw no synthetic sample")
    assert "partition.features=outputs" in lines[0]
