"""A dataset's ablations: the rows that vary one axis at a common setting, and the verdict on the loss terms."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fsynth import compare
from fsynth.results.rows import DEFAULT_REGIONS, MEASURED, NO_SYNTHETIC, REGULARISED, SweepRow, num

SYNTHETIC_AXIS = ("real-synthetic-ce", "method")  # the rows the synthetic-set table compares
# The loss ablation's rows, in order: (baseline, label, CE on synthetic images, discrepancy term, robustness term).
LOSS_ROWS = (("real-only", "real only", False, False, False),
             ("real-synthetic-ce", "real + synthetic CE only", True, False, False),
             ("discrepancy-only", "+ discrepancy", True, True, False),
             ("robustness-only", "+ robustness", True, False, True),
             ("method", "+ both (method)", True, True, True))
LOSS_LABELS = {row[0]: row[1] for row in LOSS_ROWS}
FIGURE2 = {"method": "method", "real-synthetic-ce": "real + synthetic CE only"}  # Figure 2's runs, as labelled


@dataclass(frozen=True)
class Setting:
    """What an ablation holds fixed: space, paper variant, loss preset, shots, regions (mode, multiple), the
    regions' feature space and the synthetic set (see `fsynth.results.rows.synthetic_label`)."""

    space: str
    preset: str
    loss_preset: str
    shots: int
    regions: tuple[str, float]
    features: str = ""
    synthetic: str = ""


@dataclass(frozen=True)
class Ablations:
    """A dataset's ablation rows, all at one setting but for the axis each varies (see `ablations`)."""

    setting: Setting | None
    method: SweepRow | None  # the method row: baseline method with the default regions (figures are logged here)
    loss: Mapping[str, SweepRow]  # baseline -> row, LOSS_ROWS order
    regions: tuple[SweepRow, ...]  # method rows: single, then K = 1, 2, 4 ... x classes
    presets: tuple[SweepRow, ...]  # method rows: paper, then protoaug
    shots: tuple[SweepRow, ...]  # method (then real-only) rows by shots
    one_region: Mapping[str, SweepRow] = field(default_factory=dict)  # Figure 2's rows with a single region
    features: tuple[SweepRow, ...] = ()  # method rows by the regions' feature space
    synthetic: tuple[SweepRow, ...] = ()  # CE and method rows by synthetic set


def setting_of(row: SweepRow) -> Setting:
    """The setting `row` ran at."""
    return Setting(row.space, row.preset, row.loss_preset, row.shots, row.regions, row.features, row.synthetic)


def _pick(rows: Sequence[SweepRow]) -> SweepRow | None:
    """Of several sweeps of one configuration, the one with the most seeds, then the latest."""
    return max(rows, key=lambda r: (len(r.tests), r.end_time), default=None)


def method_row(rows: Sequence[SweepRow]) -> SweepRow | None:
    """The dataset's method row: baseline `method` with the default regions (static, K = 2 x classes).

    Among several (the ablation space's and the main sweep's, other shots or loss presets), the one in the space
    most rows share, then at the (variant, loss preset, shots) most rows share: the ablations' common setting.
    """
    spaces = Counter(r.space for r in rows)
    common = Counter((r.preset, r.loss_preset, r.shots) for r in rows)
    sets = Counter((r.features, r.synthetic) for r in rows if r.baseline in REGULARISED)
    candidates = [r for r in rows if r.baseline == "method" and r.regions == DEFAULT_REGIONS]
    return max(candidates, default=None, key=lambda r: (spaces[r.space], common[(r.preset, r.loss_preset, r.shots)],
                                                        sets[(r.features, r.synthetic)], len(r.tests), r.end_time))


def _like(row: SweepRow, ref: Setting, free: str = "") -> bool:
    """Whether `row` ran at `ref` except on the axis `free` (a Setting field); regions and their features count
    only for baselines that use them (real-only and CE-only runs ignore the partition), the synthetic set only for
    those that train on one."""
    mine = setting_of(row)
    if row.baseline not in REGULARISED:
        mine = replace(mine, regions=ref.regions, features=ref.features)
    if row.baseline in NO_SYNTHETIC:
        mine = replace(mine, synthetic=ref.synthetic)
    return (replace(mine, **{free: getattr(ref, free)}) if free else mine) == ref


def _variants(rows: Sequence[SweepRow], ref: Setting, baselines: Sequence[str], free: str,
              key: Callable[[SweepRow], Any]) -> tuple[SweepRow, ...]:
    """One row per distinct `key` among `baselines`' rows at `ref` with the axis `free` let go, in key order."""
    groups: dict[Any, list[SweepRow]] = defaultdict(list)
    for row in rows:
        if row.baseline in baselines and _like(row, ref, free):
            groups[key(row)].append(row)
    return tuple(_pick(groups[k]) for k in sorted(groups))


def _regions_key(row: SweepRow) -> tuple:
    """Regions in table order: single, static, online, then any other mode; by multiple within a mode."""
    mode, multiple = row.regions
    return ({"single": 0, "static": 1, "online": 2}.get(mode, 3), mode, multiple)


def _reference(rows: Sequence[SweepRow], method: SweepRow | None) -> Setting | None:
    """The ablations' common setting: the method row's, else the most common one of the loss rows (None: none)."""
    if method is not None:
        return setting_of(method)
    loss_rows = [replace(setting_of(r), regions=DEFAULT_REGIONS) for r in rows if r.baseline in LOSS_LABELS]
    return Counter(loss_rows).most_common(1)[0][0] if loss_rows else None


def ablations(rows: Sequence[SweepRow]) -> Ablations:
    """The rows of each ablation at one setting: the method row's, else the most common one of the loss rows."""
    method = method_row(rows)
    ref = _reference(rows, method)
    if ref is None:
        return Ablations(None, None, {}, (), (), ())
    # A CE-only run ignores the regions, but its measured regularisers depend on them: the one at ref's regions
    # stands in the table when it exists.
    loss = {b: _pick([r for r in rows if r.baseline == b and setting_of(r) == ref])
            or _pick([r for r in rows if r.baseline == b and _like(r, ref)]) for b in LOSS_LABELS}
    single = replace(ref, regions=("single", 0.0))
    return Ablations(
        setting=ref, method=method, loss={b: r for b, r in loss.items() if r is not None},
        regions=_variants(rows, ref, ("method",), "regions", _regions_key),
        presets=_variants(rows, ref, ("method",), "loss_preset", lambda r: (r.loss_preset != "paper", r.loss_preset)),
        shots=_variants(rows, ref, ("method", "real-only"), "shots", lambda r: (r.shots, r.baseline != "method")),
        one_region={b: r for b in FIGURE2
                    if (r := _pick([x for x in rows if x.baseline == b and setting_of(x) == single]))},
        features=_variants(rows, ref, ("method",), "features", lambda r: (r.features != ref.features, r.features)),
        synthetic=_variants(rows, ref, SYNTHETIC_AXIS, "synthetic",
                            lambda r: (r.synthetic, SYNTHETIC_AXIS.index(r.baseline))),
    )


# ----------------------------------------------------------------------------------------------------- verdict


def _names(items: Sequence[str], word: str) -> str:
    """The items as a list in words: 'a', 'a and b', 'a, b and c' (`word` joining the last two)."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {word} {items[-1]}"


def _compare(method: SweepRow, other: SweepRow) -> tuple[bool | None, str]:
    """(whether the method's mean test accuracy beats `other`'s by more than 2 standard errors of the difference,
    the numbers); see fsynth.compare for the paired and unpaired errors. None: one seed each, cannot tell."""
    diff = compare.difference(dict(zip(method.seeds, method.tests, strict=True)),
                              dict(zip(other.seeds, other.tests, strict=True)))
    return diff.beats(), f"{LOSS_LABELS[other.baseline]}: {diff.text()}"


def _measured_line(loss: Mapping[str, SweepRow]) -> str:
    """The final-epoch measured discrepancy / robustness of the method and CE-only rows, where logged."""
    shown = [(name, loss[b].measured) for b, name in FIGURE2.items() if b in loss and loss[b].measured]
    if not shown:
        return ""
    values = "; ".join(f"{name} {num(m.get(MEASURED[0]))} / {num(m.get(MEASURED[1]))}" for name, m in shown)
    return f" Final-epoch measured discrepancy / robustness (mean over seeds): {values}."


def loss_verdict(loss: Mapping[str, SweepRow]) -> str:
    """A sentence saying whether the method beats CE-only and real-only by 2 standard errors of the difference
    ("" without the method row or either of the two)."""
    method = loss.get("method")
    others = [loss[b] for b in ("real-synthetic-ce", "real-only") if b in loss]
    if method is None or not others:
        return ""
    results = [(LOSS_LABELS[o.baseline], *_compare(method, o)) for o in others]
    wins = [name for name, won, _ in results if won is True]
    fails = [name for name, won, _ in results if won is False]
    unknown = [name for name, won, _ in results if won is None]
    clauses = [f"beats {_names(wins, 'and')} by more than 2 standard errors"] if wins else []
    clauses += [f"does not beat {_names(fails, 'or')} by 2 standard errors"] if fails else []
    clauses += [f"cannot be told apart from {_names(unknown, 'or')} (a row with one seed: no error)"] if unknown else []
    details = "; ".join(detail for _, _, detail in results)
    return (f"**Verdict:** the method {', but '.join(clauses)} (method minus {details}; paired: the mean and "
            f"standard error of the per-seed differences, a seed giving both runs the same initialisation and data "
            f"order; unpaired: sqrt(s1²/n1 + s2²/n2)).{_measured_line(loss)}")
