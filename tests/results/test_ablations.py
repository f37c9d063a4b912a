"""fsynth.results.ablations: the ablations' common setting, the rows each axis picks, and the loss verdict."""

from fsynth.results.ablations import ablations, loss_verdict
from fsynth.results.render import render_dataset
from fsynth.results.rows import DatasetReport, SweepRow


def _row(baseline, tests, **fields):
    base = {"dataset": "d", "sweep": baseline, "baseline": baseline, "space": "ablation", "preset": "full",
            "shots": 16, "label": baseline, "seeds": tuple(map(str, range(len(tests)))), "tests": tuple(tests),
            "vals": (), "reference": (), "end_time": 0, "loss_preset": "paper"}
    return SweepRow(**{**base, **fields})


def test_verdict_is_computed():
    method = _row("method", [80.0, 80.5, 81.0])
    ce, real = _row("real-synthetic-ce", [79.0, 80.0, 81.0]), _row("real-only", [70.0])
    verdict = loss_verdict({"real-only": real, "real-synthetic-ce": ce, "method": method})
    assert verdict.startswith("**Verdict:** the method does not beat real + synthetic CE only by 2 standard errors, "
                              "but cannot be told apart from real only (a row with one seed: no error) (")
    # per seed 1.0, 0.5, 0.0: +0.50 ± 0.29 paired (0.5 < 2 x 0.29); unpaired sqrt(0.25/3 + 1/3) = 0.65
    assert "real + synthetic CE only: +0.50 ± 0.29 pp (paired over 3 seeds; unpaired ± 0.65)" in verdict
    clear = loss_verdict({"real-synthetic-ce": ce, "method": _row("method", [80.0, 81.2, 82.1])})
    assert "beats real + synthetic CE only by more than 2 standard errors" in clear  # +1.10 ± 0.06 paired
    alone = loss_verdict({"real-synthetic-ce": _row("real-synthetic-ce", [60.0]), "method": _row("method", [61.0])})
    assert "cannot be told apart from real + synthetic CE only (a row with one seed: no error)" in alone
    assert loss_verdict({"method": method}) == "" and loss_verdict({"real-only": real}) == ""


def test_ablations_without_a_method_row():
    """No method row: the loss table still stands at the loss rows' setting, nothing is logged, nothing breaks."""
    rows = [_row("real-only", [70.0, 71.0]), _row("real-synthetic-ce", [72.0, 73.0]),
            _row("method", [75.0], regions=("single", 0.0)), _row("method", [76.0], regions=("static", 4.0))]
    ab = ablations(rows)
    assert ab.method is None and list(ab.loss) == ["real-only", "real-synthetic-ce"]
    assert [r.regions for r in ab.regions] == [("single", 0.0), ("static", 4.0)]
    lines = render_dataset(DatasetReport("d", tuple(rows), {}), {})
    assert any(line.startswith("### Loss ablation") for line in lines)
    assert not any("**Verdict:**" in line for line in lines)
    assert ablations([]).loss == {}


def test_the_ce_row_at_the_methods_regions_stands_and_one_region_pairs_are_found():
    """CE-only ignores the regions but its measured terms do not: the run at the method's regions is the table's;
    the single-region method and CE rows become Figure 2's second pair."""
    method = _row("method", [70.8, 70.5, 71.2])
    ce = _row("real-synthetic-ce", [70.8, 70.5, 71.2], sweep="ce")
    ce_single = _row("real-synthetic-ce", [70.8, 70.5, 71.2], sweep="ce1", regions=("single", 0.0), end_time=9)
    method_single = _row("method", [70.9, 71.1, 70.8], sweep="m1", regions=("single", 0.0))
    ab = ablations([method, ce, ce_single, method_single])
    assert ab.loss["real-synthetic-ce"].sweep == "ce"  # not the later single-region run
    assert {b: r.sweep for b, r in ab.one_region.items()} == {"method": "m1", "real-synthetic-ce": "ce1"}
    assert ablations([method, ce]).one_region == {}
