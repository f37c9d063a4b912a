"""fsynth.compare: the difference of two rows with its unpaired and paired standard errors."""

import math

import pytest

from fsynth import compare


def test_paired_error_cancels_the_noise_two_rows_share_by_seed():
    # the embedded default's method vs CE rows (5 seeds): seed 1 is low for both
    a = {"0": 76.52, "1": 75.41, "2": 75.97, "3": 75.64, "4": 75.17}
    b = {"0": 76.54, "1": 74.93, "2": 75.88, "3": 75.53, "4": 74.70}
    d = compare.difference(a, b)
    per_seed = [-0.02, 0.48, 0.09, 0.11, 0.47]
    mean = sum(per_seed) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_seed) / 4)
    assert d.diff == pytest.approx(mean) and d.paired == pytest.approx(mean)
    assert d.paired_se == pytest.approx(sd / math.sqrt(5)) and d.n_paired == 5 and d.same_seeds
    s_a, s_b = 0.5276, 0.7386  # sample stds of a and b
    assert d.se == pytest.approx(math.sqrt(s_a ** 2 / 5 + s_b ** 2 / 5), abs=1e-3)
    assert d.judged == (pytest.approx(mean), pytest.approx(sd / math.sqrt(5)))
    assert d.beats() is True and d.beats(k=3) is False  # 0.226 / 0.104 = 2.2 standard errors
    assert d.text() == "+0.23 ± 0.10 pp (paired over 5 seeds; unpaired ± 0.41)"


def test_rows_of_other_seeds_are_judged_unpaired():
    d = compare.difference({"0": 75.0, "1": 76.0, "2": 74.0}, {"0": 73.0, "1": 74.0})
    assert d.n_paired == 2 and not d.same_seeds and d.paired == 2.0 and d.paired_se == 0.0
    assert d.judged == (1.5, pytest.approx(math.sqrt(1 / 3 + 0.5 / 2)))
    assert d.beats() is False  # 1.5 < 2 x 0.76, although the two shared seeds agree exactly
    assert d.text() == "+1.50 ± 0.76 pp (unpaired; paired over the 2 shared seeds +2.00 ± 0.00)"


def test_one_seed_cannot_be_judged():
    d = compare.difference({"0": 80.0, "1": 81.0}, {"0": 70.0})
    assert d.se is None and d.paired is None and d.judged is None and d.beats() is None
    assert d.text() == "+10.50 pp (a row with one seed: no error)"


def test_a_negative_difference_never_beats():
    d = compare.difference({"0": 70.0, "1": 71.0, "2": 70.5}, {"0": 75.0, "1": 76.0, "2": 75.4})
    assert d.diff < 0 and d.beats() is False
