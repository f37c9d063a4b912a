"""DataDream LoRA fine-tuning on a tiny random Stable Diffusion pipeline (32 px): training, saving, the cache."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fsynth.config import GeneratorConfig, GeneratorFinetuneConfig
from fsynth.data.fewshot import MANIFEST_COLUMNS, folder_name
from fsynth.errors import FsynthError
from fsynth.generators.sd import load_sd_pipeline
from fsynth.generators.sd_finetune import (
    INFO_FILE,
    WEIGHTS_FILE,
    ensure_sd_lora,
    finetune_one_class,
    finetune_sd_lora,
    plan_sd_lora,
    save_sd_lora,
)
from fsynth.generators.sd_random import write_random_sd

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ("bar", "box/frame")  # '/' exercises folder_name
TRAIN = {"rank": 4, "lr": 1e-2, "weight_decay": 1e-2, "warmup_steps": 2, "batch_size": 2, "resolution": 32}


def toy_images() -> tuple[list[Image.Image], list[str]]:
    """Two classes of 32x32 RGB images, 3 each: a red vertical bar (shifting) and a blue square (shifting)."""
    images, names = [], []
    for label, name in enumerate(CLASSES):
        for s in range(3):
            a = np.zeros((32, 32, 3), np.uint8)
            if label == 0:
                a[4:28, 8 + 4 * s : 14 + 4 * s, 0] = 255
            else:
                a[6 + 2 * s : 22 + 2 * s, 6:22, 2] = 255
            images.append(Image.fromarray(a))
            names.append(name)
    return images, names


def prompts(names):
    return [f"a photo of a {n}" for n in names]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_random_sd(tmp_path_factory.mktemp("sd") / "tiny", "tiny")


@pytest.fixture(scope="module")
def trained(tiny):
    """A pipeline trained in place for 42 steps (14 epochs of 3 batches), its base weights before, the losses."""
    pipe = load_sd_pipeline(str(tiny))
    before = {f"{k}.{n}": p.detach().clone() for k in ("unet", "text_encoder", "vae")
              for n, p in getattr(pipe, k).named_parameters()}
    images, names = toy_images()
    losses = []
    result = finetune_sd_lora(pipe, images, prompts(names), epochs=14, seed=0, **TRAIN,
                              progress=lambda step, loss: losses.append((step, loss)))
    return pipe, before, result, losses


def image(pipe, seed=3):
    out = pipe("a photo of a bar", num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


def test_loss_goes_down(trained):
    _, _, result, losses = trained
    assert [s for s, _ in losses] == list(range(1, 43)) and result.steps == 42
    assert result.history == [v for _, v in losses]
    first, last = np.mean(result.history[:8]), np.mean(result.history[-8:])
    assert last < 0.9 * first, (first, last)  # measured ~1.17 -> ~0.96


def test_base_weights_unchanged_and_lora_trained(trained):
    pipe, before, result, _ = trained
    for name, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder), ("vae", pipe.vae)):
        for n, p in model.named_parameters():
            if "lora_" not in n:
                assert torch.equal(p, before[f"{name}.{n.replace('.base_layer', '')}"]), n
    # 4 projections x (down 1 + mid 1 + up 2 transformer blocks) x (self + cross attention) x (up, down) in the UNet;
    # 4 projections x 2 layers x (up, down) in the text encoder
    assert result.rank == 4 and len(result.unet) == 4 * 4 * 2 * 2 and len(result.text_encoder) == 4 * 2 * 2
    ups = [v for k, v in result.unet.items() if k.endswith("lora.up.weight")]
    assert all(v.dtype == torch.float32 for v in result.unet.values())
    assert any(v.abs().max() > 0 for v in ups)  # B starts at zero: training moved it


def test_seeded_deterministic_and_global_rng_untouched(tiny):
    images, names = toy_images()
    kwargs = {**TRAIN, "epochs": 1, "batch_size": 3}
    state = torch.get_rng_state()
    a = finetune_sd_lora(tiny, images[:3], prompts(names[:3]), seed=5, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    b = finetune_sd_lora(tiny, images[:3], prompts(names[:3]), seed=5, **kwargs)
    c = finetune_sd_lora(tiny, images[:3], prompts(names[:3]), seed=6, **kwargs)
    assert a.history == b.history and a.unet.keys() == b.unet.keys()
    assert all(torch.equal(a.unet[k], b.unet[k]) for k in a.unet)
    assert all(torch.equal(a.text_encoder[k], b.text_encoder[k]) for k in a.text_encoder)
    assert any(not torch.equal(a.unet[k], c.unet[k]) for k in a.unet)


def test_a_step_budget_replaces_the_epochs(tiny):
    images, names = toy_images()
    kwargs = {**TRAIN, "batch_size": 2, "seed": 5}  # 3 shots: 2 batches an epoch
    budget = finetune_sd_lora(tiny, images[:3], prompts(names[:3]), epochs=1, steps=3, **kwargs)
    assert budget.steps == 3 == len(budget.history)  # one epoch and the first batch of the next
    same = finetune_sd_lora(tiny, images[:3], prompts(names[:3]), epochs=7, steps=2, **kwargs)
    epochs = finetune_sd_lora(tiny, images[:3], prompts(names[:3]), epochs=1, **kwargs)
    assert same.history == epochs.history  # equal step counts, equal runs


def test_saved_lora_loads_back_and_changes_the_image(tiny, trained, tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    trained_pipe, _, result, _ = trained
    path = save_sd_lora(result, tmp_path)
    assert path == tmp_path.resolve() / WEIGHTS_FILE and sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_FILE]
    pipe = load_sd_pipeline(str(tiny))
    plain = image(pipe)
    pipe.load_lora_weights(tmp_path, adapter_name="dd")
    tuned = image(pipe)
    assert np.abs(tuned - plain).max() > 1e-3
    np.testing.assert_allclose(tuned, image(trained_pipe), atol=1e-5)  # scale 1, as trained
    for model, saved in ((pipe.unet, result.unet), (pipe.text_encoder, result.text_encoder)):
        loaded = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name="dd"))
        assert loaded.keys() == saved.keys()
        assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def fewshot_manifest(tmp_path):
    """A real manifest: the toy images as 2 classes x 3 PNG shots (split train) and one val row."""
    rows = []
    images, names = toy_images()
    for i, (img, name) in enumerate(zip(images, names, strict=True)):
        path = tmp_path / "real" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        img.save(path)
        rows.append((f"toy/{i}.png", str(path), -1, CLASSES.index(name), name, "real", "train", 1))
    rows.append(("toy/val.png", str(path), -1, 0, CLASSES[0], "real", "val", 1))
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).to_parquet(manifest)
    return manifest


def gcfg(tiny, **finetune):
    ft = {"enabled": True, "lora_rank": 4, "lr": 1e-3, "warmup_steps": 0, "batch_size": 6, "epochs": 1, **finetune}
    return GeneratorConfig(model=str(tiny), resolution=32, finetune=GeneratorFinetuneConfig(**ft))


def test_ensure_per_dataset_layout_reuse_and_address(tiny, tmp_path):
    manifest, out, logs = fewshot_manifest(tmp_path), tmp_path / "loras", []
    cfg = gcfg(tiny)
    first = ensure_sd_lora(str(tiny), manifest, cfg, out, dataset="toy", domain="", device="cpu", log=logs.append)
    assert first.parent == out.resolve() and first.name.startswith("toy-lora-") and len(first.name) == 25
    assert sorted(p.name for p in out.iterdir()) == [".locks", first.name]  # no staging folder left behind
    info = json.loads((first / INFO_FILE).read_text())
    assert info["format"] == "fsynth-sd-lora/1" and info["scope"] == "per_dataset"
    assert info["classes"] == list(CLASSES) and info["resolution"] == 32 and info["finetune"]["epochs"] == 1
    assert info["base_model"] == str(tiny) and len(info["base_digest"]) == 16 and len(info["shots_digest"]) == 16
    assert list(info["losses"]) == ["all"] and len(info["losses"]["all"]) == 2
    mtime = (first / WEIGHTS_FILE).stat().st_mtime_ns
    again = ensure_sd_lora(str(tiny), manifest, cfg, out, dataset="toy", domain="", device="cpu", log=logs.append)
    assert again == first and (first / WEIGHTS_FILE).stat().st_mtime_ns == mtime
    assert any("reusing" in line for line in logs) and sum("trained" in line for line in logs) == 1
    plan = plan_sd_lora(str(tiny), manifest, gcfg(tiny, epochs=2), out, dataset="toy", domain="")
    assert plan.final != first and plan_sd_lora(str(tiny), manifest, cfg, out, dataset="toy", domain="").final == first
    # a step budget is part of the address and makes the epochs irrelevant to it
    budget = plan_sd_lora(str(tiny), manifest, gcfg(tiny, steps=5), out, dataset="toy", domain="").final
    assert budget != first
    same_budget = plan_sd_lora(str(tiny), manifest, gcfg(tiny, steps=5, epochs=9), out, dataset="toy", domain="")
    assert same_budget.final == budget


def test_ensure_per_class_resumes_a_finished_class(tiny, tmp_path):
    manifest, out, logs = fewshot_manifest(tmp_path), tmp_path / "loras", []
    cfg = gcfg(tiny, scope="per_class", batch_size=3)
    plan = plan_sd_lora(str(tiny), manifest, cfg, out, dataset="toy", domain="", device="cpu")
    done = finetune_one_class(plan, CLASSES[1])  # as a remote task would, before the job was interrupted
    mtime = (done / WEIGHTS_FILE).stat().st_mtime_ns
    final = ensure_sd_lora(str(tiny), manifest, cfg, out, dataset="toy", domain="", device="cpu", log=logs.append)
    assert final == plan.final and not plan.staging.exists()
    assert sorted(p.name for p in final.iterdir()) == sorted([INFO_FILE, *map(folder_name, CLASSES)])
    for name in CLASSES:
        assert (final / folder_name(name) / WEIGHTS_FILE).is_file()
    assert (final / folder_name(CLASSES[1]) / WEIGHTS_FILE).stat().st_mtime_ns == mtime  # reused, not retrained
    assert any(f"reusing LoRA '{CLASSES[1]}'" in line for line in logs)
    assert [line.split("'")[1] for line in logs if line.startswith("trained")] == [CLASSES[0]]
    info = json.loads((final / INFO_FILE).read_text())
    assert info["scope"] == "per_class" and sorted(info["losses"]) == sorted(CLASSES)


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"batch_size": 0}, {"rank": 0}])
def test_bad_settings_are_one_line_errors(tiny, bad):
    images, names = toy_images()
    with pytest.raises(FsynthError) as err:
        finetune_sd_lora(tiny, images, prompts(names), seed=0, **{**TRAIN, "epochs": 1, **bad})
    assert "\n" not in str(err.value) and "--set generator.finetune." in str(err.value)


def test_bad_inputs_are_one_line_errors(tiny, tmp_path):
    with pytest.raises(FsynthError, match="needs shots") as err:
        finetune_sd_lora(tiny, [], [], seed=0, epochs=1, **TRAIN)
    assert "\n" not in str(err.value)
    with pytest.raises(FsynthError, match="not a diffusers pipeline folder") as err:
        finetune_sd_lora(tmp_path, *toy_images()[:1], prompts(toy_images()[1]), seed=0, epochs=1, **TRAIN)
    manifest = fewshot_manifest(tmp_path)
    for base, why in ((str(tmp_path / "missing"), "does not exist"), ("nobody/no-such-model", "not in the local")):
        with pytest.raises(FsynthError, match=why) as err:
            ensure_sd_lora(base, manifest, gcfg(tiny), tmp_path / "out", dataset="toy", domain="")
        assert "\n" not in str(err.value)
    with pytest.raises(FsynthError, match="generator.finetune.epochs must be at least 1"):
        ensure_sd_lora(str(tiny), manifest, gcfg(tiny, epochs=0), tmp_path / "out", dataset="toy", domain="")
    frame = pd.read_parquet(manifest)
    frame[frame["split"] != "train"].to_parquet(manifest)
    with pytest.raises(FsynthError, match="no 'train' rows"):
        ensure_sd_lora(str(tiny), manifest, gcfg(tiny), tmp_path / "out", dataset="toy", domain="")
