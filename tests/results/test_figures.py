"""fsynth.results.figures: Figure 2's seed means and which runs its curves average."""

import pytest

from fsynth.results.ablations import ablations
from fsynth.results.figures import figure2_runs, seed_mean_history
from tests.results.test_ablations import _row


def test_seed_mean_history_averages_each_epoch_over_the_seeds_that_logged_it():
    points = [("measured/discrepancy", 0, 2.0), ("measured/discrepancy", 1, 1.0), ("measured/robustness", 1, 0.5),
              ("measured/discrepancy", 0, 4.0)]  # a second seed, epoch 0 only
    history = seed_mean_history(points)
    assert history == [{"epoch": 0, "measured/discrepancy": pytest.approx(3.0)},
                       {"epoch": 1, "measured/discrepancy": 1.0, "measured/robustness": 0.5}]
    assert seed_mean_history([]) == []


def test_figure2_runs_adds_the_single_region_pair_with_their_regions_in_the_labels():
    method = _row("method", [70.0, 71.0], run_ids=("m0", "m1"))
    ce = _row("real-synthetic-ce", [69.0], sweep="ce", run_ids=("c0",))
    assert figure2_runs(ablations([method, ce])) == {"method": ("m0", "m1"), "real + synthetic CE only": ("c0",)}
    single = _row("method", [70.5], sweep="m-single", regions=("single", 0.0), run_ids=("s0",))
    assert figure2_runs(ablations([method, ce, single])) == {
        "method, K = 2 × classes": ("m0", "m1"), "real + synthetic CE only, K = 2 × classes": ("c0",),
        "method, single region": ("s0",)}
