"""Experiment configuration: frozen dataclasses, a strict YAML loader, `--set a.b=v` overrides and named presets."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fsynth.cache import atomic_write_bytes
from fsynth.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


def _at_least_one(section: Any, name: str, keys: tuple[str, ...]) -> None:
    """Counts that must be 1 or more: a one-line ConfigError naming the key and the fix."""
    for key in keys:
        if getattr(section, key) < 1:
            raise ConfigError(f"{name}.{key} must be at least 1, got {getattr(section, key)}; set --set "
                              f"{name}.{key}=N with a positive N")


@dataclass(frozen=True)
class DataConfig:
    """The real data: which dataset, where it lives, and how the few shots and validation set are drawn."""

    dataset: str = "fashion-mnist"
    root: str = ""  # "" = the dataset's default location (e.g. Debian's Fashion-MNIST copy)
    shots: int = 16
    seed: int = 1  # few-shot sampling seed
    split_seed: int = 0  # seed of the deterministic train/val/test split used when no split file exists
    val_fraction: float = 0.2  # share of the train pool held out as validation when the dataset has no val split
    val_per_class: int = 0  # 0 = the whole validation split; > 0 caps it per class (deterministic)
    test_per_class: int = 0  # 0 = the whole test split (what results report); > 0 a deterministic subset (demos)
    download: bool = False

    def __post_init__(self) -> None:
        if self.shots <= 0:
            raise ConfigError(f"data.shots must be at least 1, got {self.shots}; ask for 1, 2, 4, 8 or 16 shots")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must lie in (0, 1), got {self.val_fraction}; e.g. 0.2")
        for key in ("val_per_class", "test_per_class"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key} must be 0 (all) or positive, got {getattr(self, key)}; pass 0 or a "
                                  "positive count")


@dataclass(frozen=True)
class GeneratorFinetuneConfig:
    """DataDream-style fine-tuning of the generator on the real shots (full variant)."""

    enabled: bool = False
    scope: Literal["per_class", "per_dataset"] = "per_dataset"
    lora_rank: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 100
    batch_size: int = 8
    epochs: int = 200
    # > 0: exactly this many optimiser steps whatever the number of shots (a shots ablation then compares
    # generators trained for the same budget); 0: `epochs` passes over the shots.
    steps: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"generator.finetune.steps must be 0 (from epochs) or positive, got {self.steps}; "
                              "pass a step count")


@dataclass(frozen=True)
class GeneratorConfig:
    """Which generator makes the synthetic set, and how."""

    backend: Literal["sd", "ddpm"] = "sd"
    model: str = "stabilityai/stable-diffusion-2-1-base"  # hub id or local directory
    images_per_class: int = 500
    guidance_scale: float = 2.0
    steps: int = 50
    resolution: int = 512
    negative_prompt: str = ""
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    scheduler: str = ""  # "" keeps the pipeline's own scheduler
    base_seed: int = 0
    lora_path: str = ""
    lora_scale: float = 1.0
    batch_size: int = 8  # images per generator call; fixed groups of the prompt table, so resumes are bit-identical
    finetune: GeneratorFinetuneConfig = field(default_factory=GeneratorFinetuneConfig)
    # Image-to-image (SDEdit, as IsSynth and DISEF): "shots" noises a real shot of the class to `strength` of the
    # schedule and denoises it with the class condition (each image records its source shot); "noise" starts from
    # pure noise (text-to-image).
    init_from: Literal["noise", "shots"] = "noise"
    strength: float = 1.0  # in (0, 1]: how far each shot is noised (1 = pure noise)

    def __post_init__(self) -> None:
        _at_least_one(self, "generator", ("images_per_class", "steps", "batch_size", "resolution"))
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"generator.strength must lie in (0, 1], got {self.strength}; e.g. 0.5 (half-way "
                              "noised shots) or 1 (pure noise)")


@dataclass(frozen=True)
class PartitionConfig:
    """The regions Z_1..Z_K: static k-means before training, online MacQueen updates, or a single region."""

    mode: Literal["static", "online", "single"] = "static"
    # outputs: the model's outputs h(z), the prediction space of the paper's Appendix A.4 (centroids from the
    # starting model, each batch assigned with the current outputs); embedding: the frozen encoder's image
    # embeddings; pixels: resized images, flattened.
    features: Literal["outputs", "embedding", "pixels"] = "embedding"
    cluster_multiple: float = 2.0  # K = round(cluster_multiple * num_classes)
    iterations: int = 300
    pixel_side: int = 32  # side of the resized image for `pixels` features
    seed: int = 0
    refit_every: int = 0  # `outputs` regions: refit the centroids with the current model every N epochs (0 = never)

    def __post_init__(self) -> None:
        # Checked here, with the config, so a bad value fails before the model is built and not at clustering.
        if not self.cluster_multiple > 0:
            raise ConfigError(f"partition.cluster_multiple must be positive, got {self.cluster_multiple}; e.g. 1, 2 "
                              "or 4 (K = multiple x classes), or partition.mode=single for one region")
        _at_least_one(self, "partition", ("iterations", "pixel_side"))
        if self.refit_every < 0:
            raise ConfigError(f"partition.refit_every must be 0 (never) or positive, got {self.refit_every}; pass "
                              "a number of epochs")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the transformer blocks of the encoder."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("attention", "mlp")
    towers: tuple[str, ...] = ("vision", "text")


@dataclass(frozen=True)
class ModelConfig:
    """The classifier: an open_clip backbone, its LoRA adapters and its head."""

    arch: str = "ViT-B-16-quickgelu"
    pretrained: str = "openai"  # open_clip pretrained tag, a local weights file, or "" for random weights
    head: Literal["zeroshot", "prototype"] = "zeroshot"
    image_size: int = 224
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Prototype head: logits = scale x cosine. 20 is near the validation-NLL optimum (~22) of the frozen
    # EfficientNet-Lite0 prototype head on Fashion-MNIST (16 shots, 96 px).
    prototype_logit_scale: float = 20.0


@dataclass(frozen=True)
class LossConfig:
    """Eq. 7 of the paper: lambda*CE(real) + CE(synth) + lambda1*discrepancy + lambda2*robustness."""

    # paper: eq. 7 as written; protoaug: the official full code's reductions; protoaug-lightweight: the official
    # lightweight code's (g = the batch's synthetic samples, ordered pairs with the diagonal). DESIGN.md 1.3.
    preset: Literal["paper", "protoaug", "protoaug-lightweight"] = "protoaug"
    ce_real_weight: float = 4.0
    ce_synth_weight: float = 1.0
    lambda_discrepancy: float = 0.1
    lambda_robustness: float = 1.0

    def __post_init__(self) -> None:
        for key in ("ce_real_weight", "ce_synth_weight", "lambda_discrepancy", "lambda_robustness"):
            if not getattr(self, key) >= 0:  # a negative weight rewards the loss term it should shrink
                raise ConfigError(f"loss.{key} must be 0 or positive, got {getattr(self, key)}; pass 0 to switch "
                                  "the term off, or a positive weight")


@dataclass(frozen=True)
class TrainingConfig:
    """The single training loop's recipe (reference defaults of the full variant)."""

    use_real: bool = True
    use_synthetic: bool = True
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 5e-4
    min_lr: float = 1e-8
    mixed_precision: bool = True
    mix_prob: float = 0.2  # CutMix/MixUp probability per batch, within each domain
    # Real shots are repeated each epoch to about this many real images per synthetic one (0 = each shot once;
    # the reference oversamples to ~1, except on DTD and Pets).
    real_per_synthetic: float = 1.0
    # Every baseline takes as many optimiser steps per epoch as the method: an epoch holds as many items as the
    # method's (shots oversampled against generator.images_per_class x classes, plus those synthetic images),
    # filled by cycling the baseline's own training images. False: each baseline's natural epoch.
    match_steps: bool = True
    augment: Literal["datadream", "none"] = "datadream"
    seed: int = 0
    loader_workers: int = 0
    eval_batch_size: int = 256
    measure_regularisers: bool = True  # Figure 2: discrepancy and robustness on the training set, every epoch
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always checkpointed)
    # Sweep trials select on validation only and never see the test set; the final seeds evaluate it once.
    evaluate_test: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"training.epochs must be 0 (zero-shot) or positive, got {self.epochs}; pass a count")
        if not self.lr > 0:
            raise ConfigError(f"training.lr must be positive, got {self.lr}; e.g. 1e-4")
        _at_least_one(self, "training", ("batch_size", "eval_batch_size", "checkpoint_every"))


@dataclass(frozen=True)
class ResourcesConfig:
    """What one trial and one generator actor ask of the cluster."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0  # fractions let a laptop run more trials than cores (torch gets >= 1 thread)
    gpus_per_worker: float = 0.0
    generator_actors: int = 1
    cpus_per_generator_actor: float = 1.0
    gpus_per_generator_actor: float = 0.0
    # Ray Train restarts a run whose worker died or raised, from its last checkpoint, this many times (a lost
    # spot node, an OOM kill, a flaky filesystem); a real bug fails after the last retry.
    max_failures: int = 2

    def __post_init__(self) -> None:
        _at_least_one(self, "resources", ("num_workers", "generator_actors"))
        if self.max_failures < 0:
            raise ConfigError(f"resources.max_failures must be 0 (no retries) or positive, got {self.max_failures}; "
                              "pass a count")
        for key in ("cpus_per_worker", "gpus_per_worker", "cpus_per_generator_actor", "gpus_per_generator_actor"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"resources.{key} must be 0 or positive, got {getattr(self, key)}; pass a count")


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs and artefacts go."""

    storage: str = ""  # where the default sqlite store lives ("" = the command's --out, e.g. ./runs)
    uri: str = ""  # "" = sqlite:///<storage>/mlflow.db
    experiment: str = "fsynth"


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that determines one run."""

    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------------------------- strict loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the field type `tp`; return it in canonical form (tuples for lists, floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            item_tp = typing.get_args(tp)[0]
            return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}; fix the value")


def build_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    where = prefix or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where}' must be a mapping, got {data!r}; write it as key: value lines")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            guess = f"; did you mean '{prefix + '.' if prefix else ''}{near[0]}'?" if near else ""
            raise ConfigError(f"unknown config key '{dotted}'; valid keys in {where}: {', '.join(names)}{guess}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def config_from_dict(data: dict) -> ExperimentConfig:
    """Build an `ExperimentConfig` from a nested mapping (missing keys keep their defaults)."""
    return build_dataclass(ExperimentConfig, data)


def config_to_dict(cfg: Any) -> dict:
    """The nested mapping of a config, with tuples as lists, ready for YAML or JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def flatten_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Dotted keys to leaf values, e.g. {'training.lr': 1e-4, ...}; what trackers log as params."""

    def walk(d: dict, prefix: str) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in d.items():
            dotted = f"{prefix}{key}"
            flat.update(walk(value, dotted + ".") if isinstance(value, dict) else {dotted: value})
        return flat

    return walk(config_to_dict(cfg), "")


def valid_keys() -> list[str]:
    """Every dotted leaf key the configuration has."""
    return sorted(flatten_config(ExperimentConfig()))


def merge(base: dict, update: dict) -> dict:
    """Deep-merge `update` into a copy of `base` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------- files and overrides


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{at}; fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level; write sections such as "
                          "`training:` with `key: value` lines under them")
    return data


def available_presets() -> list[str]:
    """Names of the presets shipped with fsynth."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict:
    """The override mapping of the named preset (`full`, `lightweight`, `embedded`, ...)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; valid presets: {', '.join(available_presets())}")
    return _read_yaml(path)


def parse_override(text: str) -> dict:
    """`a.b=value` -> {'a': {'b': value}}; the value is read as YAML (so `true`, `3`, `[a, b]` work)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value, e.g. training.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return _nest(key, value)


def _nest(dotted: str, value: Any) -> dict:
    """'a.b', v -> {'a': {'b': v}}."""
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def build_config(
    preset: str | None = None,
    files: typing.Sequence[str | Path] = (),
    overrides: typing.Sequence[str] = (),
    extra: dict | None = None,
) -> ExperimentConfig:
    """Resolve a config: defaults <- preset <- YAML files <- `extra` (CLI flags) <- `--set` overrides."""
    data: dict = {}
    if preset:
        data = merge(data, load_preset(preset))
        data.setdefault("name", preset)
    for path in files:
        data = merge(data, _read_yaml(Path(path)))
    if extra:
        data = merge(data, extra)
    for text in overrides:
        data = merge(data, parse_override(text))
    return config_from_dict(data)


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML; `load_config` reads it back to an equal object."""
    return atomic_write_bytes(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())


def load_config(path: str | Path) -> ExperimentConfig:
    """Read a config YAML (a saved resolved config, or any partial one) strictly."""
    return config_from_dict(_read_yaml(Path(path)))


def with_values(cfg: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    """A copy of `cfg` with dotted keys replaced, checked like a file: with_values(cfg, {'training.lr': 1e-5})."""
    data = config_to_dict(cfg)
    for key, value in values.items():
        data = merge(data, _nest(key, value))
    return config_from_dict(data)


def config_from_params(params: typing.Mapping[str, str]) -> ExperimentConfig:
    """The config a run was logged with, rebuilt from its params: `flatten_config`'s keys, each value the string a
    tracker logs (str() of a scalar, JSON of a list), read as a `--set` value, but a text field's string taken as
    it is (YAML would read 'yes' or '1' as a bool or an int). Keys the run lacks keep the config's defaults."""
    defaults = flatten_config(ExperimentConfig())
    data: dict = {}
    for key, text in params.items():
        if key not in defaults:
            # Reading back a store, not writing a config: a run logged by another fsynth version may carry a key
            # this config no longer has (renamed or removed); it tells nothing about this version's fields.
            continue
        text = str(text)
        data = merge(data, _nest(key, text) if isinstance(defaults[key], str) else parse_override(f"{key}={text}"))
    return config_from_dict(data)
