"""The one training loop on a tiny separable toy set: it learns, is deterministic, resumes, runs every baseline."""

import math

import numpy as np
import pytest
from PIL import Image

from fsynth.baselines import BASELINES, apply_baseline
from fsynth.config import build_config
from fsynth.data.records import Sample
from fsynth.loop import fit
from fsynth.stages import build_model, build_regions
from fsynth.trainset import TrainData

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]


def toy_images(folder, prefix, per_class, noise, seed):
    """Colour squares per class; `noise` makes the synthetic ones visibly worse."""
    rng = np.random.default_rng(seed)
    samples = []
    for label, colour in enumerate(COLOURS):
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, noise, (24, 24, 3)), 0, 255).astype(np.uint8)
            path = folder / f"{prefix}_{label}_{i}.png"
            Image.fromarray(pixels).save(path)
            samples.append(Sample(f"{prefix}/{label}/{i}", label, str(path)))
    return samples


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    return TrainData("folder", ("red", "green", "blue"), ("a photo of a {}.",),
                     real=toy_images(folder, "real", 4, 30, 0), synthetic=toy_images(folder, "synth", 8, 60, 1),
                     val=toy_images(folder, "val", 6, 30, 2), test=toy_images(folder, "test", 6, 30, 3))


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
