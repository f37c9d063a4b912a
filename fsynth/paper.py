"""The paper's published numbers (shared/reference/paper_tables.md) as tables, and which rows a run matches."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import fsynth
from fsynth.errors import ConfigError

ENV_VAR = "FSYNTH_PAPER_TABLES"
DEFAULT_PATH = Path(fsynth.__file__).resolve().parents[2] / "shared" / "reference" / "paper_tables.md"

# fsynth dataset name -> the short column name of Table 1, then every other spelling a table may use.
DATASET_ALIASES: dict[str, tuple[str, ...]] = {
    "imagenet": ("IN", "ImageNet"),
    "caltech101": ("CAL", "Caltech", "Caltech101", "Caltech-101"),
    "dtd": ("DTD", "Describable Textures"),
    "eurosat": ("EuSAT", "EuroSAT"),
    "fgvc_aircraft": ("AirC", "Aircraft", "FGVC Aircraft", "FGVC-Aircraft", "fgvc_aircraft"),
    "oxford_pets": ("Pets", "Oxford Pets", "OxfordPets", "oxford_pets"),
    "stanford_cars": ("Cars", "Stanford Cars", "StanfordCars", "stanford_cars"),
    "sun397": ("SUN", "SUN397"),
    "food101": ("Food", "Food101", "Food-101"),
    "flowers102": ("FLO", "Flowers", "Flowers102", "Oxford Flowers"),
}
_BY_ALIAS = {alias.lower(): name for name, aliases in DATASET_ALIASES.items() for alias in aliases}
SETTING_COLUMNS = ("shots", "synth/class")  # a table whose rows are settings (Table 4: shots, Table 6: images/class)
IGNORED_COLUMNS = ("avg", "average", "mean")
# Table 2's ablation: which regularisers each fsynth baseline keeps (discrepancy, robustness).
ABLATION: dict[str, tuple[bool, bool]] = {
    "real-synthetic-ce": (False, False),
    "robustness-only": (False, True),
    "discrepancy-only": (True, False),
    "method": (True, True),
}
_HEADING = re.compile(r"^##\s+Table\s+(\w+)\s*(?:[—–:-]+\s*(.*))?$")


@dataclass(frozen=True)
class PaperCell:
    """One published accuracy (%): `row` of table `table` for `dataset`, at `setting` (shots or images/class)."""

    table: str
    row: str
    dataset: str
    accuracy: float
    setting: int | None = None
    setting_column: str = ""  # the header of the setting column, e.g. 'shots' or 'synth/class'

    @property
    def label(self) -> str:
        """E.g. 'Table 1: Paper, full' or 'Table 4: paper, shots 4'."""
        extra = f", {self.setting_column} {self.setting}" if self.setting is not None else ""
        return f"Table {self.table}: {self.row}{extra}"


@dataclass(frozen=True)
class PaperTable:
    """One table of the file: its raw cells and the published accuracies read from them."""

    number: str
    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    cells: tuple[PaperCell, ...]

    def row_labels(self) -> tuple[str, ...]:
        """The distinct row labels, in file order."""
        return tuple(dict.fromkeys(c.row for c in self.cells))

    def lookup(self, row: str, dataset: str, setting: int | None = None) -> PaperCell | None:
        """The cell of `row` (case and spacing ignored) for `dataset` at `setting`, or None."""
        key = _norm(row)
        return next((c for c in self.cells if _norm(c.row) == key and c.dataset == dataset and c.setting == setting),
                    None)


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def dataset_for_column(name: str) -> str | None:
    """The fsynth dataset a column name stands for ('EuSAT' -> 'eurosat'), or None."""
    return _BY_ALIAS.get(_norm(name))


def column_for_dataset(dataset: str) -> str | None:
    """Table 1's short column name of an fsynth dataset ('eurosat' -> 'EuSAT'), or None when it has none."""
    aliases = DATASET_ALIASES.get(dataset)
    return aliases[0] if aliases else None


def ablation_row(discrepancy: bool, robustness: bool) -> str:
    """Table 2's row label for which regularisers are on."""
    return f"discrepancy {'yes' if discrepancy else 'no'}, robustness {'yes' if robustness else 'no'}"


def paper_tables_path(path: str | Path | None = None) -> Path:
    """Where the tables are read from: `path`, else $FSYNTH_PAPER_TABLES, else ../shared/reference beside the repo."""
    chosen = path or os.environ.get(ENV_VAR) or DEFAULT_PATH
    return Path(chosen).expanduser().resolve()


# ------------------------------------------------------------------------------------------------------ parsing


def _split_row(line: str) -> tuple[str, ...]:
    """'| a | b |' -> ('a', 'b')."""
    return tuple(cell.strip() for cell in line.strip().strip("|").split("|"))


def _is_separator(cells: tuple[str, ...]) -> bool:
    return all(re.fullmatch(r":?-{3,}:?", c) for c in cells)


def _number(text: str, where: str) -> float | None:
    """A cell's accuracy; '' is no number; anything else that is not a number is an error."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{where}: '{text}' is not a number; published accuracies are plain numbers such as "
                          "74.5 (leave the cell empty when there is none)") from None


def _flag(text: str, where: str) -> bool:
    """A yes/no cell of Table 2 (empty is no)."""
    if _norm(text) in ("yes", "y", "x", "✓"):
        return True
    if _norm(text) in ("", "no", "n", "-", "–"):
        return False
    raise ConfigError(f"{where}: '{text}' is neither yes nor empty")


def _row_label(header: tuple[str, ...], row: tuple[str, ...], labels: list[int], where: str) -> str:
    """A row's label: its `method` cell, Table 2's yes/no pair, else its first non-setting label cell."""
    named = {_norm(header[i]): row[i] for i in labels}
    if "method" in named:
        return named["method"]
    if "discrepancy" in named and "robustness" in named:
        return ablation_row(_flag(named["discrepancy"], where), _flag(named["robustness"], where))
    plain = [row[i] for i in labels if _norm(header[i]) not in SETTING_COLUMNS]
    if not plain:
        raise ConfigError(f"{where}: the row has no label column (method, discrepancy/robustness, ...)")
    return plain[0]


def _setting(header: tuple[str, ...], row: tuple[str, ...], labels: list[int], where: str) -> tuple[int | None, str]:
    """The row's setting (shots or images/class) and its column name, when the table has a setting column."""
    for i in labels:
        if _norm(header[i]) in SETTING_COLUMNS:
            try:
                return int(row[i]), header[i]
            except ValueError:
                raise ConfigError(f"{where}: {header[i]} '{row[i]}' is not a whole number") from None
    return None, ""


def _cells(number: str, header: tuple[str, ...], rows: list[tuple[str, ...]], where: str) -> list[PaperCell]:
    """The published accuracies of one table, whichever of the file's three layouts it has."""
    plain: dict[int, str] = {}  # column -> dataset
    compound: dict[int, tuple[str, str]] = {}  # column -> (dataset, row label), e.g. 'AirC DD'
    labels: list[int] = []
    for i, name in enumerate(header):
        head, _, tail = name.rpartition(" ")
        if dataset_for_column(name):
            plain[i] = dataset_for_column(name)
        elif head and dataset_for_column(head):
            compound[i] = (dataset_for_column(head), tail)
        elif _norm(name) not in IGNORED_COLUMNS:
            labels.append(i)
    by_dataset = [i for i in labels if _norm(header[i]) == "dataset"]
    cells = []
    for row in rows:
        at = f"{where}, row '{' | '.join(row)}'"
        if by_dataset:  # Table 5: one row per dataset, one column per method
            dataset = dataset_for_column(row[by_dataset[0]])
            if dataset is None:
                raise ConfigError(f"{at}: unknown dataset '{row[by_dataset[0]]}'; known: "
                                  f"{', '.join(a[0] for a in DATASET_ALIASES.values())}")
            cols, setting = {i: (dataset, header[i]) for i in labels if i not in by_dataset}, (None, "")
        else:
            setting = _setting(header, row, labels, at)
            label = _row_label(header, row, labels, at) if plain else ""  # compound columns carry their own
            cols = {**{i: (d, label) for i, d in plain.items()}, **compound}
        for i, (dataset, label) in cols.items():
            value = _number(row[i], f"{at}, column '{header[i]}'")
            if value is not None:
                cells.append(PaperCell(number, label, dataset, value, *setting))
    if not plain and not compound and not by_dataset:
        known = ", ".join(a[0] for a in DATASET_ALIASES.values())
        raise ConfigError(f"{where}: no column names a dataset (known column names: {known})")
    return cells


def _check_unique(table: PaperTable, where: str) -> None:
    seen = set()
    for c in table.cells:
        key = (_norm(c.row), c.dataset, c.setting)
        if key in seen:
            raise ConfigError(f"{where}: two cells for row '{c.row}', dataset {c.dataset}; each may appear once")
        seen.add(key)


def parse_paper_tables(text: str, source: str = "paper tables") -> dict[str, PaperTable]:
    """Every `## Table N — title` section of `text` with the markdown table under it, keyed by N."""
    tables: dict[str, PaperTable] = {}
    lines = text.splitlines()
    for n, line in enumerate(lines):
        match = _HEADING.match(line.strip())
        if not match:
            continue
        number, title = match.group(1), (match.group(2) or "").strip()
        where = f"{source}: Table {number} (line {n + 1})"
        block = []
        for follow in lines[n + 1:]:
            if follow.strip().startswith("#"):
                break
            if follow.strip().startswith("|"):
                block.append(_split_row(follow))
            elif block and follow.strip():
                break
        if len(block) < 3 or not _is_separator(block[1]):
            raise ConfigError(f"{where}: expected a markdown table (header, |---| line, rows) under the heading")
        header, rows = block[0], block[2:]
        for row in rows:
            if len(row) != len(header):
                raise ConfigError(f"{where}: row '{' | '.join(row)}' has {len(row)} cells, the header {len(header)}")
        if number in tables:
            raise ConfigError(f"{where}: Table {number} appears twice")
        table = PaperTable(number, title, header, tuple(rows), tuple(_cells(number, header, rows, where)))
        _check_unique(table, where)
        tables[number] = table
    if not tables:
        raise ConfigError(f"{source} holds no '## Table N — title' section with a markdown table; point "
                          f"{ENV_VAR} at the paper_tables.md of shared/reference")
    return tables


@lru_cache(maxsize=4)
def _parse_cached(text: str, source: str) -> dict[str, PaperTable]:
    return parse_paper_tables(text, source)


def load_paper_tables(path: str | Path | None = None) -> dict[str, PaperTable]:
    """The tables of the published-numbers file (see `paper_tables_path`), keyed by table number ('1'..'6')."""
    file = paper_tables_path(path)
    if not file.is_file():
        raise ConfigError(f"published numbers file {file} does not exist; set {ENV_VAR}=/path/to/paper_tables.md "
                          "(it lives in shared/reference beside the repository)")
    # Keyed by the text (a few KB, read every time): an edited file is parsed again, even within one mtime tick.
    return dict(_parse_cached(file.read_text(encoding="utf-8"), str(file)))


# ----------------------------------------------------------------------------------------------------- look-ups


def paper_accuracy(dataset: str, method_row: str, table: str = "1", *, setting: int | None = None,
                   path: str | Path | None = None) -> float | None:
    """The published accuracy (%) of `method_row` in `table` for an fsynth dataset; None when there is none.

    `setting` is the shots (Table 4) or synthetic images per class (Table 6). An unknown table or row label is an
    error (a typo would otherwise read as "not published"); a dataset the row has no number for is None.
    """
    tables = load_paper_tables(path)
    if str(table) not in tables:
        raise ConfigError(f"no Table {table} in {paper_tables_path(path)}; tables: {', '.join(tables)}")
    found = tables[str(table)]
    if _norm(method_row) not in {_norm(r) for r in found.row_labels()}:
        raise ConfigError(f"Table {table} has no row '{method_row}'; rows: {', '.join(found.row_labels())}")
    cell = found.lookup(method_row, dataset, setting)
    return cell.accuracy if cell else None


def preset_of(params: Mapping[str, str]) -> str:
    """'lightweight' or 'full': which paper variant a run's flattened config params follow.

    Lightweight = online regions or an un-tuned generator (the paper's lightweight recipe); anything else is
    compared with the full variant.
    """
    online = str(params.get("partition.mode", "")).lower() == "online"
    untuned = str(params.get("generator.finetune.enabled", "")).lower() == "false"
    return "lightweight" if online or untuned else "full"


def _backbone(arch: str) -> str:
    """'vit-b/16' (the paper's main backbone, also for ''), 'rn50' (Table 3) or '' (no published numbers)."""
    arch = _norm(arch)
    if not arch or arch.startswith("vit-b-16"):
        return "vit-b/16"
    if arch in ("rn50", "rn50-quickgelu"):
        return "rn50"
    return ""


def _wanted(baseline: str, preset: str, shots: int, images_per_class: int | None,
            backbone: str) -> list[tuple[str, str, int | None]]:
    """(table, row, setting) candidates for a run, most specific first."""
    if not backbone:
        return []
    if backbone == "rn50":
        rows = {"method": ["Paper"], "real-only": ["Real fine-tune"],
                "real-synthetic-ce": ["DataDream (per dataset)", "DataDream (per class)"]}
        return [("3", r, None) for r in rows.get(baseline, [])] if shots == 16 else []
    if baseline == "zero-shot":
        return [("1", "CLIP zero-shot", None)]
    if baseline == "synthetic-only":
        return [("5", "paper", None)]
    if shots != 16:
        return [("4", {"method": "paper", "real-synthetic-ce": "DD"}[baseline], shots)] \
            if baseline in ("method", "real-synthetic-ce") else []
    full = preset == "full"
    out: list[tuple[str, str, int | None]] = []
    if full and images_per_class not in (None, 500) and baseline in ("method", "real-synthetic-ce"):
        out.append(("6", "paper" if baseline == "method" else "DD", images_per_class))
    out += {"real-only": [("1", "Real-finetune", None)],
            "real-synthetic-ce": [("1", "DataDream (per dataset)", None), ("1", "DataDream (per class)", None)],
            "method": [("1", "Paper, full" if full else "Paper, lightweight", None)]}.get(baseline, [])
    if full and baseline in ABLATION:
        out.append(("2", ablation_row(*ABLATION[baseline]), None))
    return out


def reference_rows(dataset: str, baseline: str, preset: str = "full", *, shots: int = 16,
                   images_per_class: int | None = None, arch: str = "",
                   path: str | Path | None = None) -> tuple[PaperCell, ...]:
    """The published cells an fsynth run corresponds to, the closest first; () when nothing was published.

    `baseline` is an fsynth baseline name, `preset` 'full' or 'lightweight' (see `preset_of`), `arch` the
    open_clip architecture (ViT-B/16 → Tables 1, 2, 4-6; RN50 → Table 3; any other backbone → ()).
    """
    if preset not in ("full", "lightweight"):
        raise ConfigError(f"preset '{preset}' has no published rows; use 'full' or 'lightweight'")
    if dataset not in DATASET_ALIASES:
        return ()
    tables = load_paper_tables(path)
    found = []
    for table, row, setting in _wanted(baseline, preset, int(shots), images_per_class, _backbone(arch)):
        cell = tables[table].lookup(row, dataset, setting) if table in tables else None
        if cell is not None:
            found.append(cell)
    return tuple(found)
