"""The Ray Data generation job on a local Ray: actor pools of 1 and 2 make the direct run's images, bit for bit."""

import os

import numpy as np
import pytest
from PIL import Image

from fsynth.config import build_config
from fsynth.data.fewshot import folder_name
from fsynth.generation import run_generation_direct
from fsynth.generators.sd_random import write_random_sd
from fsynth.jobs.generation import run_generation_job
from fsynth.stages import ensure_fewshot
from fsynth.synthetic import load_synthetic_manifest
from tests.data.fake_roots import make_root

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TOY = ["data.shots=2", "data.val_per_class=1", "generator.images_per_class=3", "generator.batch_size=2",
       "generator.steps=2", "generator.resolution=16", "generator.finetune.epochs=2",
       "generator.finetune.batch_size=4", "resources.cpus_per_generator_actor=1"]


def tiny_sd_overrides(model_dir) -> list[str]:
    """The `sd` backend on a random 32 px pipeline: the real loading and sampling code at toy cost."""
    return ["generator.backend=sd", f"generator.model={model_dir}", "generator.dtype=float32",
            "generator.resolution=32", "generator.guidance_scale=2.0", "generator.finetune.enabled=false",
            "generator.negative_prompt=blurry"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    root = make_root("fashion-mnist", tmp / "data", per_class=4)
    return tmp, root, write_random_sd(tmp / "tiny-sd", "tiny")


@pytest.fixture(scope="module")
def toy(data):
    """(config, few-shot folder, {sample id: pixels} of the direct run) for the tiny sd pipeline.

    The ddpm backend goes through the same job in tests/test_generate.py (the CLI, one actor).
    """
    tmp, root, tiny_sd = data
    cfg = build_config("embedded", overrides=[*TOY, *tiny_sd_overrides(tiny_sd)], extra={"data": {"root": str(root)}})
    fewshot = ensure_fewshot(cfg, tmp / "fewshot")
    return cfg, fewshot, pixels(run_generation_direct(cfg, fewshot, tmp / "direct"))


def pixels(manifest) -> dict[str, bytes]:
    rows = load_synthetic_manifest(manifest)
    return {r.sample_id: np.asarray(Image.open(r.path)).tobytes() for r in rows.itertuples()}


def test_actor_pool_makes_the_direct_run_s_images(ray_local, toy, tmp_path, actors=2):
    """Two actors share the groups and make the direct run's pixels (one actor: the image-to-image test below)."""
    cfg, fewshot, direct = toy
    lines = []
    manifest = run_generation_job(cfg, fewshot, tmp_path, actors=actors, log=lines.append)
    assert pixels(manifest) == direct
    assert any(f"on {actors} actor(s)" in line for line in lines)
    assert any(line.startswith("30/30 images done (30 written)") for line in lines)


def test_img2img_on_the_actor_pool_makes_the_direct_run_s_images(ray_local, data, toy, tmp_path):
    """The sd backend from the shots: the actors find the source shots themselves; a rerun makes only what is gone."""
    tmp, root, tiny_sd = data
    cfg = build_config("embedded", overrides=[*TOY, *tiny_sd_overrides(tiny_sd), "generator.init_from=shots",
                                              "generator.strength=0.5"], extra={"data": {"root": str(root)}})
    fewshot = toy[1]
    direct = run_generation_direct(cfg, fewshot, tmp_path / "direct")
    manifest = run_generation_job(cfg, fewshot, tmp_path / "job", actors=1, log=lambda line: None)
    assert pixels(manifest) == pixels(direct) and pixels(manifest).keys().isdisjoint(toy[2])
    rows = load_synthetic_manifest(manifest)
    assert rows["source_id"].str.startswith("fashion-mnist/").all() and rows["source_id"].nunique() == 20
    gone = rows["path"].iloc[4]
    os.remove(gone)
    lines = []
    run_generation_job(cfg, fewshot, tmp_path / "job", actors=1, log=lines.append)
    assert pixels(manifest) == pixels(direct) and any("1 groups to make" in line for line in lines)


def test_per_class_lora_fine_tuning_runs_as_parallel_tasks_then_generates(ray_local, data, tmp_path):
    tmp, _, tiny_sd = data
    root = make_root("folder", tmp_path / "data", per_class=4)
    overrides = [*TOY, *tiny_sd_overrides(tiny_sd), "generator.finetune.enabled=true", "data.dataset=folder",
                 "generator.finetune.scope=per_class", "generator.finetune.lora_rank=2", "generator.finetune.epochs=2",
                 "generator.finetune.batch_size=2", "generator.finetune.warmup_steps=1"]
    cfg = build_config("embedded", overrides=overrides, extra={"data": {"root": str(root)}})
    fewshot = ensure_fewshot(cfg, tmp_path / "fewshot")
    manifest = run_generation_job(cfg, fewshot, tmp_path / "synthetic", actors=2, log=lambda line: None)
    loras = list((tmp_path / "synthetic" / "generators").glob("folder-lora-*"))
    assert len(loras) == 1
    rows = load_synthetic_manifest(manifest)
    assert len(rows) == 9 and rows["class_name"].nunique() == 3
    assert sorted(p.parent.name for p in loras[0].glob("*/pytorch_lora_weights.safetensors")) == sorted(
        folder_name(c) for c in rows["class_name"].unique())
    base = build_config("embedded", overrides=[*overrides[:-5], "generator.finetune.enabled=false"],
                        extra={"data": {"root": str(root)}})
    plain = load_synthetic_manifest(run_generation_direct(base, fewshot, tmp_path / "plain"))
    assert set(plain["generator"]) != set(rows["generator"])  # the LoRA is part of the generator's identity
    assert pixels(run_generation_direct(cfg, fewshot, tmp_path / "synthetic")) == pixels(manifest)


def test_an_actor_pool_that_cannot_fit_is_a_one_line_error(ray_local):
    from fsynth.errors import ConfigError
    from fsynth.jobs.generation import check_cluster_fits

    check_cluster_fits(build_config("embedded", overrides=["resources.cpus_per_generator_actor=1"]), 2)
    cases = [(build_config("lightweight"), 1, "need 1 GPUs but the Ray cluster has 0"),
             (build_config("embedded"), 2, "2 generator actor\\(s\\) x 2 CPU need 4 CPUs")]
    for cfg, actors, expected in cases:
        with pytest.raises(ConfigError, match=expected) as err:
            check_cluster_fits(cfg, actors)
        assert "\n" not in str(err.value)


def test_a_task_s_error_reaches_the_caller_as_its_one_line(ray_local, data, tmp_path):
    from fsynth.errors import FsynthError

    tmp, root, _ = data
    cfg = build_config("embedded", overrides=[*TOY, *tiny_sd_overrides(tmp_path / "no-such-model")],
                       extra={"data": {"root": str(root)}})
    with pytest.raises(FsynthError, match="does not exist") as err:
        run_generation_job(cfg, ensure_fewshot(cfg, tmp / "fewshot"), tmp_path, actors=1, log=lambda line: None)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
