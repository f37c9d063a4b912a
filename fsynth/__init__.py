"""fsynth: few-shot image classification with synthetic data (ICML 2025 method and baselines)."""

import os

# torch and faiss-cpu each bring an OpenMP runtime whose idle threads spin by default; on a small machine the two
# then fight for the cores (k-means measured 5-20x slower). Must be set before either library is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
