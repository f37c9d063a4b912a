"""The classifier: a backbone (fsynth.backbones) with peft LoRA adapters and a zero-shot or prototype head."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from fsynth.backbones import (
    EFFICIENTNET,
    EFFICIENTNET_WEIGHTS,
    HF_HUB,
    TINY_CLIP,
    build_clip,
    build_efficientnet,
    clip_source,
    first_line,
    hub_file,
    preprocess_spec,
    resolve_arch,
    weights_file,
)
from fsynth.config import ModelConfig
from fsynth.errors import ConfigError, FsynthError
from fsynth.hub import hub_offline
from fsynth.prompts import class_prompts

TOWERS = ("vision", "text")
TARGETS = ("attention", "mlp")

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
        backbone, text = build_efficientnet(cfg), False
    else:
        backbone, text = build_clip(cfg), True
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
            weights_file(cfg.arch, cfg.pretrained)
        return
    name, pretrained = clip_source(cfg)
    if not name.startswith(HF_HUB):
        resolve_arch(name, pretrained, warn=False)
    elif hub_offline():
        hub_file(name, "open_clip_config.json")


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
    name, _ = clip_source(cfg)
    if cfg.arch == TINY_CLIP:
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    elif name.startswith(HF_HUB) and hub_offline():
        tokenizer = open_clip.get_tokenizer("local-dir:" + str(Path(hub_file(name, "open_clip_config.json")).parent))
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
        raise FsynthError(f"{path} is not a readable safetensors file ({first_line(exc)}); pass the "
                          "adapters.safetensors written by fsynth") from None
    check_adapters(classifier.adapter_state_dict(), state, f"adapter file {path}", metadata)
    classifier.load_adapter_state_dict(state)
    return metadata


