"""The paper's baselines and ablations as named configurations of the one training loop."""

from __future__ import annotations

from typing import Any

from fsynth.config import ExperimentConfig, with_values
from fsynth.errors import ConfigError

NO_REGULARISER = {"loss.lambda_discrepancy": 0.0, "loss.lambda_robustness": 0.0}

# Each is a set of dotted config values applied on top of the run's config (its λs, preset, data...).
BASELINES: dict[str, dict[str, Any]] = {
    "zero-shot": {"training.epochs": 0},  # the head as built (text or prototypes), no fine-tuning
    "real-only": {"training.use_synthetic": False, **NO_REGULARISER},  # "Real-finetune"
    "real-synthetic-ce": dict(NO_REGULARISER),  # DataDream's classifier: cross-entropy on real + synthetic
    "method": {},  # eq. 7 with the configured λ1, λ2 (both regularisers)
    "discrepancy-only": {"loss.lambda_robustness": 0.0},  # Table 2 ablations
    "robustness-only": {"loss.lambda_discrepancy": 0.0},
    "synthetic-only": {"training.use_real": False, "loss.lambda_discrepancy": 0.0},  # Table 5 / Appendix F
}


def apply_baseline(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """`cfg` turned into the named baseline; its `name` records which."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline '{name}'; valid baselines: {', '.join(BASELINES)}")
    return with_values(cfg, {**BASELINES[name], "name": name})


def needs_synthetic(cfg: ExperimentConfig) -> bool:
    """Whether a run of `cfg` reads a synthetic set (everything but zero-shot and real-only)."""
    return cfg.training.use_synthetic and cfg.training.epochs > 0
