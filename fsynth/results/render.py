"""The results page as Markdown (a section per dataset: sweeps, ablation tables, verdict, figures) and CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from fsynth.results.ablations import LOSS_ROWS, Ablations, Setting, ablations, loss_verdict
from fsynth.results.rows import DASH, MEASURED, MIXING, REGULARISED, DatasetReport, SweepRow, num, pct, regions_label
from fsynth.secrets import redact

CSV_FIELDS = ("dataset", "sweep", "space", "baseline", "preset", "loss_preset", "regions", "shots", "label",
              "seeds", "test_mean", "test_std", "test_per_seed", "seed_ids", "val_mean", "measured_discrepancy",
              "measured_robustness", "mixing_synthetic_in_mixed", "mixing_batch_synthetic_in_t", "features",
              "synthetic", "synthetic_recognised", "paper", "paper_row", "paper_other", "command", "parent_run")
NOTE = ("Test accuracy (%) of each sweep's final runs: mean ± sample std over seeds (ddof 1; one seed: –); the "
        "configuration was selected on validation accuracy only and test was evaluated once per seed. *paper* is "
        "the published row the run corresponds to (`shared/reference/paper_tables.md`); the paper's code picked "
        "the best epoch on the test set, so its numbers are optimistic. *command* is the `fsynth.tune` command "
        "that made the row (its sweep run's `fsynth.command` tag; – for runs made before that tag existed).")


# ------------------------------------------------------------------------------------------------------- cells


def _mean_std(row: SweepRow) -> str:
    """'mean ± std' of the row's test accuracy (%)."""
    return f"{row.test_mean:.2f} ± {pct(row.test_std)}"


def _mixing_cell(row: SweepRow) -> str:
    """'epoch % / batch %' of synthetic samples in a region with a real one; a regularised row whose regularisers
    saw none is marked, since it is cross-entropy only whatever its λs."""
    epoch, batch = (row.measured.get(k) for k in MIXING)
    if batch is None:
        return DASH
    mark = " ⚠ regularisers saw no synthetic sample" if batch == 0 and row.baseline in REGULARISED else ""
    return f"{100 * epoch:.0f} / {100 * batch:.0f}{mark}"


def _command_cell(row: SweepRow) -> str:
    """The row's command in backticks, a dash without one."""
    # A '|' inside a cell would end it, even in backticks: markdown tables need it escaped.
    return f"`{row.command}`".replace("|", "\\|") if row.command else DASH


def _published(row: SweepRow) -> str:
    """The first published row, then the others outside Table 2 (the ablation table shows those)."""
    if not row.reference:
        return DASH
    others = [f"{c.label} = {c.accuracy:g}" for c in row.reference[1:] if c.table != "2"]
    return "; ".join([row.reference[0].label, *others])


def _yes(flag: bool) -> str:
    """'yes' or 'no'."""
    return "yes" if flag else "no"


def _setting_text(ref: Setting, free: str) -> str:
    """What an ablation table holds fixed, in words (all of `ref` but the axis `free`)."""
    mode, multiple = ref.regions
    parts = {"shots": f"{ref.shots} shots", "loss_preset": f"loss preset {ref.loss_preset or '?'}",
             "regions": "1 region" if mode == "single" else f"{mode} regions K = {multiple:g} × classes",
             "preset": f"{ref.preset} variant", "space": f"space {ref.space or DASH}",
             "features": f"{ref.features or DASH} features", "synthetic": ref.synthetic or "no synthetic set"}
    return ", ".join(text for key, text in parts.items() if key != free)


def _image(images: Mapping[str, str], kind: str, alt: str) -> list[str]:
    """The figure `kind` as a Markdown image after a blank line, nothing where it was not made."""
    return ["", f"![{alt}]({images[kind]})"] if kind in images else []


# ------------------------------------------------------------------------------------------------------ tables


def _skipped_line(skipped: Mapping[str, int]) -> str:
    """The sentence on final runs that did not count, and why."""
    if not skipped:
        return "Skipped: none (every final run FINISHED with a test accuracy)."
    listed = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    return f"Skipped {sum(skipped.values())} final run(s) (only FINISHED final runs count): {listed}."


def _main_table(report: DatasetReport) -> list[str]:
    """One line per sweep: label, space, seeds, mean ± std, per seed, validation, paper, Δ, command."""
    if not report.rows:
        return ["No finished final runs yet."]
    lines = ["| run | space | seeds | test acc. (%) | per seed (%) | val acc. (%) | mixing (% epoch / batch) | "
             "synthetic recognised (%) | paper (%) | Δ (pp) | published row | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report.rows:
        per_seed = ", ".join(f"{t:.2f} (seed {s})" for s, t in zip(row.seeds, row.tests, strict=True))
        paper = row.paper.accuracy if row.paper else None
        delta = DASH if paper is None else f"{row.test_mean - paper:+.2f}"
        lines.append(f"| {row.label} | {row.space or DASH} | {len(row.tests)} | {_mean_std(row)} | {per_seed} | "
                     f"{pct(row.val_mean)} | {_mixing_cell(row)} | {pct(row.recognised, 0)} | "
                     f"{DASH if paper is None else f'{paper:g}'} | "
                     f"{delta} | {_published(row)} | {_command_cell(row)} |")
    return lines


def _loss_table(ab: Ablations) -> list[str]:
    """Table 2 style, with real only first: terms used, accuracy, measured regularisers, paper, command."""
    lines = [f"### Loss ablation (Table 2 style): {_setting_text(ab.setting, '')}", "",
             "| row | CE on synthetic | discrepancy | robustness | seeds | test acc. (%) | measured discrepancy | "
             "measured robustness | mixing (% epoch / batch) | paper (%) | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for baseline, label, synthetic, disc, rob in LOSS_ROWS:
        row = ab.loss.get(baseline)
        if row is None:
            continue
        paper = next((c for c in row.reference if c.table == "2"), row.paper)
        lines.append(f"| {label} | {_yes(synthetic)} | {_yes(disc)} | {_yes(rob)} | {len(row.tests)} | "
                     f"{_mean_std(row)} | {num(row.measured.get(MEASURED[0]))} | "
                     f"{num(row.measured.get(MEASURED[1]))} | {_mixing_cell(row)} | "
                     f"{f'{paper.accuracy:g}' if paper else DASH} | "
                     f"{_command_cell(row)} |")
    verdict = loss_verdict(ab.loss)
    return lines + (["", verdict] if verdict else [])


def _axis_table(title: str, what: str, fixed: str, entries: Sequence[tuple[str, SweepRow]]) -> list[str]:
    """An ablation along one axis: a line per value (`what`), with its run, seeds, accuracy and command."""
    lines = [f"### {title}: {fixed}", "", f"| {what} | run | seeds | test acc. (%) | measured discrepancy | "
             "measured robustness | mixing (% epoch / batch) | command |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {value} | {row.label} | {len(row.tests)} | {_mean_std(row)} | "
              f"{num(row.measured.get(MEASURED[0]))} | {num(row.measured.get(MEASURED[1]))} | {_mixing_cell(row)} | "
              f"{_command_cell(row)} |"
              for value, row in entries]
    return lines


def _ablation_sections(ab: Ablations, images: Mapping[str, str]) -> list[str]:
    """Each ablation table with 2+ rows, then its figure where one was made."""
    sections: list[list[str]] = []
    if len(ab.loss) >= 2:
        sections.append(_loss_table(ab) + _image(images, "figure2", "Figure 2: measured regularisers per epoch"))
    if len(ab.regions) >= 2:
        sections.append(_axis_table("Regions", "regions", f"method, {_setting_text(ab.setting, 'regions')}",
                                    [(regions_label(r.regions), r) for r in ab.regions])
                        + _image(images, "regions", "accuracy vs regions"))
    if len(ab.presets) >= 2:
        sections.append(_axis_table("Loss preset", "loss.preset", f"method, {_setting_text(ab.setting, 'loss_preset')}",
                                    [(r.loss_preset, r) for r in ab.presets]))
    if len(ab.features) >= 2:
        sections.append(_axis_table("Region features", "partition.features",
                                    f"method, {_setting_text(ab.setting, 'features')}",
                                    [(r.features, r) for r in ab.features]))
    if len({r.synthetic for r in ab.synthetic}) >= 2:
        sections.append(_axis_table("Synthetic set", "synthetic set (recognised %)",
                                    _setting_text(ab.setting, "synthetic"),
                                    [(f"{r.synthetic} ({pct(r.recognised, 0)}) · {r.baseline}", r)
                                     for r in ab.synthetic]))
    if len({r.shots for r in ab.shots}) >= 2:  # method and real-only at one number of shots: no axis
        sections.append(_axis_table("Shots", "shots", _setting_text(ab.setting, "shots"),
                                    [(f"{r.shots} ({r.baseline})", r) for r in ab.shots]))
    return [line for section in sections for line in ["", *section]]


# -------------------------------------------------------------------------------------------------------- page


def render_dataset(report: DatasetReport, links: Mapping[str, str]) -> list[str]:
    """A dataset's section: its CSV, the per-sweep table, skipped runs, the ablations, the sample grids.

    `links` maps "csv" and each figure made ("figure2", "regions", "samples") to its path relative to the page.
    """
    lines = [f"## {report.dataset}", ""]
    if "csv" in links:
        lines += [f"Per sweep as CSV: [{links['csv']}]({links['csv']})", ""]
    lines += _main_table(report) + ["", _skipped_line(report.skipped)]
    lines += _ablation_sections(ablations(report.rows), links)
    if "samples" in links:
        lines += ["", "### Synthetic samples beside the real shots", "",
                  "A row per class: the real shots the generator was trained on, then its images (the method "
                  "row's sweep run, artifacts `synthetic/real_shots.png` and `synthetic/samples.png`).",
                  *_image(links, "samples", "real shots and synthetic samples")]
    return lines


def render_markdown(reports: Mapping[str, DatasetReport], command: str, uri: str, experiment: str,
                    links: Mapping[str, Mapping[str, str]]) -> str:
    """The results page: how to regenerate it, the store, then a section per dataset (see `render_dataset`)."""
    lines = ["# fsynth results", "", f"Regenerate: `{command}`", "",
             f"Tracking URI: `{redact(uri)}` (experiment `{experiment}`)", "", NOTE]
    for name, report in reports.items():
        lines += ["", *render_dataset(report, links.get(name, {}))]
    return "\n".join(lines) + "\n"


def _csv_line(row: SweepRow) -> dict[str, object]:
    """A row's CSV fields (accuracies in %, per-seed values ';'-joined, empty where there is no number)."""
    paper = row.paper
    return {
        "dataset": row.dataset, "sweep": row.sweep, "space": row.space, "baseline": row.baseline,
        "preset": row.preset, "loss_preset": row.loss_preset, "regions": regions_label(row.regions),
        "shots": row.shots, "label": row.label, "seeds": len(row.tests),
        "test_mean": f"{row.test_mean:.4f}", "test_std": "" if row.test_std is None else f"{row.test_std:.4f}",
        "test_per_seed": ";".join(f"{t:.4f}" for t in row.tests), "seed_ids": ";".join(row.seeds),
        "val_mean": "" if row.val_mean is None else f"{row.val_mean:.4f}",
        **{f"measured_{k.split('/')[1]}": f"{row.measured[k]:.6g}" if k in row.measured else "" for k in MEASURED},
        **{f"mixing_{k.split('/')[1]}": f"{row.measured[k]:.4g}" if k in row.measured else "" for k in MIXING},
        "features": row.features, "synthetic": row.synthetic,
        "synthetic_recognised": "" if row.recognised is None else f"{row.recognised:.2f}",
        "paper": "" if paper is None else f"{paper.accuracy:g}", "paper_row": "" if paper is None else paper.label,
        "paper_other": ";".join(f"{c.label}={c.accuracy:g}" for c in row.reference[1:]),
        "command": row.command, "parent_run": row.parent_run_id,
    }


def render_csv(report: DatasetReport) -> str:
    """One CSV line per sweep (accuracies in %, per-seed values ';'-joined, empty where there is no number)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow(_csv_line(row))
    return out.getvalue()


# ------------------------------------------------------------------------------------------------------- files


def page_folder(out: Path) -> Path:
    """The folder beside the page `out` that holds its CSVs and, under img/, its figures (<out stem>/)."""
    return out.parent / out.stem


def write_report(reports: Mapping[str, DatasetReport], out: Path, command: str, uri: str, experiment: str,
                 figures: Mapping[str, Mapping[str, Path]]) -> list[Path]:
    """Write the page `out` and beside it <out stem>/<dataset>.csv, linking each dataset's `figures` (kind ->
    file, already written); return the paths, each dataset's CSV then its figures, the page last."""
    folder = page_folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    written, links = [], {}
    for name, report in reports.items():
        table = folder / f"{name}.csv"
        table.write_text(render_csv(report), encoding="utf-8")
        made = figures.get(name, {})
        written += [table, *made.values()]
        links[name] = {kind: path.relative_to(out.parent).as_posix() for kind, path in {"csv": table, **made}.items()}
    out.write_text(render_markdown(reports, command, uri, experiment, links), encoding="utf-8")
    return [*written, out]
