"""The `sd` backend on a tiny random Stable Diffusion pipeline (32 px): loading, determinism, LoRA, fingerprints."""

import json
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fsynth.config import GeneratorConfig
from fsynth.errors import FsynthError
from fsynth.generators.sd import (
    SDGenerator,
    file_digest,
    folder_digest,
    load_lora,
    load_sd_pipeline,
)
from fsynth.generators.sd_build import build_sd_generator
from fsynth.generators.sd_random import write_random_sd

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 2


@pytest.fixture(scope="module")
def tiny(one_thread, tmp_path_factory):
    return write_random_sd(tmp_path_factory.mktemp("sd") / "tiny", "tiny")


def config(model, **kw):
    return GeneratorConfig(model=str(model), resolution=32, steps=STEPS, dtype="float32", **kw)


def rows(seeds, classes=None, prompt="a photo of a shirt"):
    classes = classes or ["T-shirt/top"] * len(seeds)
    return pd.DataFrame({"label": [0] * len(seeds), "class_name": classes, "prompt": [prompt] * len(seeds),
                         "seed": seeds})


def arrays(images):
    return np.stack([np.asarray(img) for img in images])


def save_random_lora(base, out_dir, seed):
    """A rank-4 UNet LoRA with random (non-zero) A and B, saved the way diffusers' training scripts save it."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_sd_pipeline(str(base))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                         init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return out_dir


@pytest.fixture(scope="module")
def base(tiny):
    """The generator without LoRA, and its images for rows(seeds 1, 2, 3)."""
    gen = build_sd_generator(config(tiny))
    return gen, arrays(gen.generate(rows([1, 2, 3])))


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return save_random_lora(tiny, root / "a", 1), save_random_lora(tiny, root / "b", 2)


def assert_one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_one_rgb_image_per_row(base):
    gen, _ = base
    images = gen.generate(rows([5, 6, 7]))
    assert len(images) == 3
    assert all(img.mode == "RGB" and img.size == (32, 32) for img in images)
    assert gen.generate(rows([])) == []


def test_deterministic_and_batch_independent(base):
    gen, first = base
    assert np.array_equal(arrays(gen.generate(rows([1, 2, 3]))), first)
    alone = arrays(gen.generate(rows([2])))
    assert np.array_equal(alone[0], first[1])  # exact: each row's latents come from its own CPU generator


def test_different_seeds_differ(base):
    _, first = base
    assert not np.array_equal(first[0], first[1])


def test_fingerprint_stable_across_reloads_and_sensitive_to_settings(tiny, base):
    gen, _ = base
    again = build_sd_generator(config(tiny))
    assert again.fingerprint == gen.fingerprint and len(gen.fingerprint) == 16
    variants = [dict(steps=3), dict(guidance_scale=3.0), dict(negative_prompt="blurry"), dict(resolution=40)]
    settings = dict(guidance_scale=2.0, steps=STEPS, resolution=32, negative_prompt="")
    prints = {SDGenerator(gen.pipe, gen.model_digest, **{**settings, **v}).fingerprint for v in variants}
    assert len(prints) == len(variants) and gen.fingerprint not in prints
    assert SDGenerator(gen.pipe, gen.model_digest, **settings).fingerprint == gen.fingerprint


def test_negative_prompt_changes_images(base):
    gen, first = base
    neg = SDGenerator(gen.pipe, gen.model_digest, steps=STEPS, resolution=32, negative_prompt="blurry")
    assert not np.array_equal(arrays(neg.generate(rows([1]))), first[:1])


def test_model_digest_follows_content(tiny, tmp_path):
    copy = shutil.copytree(tiny, tmp_path / "copy")
    assert folder_digest(copy) == folder_digest(tiny)
    (copy / "scheduler" / "scheduler_config.json").write_text("{}")
    assert folder_digest(copy) != folder_digest(tiny)


def test_scheduler_by_name(tiny, base):
    gen = build_sd_generator(config(tiny, scheduler="euler_a"))
    assert type(gen.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert gen.fingerprint != base[0].fingerprint
    images = arrays(gen.generate(rows([1, 2, 3])))
    assert np.array_equal(arrays(gen.generate(rows([3])))[0], images[2])  # stochastic sampler, still per-row noise


def test_unknown_scheduler_lists_the_valid_ones(tiny):
    with pytest.raises(FsynthError) as exc:
        load_sd_pipeline(str(tiny), scheduler="heun2")
    assert_one_line(exc, "heun2", "ddim", "dpm++", "unipc")


def test_float16_on_cpu_falls_back_to_float32(tiny):
    with pytest.warns(UserWarning, match="float16"):
        pipe = load_sd_pipeline(str(tiny), dtype="float16", device="cpu")
    assert pipe.unet.dtype == torch.float32
    with pytest.raises(FsynthError) as exc:
        load_sd_pipeline(str(tiny), dtype="float64")
    assert_one_line(exc, "float64", "bfloat16")


@pytest.mark.parametrize("model", ["/no/such/pipeline", "./nope", "a/b/c"])
def test_missing_local_path(model):
    with pytest.raises(FsynthError) as exc:
        load_sd_pipeline(model)
    assert_one_line(exc, model, "does not exist")


def test_uncached_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    import diffusers  # noqa: F401 - its import time is not the hub's
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(FsynthError) as exc:
        load_sd_pipeline("fsynth-test/not-cached")
    assert time.monotonic() - start < 10
    assert_one_line(exc, "fsynth-test/not-cached", "cache", "offline", "hf download")


def test_cached_hub_id_loads_from_the_snapshot(tiny, base, tmp_path, monkeypatch):
    """A hub id in the cache loads offline, and its fingerprint digests the snapshot like a local folder."""
    import huggingface_hub.constants

    revision = "0" * 40
    repo = tmp_path / "models--fsynth-test--tiny-sd"
    shutil.copytree(tiny, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    gen = build_sd_generator(config("fsynth-test/tiny-sd"))
    assert gen.fingerprint == base[0].fingerprint


def test_lora_changes_images_and_scale_zero_restores_them(tiny, base, loras):
    _, first = base
    folder, _ = loras
    with_lora = build_sd_generator(config(tiny, lora_scale=1.0), lora_path=str(folder))
    assert not np.array_equal(arrays(with_lora.generate(rows([1, 2, 3]))), first)
    zero = build_sd_generator(config(tiny, lora_scale=0.0, lora_path=str(folder / "pytorch_lora_weights.safetensors")))
    assert np.array_equal(arrays(zero.generate(rows([1, 2, 3]))), first)
    assert len({base[0].fingerprint, with_lora.fingerprint, zero.fingerprint}) == 3


def test_per_class_lora_uses_each_rows_class(tiny, loras, tmp_path):
    a, b = loras
    root = tmp_path / "finetuned"
    shutil.copytree(a, root / "T-shirt-top")
    shutil.copytree(b, root / "Trouser")
    (root / "finetune.json").write_text(json.dumps({"scope": "per_class"}))
    per_class = build_sd_generator(config(tiny), lora_path=str(root))
    mixed = arrays(per_class.generate(rows([1, 2, 3], ["T-shirt/top", "Trouser", "T-shirt/top"])))
    only_a = arrays(build_sd_generator(config(tiny), lora_path=str(a)).generate(rows([1, 3])))
    assert np.array_equal(mixed[[0, 2]], only_a)
    only_b = arrays(per_class.generate(rows([2], ["Trouser"])))
    assert np.array_equal(mixed[1:2], only_b)
    with pytest.raises(FsynthError) as exc:
        per_class.generate(rows([1], ["Bag"]))
    assert_one_line(exc, "Bag", "fine-tune")


def test_mismatched_lora_files_fail(tiny, loras, tmp_path):
    from safetensors.torch import load_file, save_file

    good = load_file(loras[0] / "pytorch_lora_weights.safetensors")
    bad = {
        "not_lora": load_file(tiny / "unet" / "diffusion_pytorch_model.safetensors"),
        "partial": {k.replace("unet.up_blocks", "unet.other_blocks"): v for k, v in good.items()},
        "no_match": {k.replace("unet.", "unet.elsewhere."): v for k, v in good.items()},
        "shapes": {k: torch.zeros(v.shape[0], v.shape[1] + 8) if "to_k.lora_A" in k else v for k, v in good.items()},
    }
    pipe = load_sd_pipeline(str(tiny))
    for name, tensors in bad.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        with pytest.raises(FsynthError) as exc:
            load_lora(pipe, path, name)
        assert_one_line(exc, str(path), "trained for this base model")
        if name == "shapes":
            assert "size mismatch" in str(exc.value)
    load_lora(pipe, loras[0] / "pytorch_lora_weights.safetensors", "good")  # the failures left the pipeline usable
    with pytest.raises(FsynthError) as exc:
        load_lora(pipe, loras[1] / "pytorch_lora_weights.safetensors", "good")
    assert_one_line(exc, "already holds")
    assert file_digest(path) != file_digest(loras[0] / "pytorch_lora_weights.safetensors")


def test_bad_lora_paths(tiny, tmp_path):
    with pytest.raises(FsynthError) as exc:
        build_sd_generator(config(tiny), lora_path=str(tmp_path / "missing"))
    assert_one_line(exc, "does not exist")
    with pytest.raises(FsynthError) as exc:
        build_sd_generator(config(tiny), lora_path=str(tmp_path))
    assert_one_line(exc, "pytorch_lora_weights.safetensors")


# ---------------------------------------------------------------------------------------------- image-to-image
def toy_shots():
    """Two 40x48 RGB shots (cropped and resized to 32 px by the backend): a half-white frame and random pixels."""
    half = np.zeros((40, 48, 3), np.uint8)
    half[:, :24] = 255
    noise = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    return {"s/a": Image.fromarray(half), "s/b": Image.fromarray(noise)}


IMG2IMG_STEPS = 4  # strength resolves to 1 / steps: int(steps x strength) steps from the grid's timesteps


def img2img(tiny, strength, lora_path=None):
    from fsynth.generators import SourceShots

    cfg = GeneratorConfig(model=str(tiny), resolution=32, steps=IMG2IMG_STEPS, dtype="float32",
                          negative_prompt="blurry")
    return build_sd_generator(cfg, lora_path=lora_path, sources=SourceShots(toy_shots(), strength, "toy"))


def source_rows(seeds, sources=("s/a", "s/b")):
    return rows(seeds).assign(source_id=list(sources))


def test_img2img_is_seeded_and_follows_strength_and_source(tiny):
    gen = img2img(tiny, 0.5)
    first = arrays(gen.generate(source_rows([1, 2])))
    assert np.array_equal(first, arrays(gen.generate(source_rows([1, 2]))))
    alone = arrays(gen.generate(source_rows([2], ["s/b"])))
    assert np.abs(first[1:].astype(int) - alone).max() <= 2  # batch-independent up to rounding in batched kernels
    assert not np.array_equal(first, arrays(gen.generate(source_rows([3, 4]))))
    assert not np.array_equal(first, arrays(gen.generate(source_rows([1, 2], ["s/b", "s/a"]))))
    stronger = img2img(tiny, 0.9)
    assert not np.array_equal(first, arrays(stronger.generate(source_rows([1, 2]))))
    assert len({gen.fingerprint, stronger.fingerprint, build_sd_generator(config(tiny)).fingerprint}) == 3


def test_img2img_at_small_strength_stays_near_the_shot_s_latent(tiny):
    """The random VAE scrambles pixels, so closeness is measured where the denoising happens: in latent space."""
    from fsynth.generators.sd_img2img import source_images

    gen = img2img(tiny, 0.5)
    shots = source_images(list(toy_shots().values()), 32)
    x = torch.from_numpy(np.stack([np.asarray(s) for s in shots])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = gen.pipe.vae.encode(x).latent_dist.mean * gen.pipe.vae.config.scaling_factor
    args = {**gen._common(source_rows([1, 2])), "output_type": "latent"}
    dist = {s: (gen.img2img(image=shots, strength=s, **args).images - z).abs().mean().item() for s in (0.5, 1.0)}
    assert dist[0.5] < 0.7 * dist[1.0], dist


def test_img2img_at_strength_one_is_text_to_image_and_keeps_the_lora(tiny, loras):
    gen = img2img(tiny, 1.0)
    plain = SDGenerator(gen.pipe, gen.model_digest, steps=IMG2IMG_STEPS, resolution=32, negative_prompt="blurry")
    assert np.array_equal(arrays(gen.generate(source_rows([1, 2]))), arrays(plain.generate(rows([1, 2]))))
    with_lora = img2img(tiny, 0.5, lora_path=str(loras[0]))
    assert not np.array_equal(arrays(with_lora.generate(source_rows([1, 2]))),
                              arrays(img2img(tiny, 0.5).generate(source_rows([1, 2]))))
    with pytest.raises(FsynthError, match="leaves no denoising step"):
        img2img(tiny, 0.2)  # int(4 steps x 0.2) = 0
