"""Search spaces (`tune_spaces/*.yaml`): fixed overrides, sampled dotted keys, Tune settings; checked on load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fsynth.config import ExperimentConfig, build_config, build_dataclass, merge, valid_keys, with_values
from fsynth.errors import ConfigError

SPACE_DIR = Path(__file__).resolve().parent.parent / "tune_spaces"
SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class TuneSettings:
    """How the sweep runs: the metric it selects on (validation only), early stopping, seeds of the final runs."""

    metric: str = "val/accuracy"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 1  # repeats of the grid (or draws, when nothing is a grid)
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = 5  # epochs before ASHA may stop a trial
    reduction_factor: int = 3
    max_concurrent: int = 0  # 0 = derived from the cluster's resources
    final_seeds: int = 3  # the best configuration is retrained with this many seeds and tested once


@dataclass(frozen=True)
class Sampler:
    """One sampled dimension: `keys` (one or more dotted config keys sampled together) and how."""

    keys: tuple[str, ...]
    kind: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class SearchSpace:
    path: str
    preset: str
    fixed: dict[str, Any]
    sample: tuple[Sampler, ...]
    tune: TuneSettings = field(default_factory=TuneSettings)

    def base_config(self, overrides: tuple[str, ...] = ()) -> ExperimentConfig:
        """The preset with the fixed values (and any `--set` overrides) applied."""
        return with_values(build_config(self.preset or None, overrides=overrides), self.fixed)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"search space {path} does not exist; choose one of {', '.join(list_spaces())}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"search space {path} must hold a mapping at the top level")
    parent = data.pop("extends", None)
    return merge(_read(path.parent / parent), data) if parent else data


def _sampler(path: Path, dotted: str, spec: Any) -> Sampler:
    keys = tuple(k.strip() for k in str(dotted).split(","))
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
        raise ConfigError(f"{path.name}: sampled key '{dotted}' got {spec!r}, not a sampler; it needs exactly one "
                          f"of {', '.join(SAMPLERS)}, e.g. {{grid: [1, 2]}}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{path.name}: '{dotted}: {kind}' needs a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint") and (len(values) != 2 or len(keys) != 1):
        raise ConfigError(f"{path.name}: '{dotted}: {kind}' takes one key and [low, high], got {values!r}")
    if len(keys) > 1 and not all(isinstance(v, list) and len(v) == len(keys) for v in values):
        raise ConfigError(f"{path.name}: '{dotted}' samples {len(keys)} keys together: every value must be a "
                          f"list of {len(keys)}, got {values!r}")
    return Sampler(keys, kind, tuple(tuple(v) if isinstance(v, list) else v for v in values))


def _check_keys(path: Path, keys: list[str]) -> None:
    known = set(valid_keys())
    for key in keys:
        if key not in known:
            section = key.rsplit(".", 1)[0]
            near = [k for k in sorted(known) if k.startswith(section + ".")] or sorted(known)
            raise ConfigError(f"{path.name}: '{key}' is not a config key; valid keys here: {', '.join(near)}")


def load_space(path: str | Path) -> SearchSpace:
    """Read a search space and check it against the config: every key exists and every value has the right type,
    so a bad space fails on the laptop before any trial starts."""
    path = Path(path).resolve()
    data = _read(path)
    unknown = sorted(set(data) - {"preset", "fixed", "sample", "tune"})
    if unknown:
        raise ConfigError(f"{path.name}: unknown section '{unknown[0]}'; valid sections: preset, fixed, sample, tune")
    fixed = data.get("fixed") or {}
    samplers = tuple(_sampler(path, k, v) for k, v in (data.get("sample") or {}).items())
    _check_keys(path, [*fixed, *(k for s in samplers for k in s.keys)])
    tune = build_dataclass(TuneSettings, data.get("tune") or {}, "tune")
    space = SearchSpace(str(path), str(data.get("preset") or ""), dict(fixed), samplers, tune)
    base = space.base_config()
    for sampler in samplers:  # every value a trial can get must build a valid config
        for value in sampler.values:
            with_values(base, dict(zip(sampler.keys, value if len(sampler.keys) > 1 else (value,), strict=True)))
    return space


def list_spaces() -> list[str]:
    """Names of the search spaces shipped in tune_spaces/."""
    return sorted(p.stem for p in SPACE_DIR.glob("*.yaml"))


def space_path(dataset: str, name: str = "") -> Path:
    """An explicit space (a name in tune_spaces/ or a path), else the dataset's own file, else default.yaml."""
    if name:
        explicit = Path(name)
        return explicit if explicit.suffix in (".yaml", ".yml") else SPACE_DIR / f"{name}.yaml"
    own = SPACE_DIR / f"{dataset}.yaml"
    return own if own.is_file() else SPACE_DIR / "default.yaml"
