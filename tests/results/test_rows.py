"""fsynth.results.rows: the labels of a sweep's row, from the config read back from its params."""

from fsynth.config import config_from_params
from fsynth.results.rows import run_label


def test_run_label():
    params = {"partition.mode": "single", "partition.cluster_multiple": "1.0", "loss.preset": "paper",
              "data.shots": "4", "generator.backend": "sd", "generator.images_per_class": "64"}
    cfg = config_from_params(params)
    assert run_label("method", cfg, {"partition.mode": "single", "training.lr": "2e-4"}) == \
        "method · 1 region · paper · 4 shots · sd 64/class · lr=0.0002"
    assert run_label("real-only", cfg, {}) == "real-only · 4 shots"
