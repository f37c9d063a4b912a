"""Baselines are configurations of the one loop."""

import pytest

from fsynth.baselines import BASELINES, apply_baseline, needs_synthetic
from fsynth.config import build_config
from fsynth.errors import ConfigError


def test_each_baseline_sets_what_it_names():
    cfg = build_config("full")
    assert apply_baseline(cfg, "zero-shot").training.epochs == 0
    real = apply_baseline(cfg, "real-only")
    assert not real.training.use_synthetic and real.loss.lambda_discrepancy == real.loss.lambda_robustness == 0
    dd = apply_baseline(cfg, "real-synthetic-ce")
    assert dd.training.use_synthetic and dd.loss.lambda_discrepancy == 0 and dd.loss.lambda_robustness == 0
    method = apply_baseline(cfg, "method")
    assert method.loss == cfg.loss and method.name == "method"
    assert apply_baseline(cfg, "synthetic-only").training.use_real is False
    assert {n: needs_synthetic(apply_baseline(cfg, n)) for n in BASELINES} == {
        "zero-shot": False, "real-only": False, "real-synthetic-ce": True, "method": True,
        "discrepancy-only": True, "robustness-only": True, "synthetic-only": True}


def test_unknown_baseline():
    with pytest.raises(ConfigError, match="unknown baseline 'best'; valid baselines: zero-shot, real-only"):
        apply_baseline(build_config(), "best")
