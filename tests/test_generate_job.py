"""The Ray Data generation job on a local Ray: actor pools of 1 and 2, bit-identical to the direct run, resume."""

import os

import numpy as np
import pytest
from PIL import Image

from fsynth.config import build_config
from fsynth.generate_job import run_generation_job
from fsynth.generation import run_generation_direct
from fsynth.stages import ensure_fewshot
from fsynth.synthetic import load_synthetic_manifest
from tests.data.fake_roots import make_root

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TOY = ["data.shots=2", "data.val_per_class=1", "generator.images_per_class=3", "generator.batch_size=2",
       "generator.steps=2", "generator.resolution=16", "generator.finetune.epochs=2",
       "generator.finetune.batch_size=4"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    root = make_root("fashion-mnist", tmp / "data", per_class=4)
    cfg = build_config("embedded", overrides=TOY, extra={"data": {"root": str(root)}})
    fewshot = ensure_fewshot(cfg, tmp / "fewshot")
    direct = run_generation_direct(cfg, fewshot, tmp / "direct")
    return cfg, fewshot, pixels(direct)


def pixels(manifest) -> dict[str, bytes]:
    rows = load_synthetic_manifest(manifest)
    return {r.sample_id: np.asarray(Image.open(r.path)).tobytes() for r in rows.itertuples()}


@pytest.mark.parametrize("actors", [1, 2])
def test_actor_pool_makes_the_direct_run_s_images(ray_local, toy, tmp_path, actors):
    cfg, fewshot, direct = toy
    lines = []
    manifest = run_generation_job(cfg, fewshot, tmp_path, actors=actors, log=lines.append)
    assert pixels(manifest) == direct
    assert any(f"on {actors} actor(s)" in line for line in lines)
    assert any(line.startswith("30/30 images done (30 written)") for line in lines)


def test_rerun_after_interruption_makes_exactly_the_missing_images(ray_local, toy, tmp_path):
    cfg, fewshot, direct = toy
    manifest = run_generation_job(cfg, fewshot, tmp_path, actors=2, log=lambda line: None)
    rows = load_synthetic_manifest(manifest)
    gone = set(rows["path"].iloc[[0, 13, 29]])
    for path in gone:
        os.remove(path)
    truncated = rows["path"].iloc[20]
    with open(truncated, "r+b") as f:
        f.truncate(60)
    manifest.unlink()
    stamps = {p: os.stat(p).st_mtime_ns for p in rows["path"] if p not in gone and p != truncated}
    lines = []
    assert run_generation_job(cfg, fewshot, tmp_path, actors=2, log=lines.append) == manifest
    assert any("4 groups to make" in line for line in lines)
    assert any(line.startswith("6/6 images done (4 written)") for line in lines)  # whole groups (2+2+1+1), 4 files
    assert pixels(manifest) == direct
    assert all(os.stat(p).st_mtime_ns == t for p, t in stamps.items())
