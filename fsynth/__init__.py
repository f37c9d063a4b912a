"""fsynth: few-shot image classification with synthetic data (ICML 2025 method and baselines)."""

__version__ = "0.1.0"
