"""fsynth.paper against the real published-numbers file, and its refusals of malformed ones."""

import pytest

from fsynth.data.registry import list_specs
from fsynth.errors import ConfigError
from fsynth.paper import (
    DATASET_ALIASES,
    ENV_VAR,
    ablation_row,
    column_for_dataset,
    dataset_for_column,
    load_paper_tables,
    paper_accuracy,
    paper_tables_path,
    preset_of,
    reference_rows,
)


def _rows(cells):
    return [(c.label, c.accuracy) for c in cells]


# --------------------------------------------------------------------------------------------- the real file


def test_the_real_file_has_all_six_tables():
    tables = load_paper_tables()
    assert sorted(tables) == ["1", "2", "3", "4", "5", "6"]
    assert tables["3"].title == "CLIP ResNet-50"
    assert tables["1"].row_labels()[-2:] == ("Paper, lightweight", "Paper, full")
    assert len(tables["1"].cells) == 8 * 10  # eight methods x ten datasets; the Avg column is not a dataset
    assert tables["2"].row_labels() == tuple(ablation_row(d, r) for d, r in
                                             [(False, False), (False, True), (True, False), (True, True)])


@pytest.mark.parametrize(("dataset", "row", "table", "setting", "expected"), [
    ("imagenet", "CLIP zero-shot", "1", None, 70.2),
    ("dtd", "Paper, full", "1", None, 74.5),
    ("fgvc_aircraft", "Paper, lightweight", "1", None, 71.5),
    ("flowers102", "DataDream (per class)", "1", None, 99.4),
    ("stanford_cars", "real-FINETUNE", "1", None, 87.5),  # row labels ignore case
    ("fgvc_aircraft", ablation_row(True, False), "2", None, 74.8),
    ("eurosat", ablation_row(False, False), "2", None, 93.5),
    ("food101", "Paper", "3", None, 70.35),
    ("caltech101", "Real fine-tune", "3", None, 93.29),
    ("fgvc_aircraft", "paper", "4", 4, 51.6),
    ("flowers102", "DD", "4", 1, 88.7),
    ("caltech101", "paper", "5", None, 96.8),
    ("oxford_pets", "DD", "5", None, 94.0),
    ("dtd", "DD", "6", 300, 73.5),
    ("eurosat", "paper", "6", 100, 94.2),
])
def test_cells_read_from_the_file(dataset, row, table, setting, expected):
    assert paper_accuracy(dataset, row, table, setting=setting) == expected


def test_no_published_number_is_none():
    assert paper_accuracy("fashion-mnist", "Paper, full") is None
    assert paper_accuracy("folder", "Paper, full") is None
    assert paper_accuracy("imagenet", ablation_row(True, True), "2") is None  # Table 2 has four datasets
    assert paper_accuracy("dtd", "paper", "4", setting=4) is None
    assert paper_accuracy("fgvc_aircraft", "paper", "4", setting=2) is None


def test_unknown_table_or_row_is_an_error():
    with pytest.raises(ConfigError, match="no Table 9"):
        paper_accuracy("dtd", "Paper, full", "9")
    with pytest.raises(ConfigError, match="no row 'Paper, ful'.*Paper, full"):
        paper_accuracy("dtd", "Paper, ful")


def test_every_benchmark_of_the_registry_has_a_column():
    benchmarks = {s.name for s in list_specs()} - {"fashion-mnist", "folder"}
    assert benchmarks == set(DATASET_ALIASES)
    for name in benchmarks:
        assert dataset_for_column(column_for_dataset(name)) == name
    assert dataset_for_column("EuroSAT") == dataset_for_column("EuSAT") == "eurosat"
    assert column_for_dataset("fashion-mnist") is None and dataset_for_column("Avg") is None


# ------------------------------------------------------------------------------------------ run -> paper rows


def test_reference_rows_of_table_1_and_2():
    assert _rows(reference_rows("dtd", "method", "full")) == [("Table 1: Paper, full", 74.5),
                                                              (f"Table 2: {ablation_row(True, True)}", 74.5)]
    assert _rows(reference_rows("dtd", "method", "lightweight")) == [("Table 1: Paper, lightweight", 75.5)]
    assert _rows(reference_rows("dtd", "real-only", "full")) == [("Table 1: Real-finetune", 73.9)]
    assert _rows(reference_rows("eurosat", "zero-shot", "lightweight")) == [("Table 1: CLIP zero-shot", 38.1)]
    assert _rows(reference_rows("eurosat", "real-synthetic-ce")) == [
        ("Table 1: DataDream (per dataset)", 93.4), ("Table 1: DataDream (per class)", 93.8),
        (f"Table 2: {ablation_row(False, False)}", 93.5)]
    cars = "stanford_cars"
    assert _rows(reference_rows(cars, "discrepancy-only")) == [(f"Table 2: {ablation_row(True, False)}", 93.0)]
    assert _rows(reference_rows(cars, "robustness-only")) == [(f"Table 2: {ablation_row(False, True)}", 93.1)]
    assert reference_rows("stanford_cars", "robustness-only", "lightweight") == ()  # Table 2 is the full version
    assert reference_rows("imagenet", "discrepancy-only") == ()


def test_reference_rows_of_the_other_tables():
    assert _rows(reference_rows("fgvc_aircraft", "method", shots=4)) == [("Table 4: paper, shots 4", 51.6)]
    assert _rows(reference_rows("flowers102", "real-synthetic-ce", shots=8)) == [("Table 4: DD, shots 8", 98.4)]
    assert reference_rows("fgvc_aircraft", "real-only", shots=4) == ()
    assert _rows(reference_rows("food101", "synthetic-only")) == [("Table 5: paper", 89.2)]
    assert _rows(reference_rows("dtd", "method", images_per_class=200))[0] == ("Table 6: paper, synth/class 200", 74.0)
    assert _rows(reference_rows("dtd", "method", images_per_class=500))[0] == ("Table 1: Paper, full", 74.5)
    assert _rows(reference_rows("fgvc_aircraft", "method", arch="RN50")) == [("Table 3: Paper", 82.67)]
    assert _rows(reference_rows("stanford_cars", "real-only", arch="RN50-quickgelu")) == [
        ("Table 3: Real fine-tune", 78.86)]


def test_reference_rows_without_published_numbers_are_empty():
    assert reference_rows("fashion-mnist", "method") == ()
    assert reference_rows("folder", "real-only") == ()
    assert reference_rows("dtd", "method", arch="efficientnet-lite0") == ()  # another backbone
    with pytest.raises(ConfigError, match="'embedded' has no published rows"):
        reference_rows("dtd", "method", "embedded")


def test_preset_of_params():
    assert preset_of({"partition.mode": "static", "generator.finetune.enabled": "True"}) == "full"
    assert preset_of({"partition.mode": "online", "generator.finetune.enabled": "True"}) == "lightweight"
    assert preset_of({"partition.mode": "single", "generator.finetune.enabled": "False"}) == "lightweight"


# ----------------------------------------------------------------------------------------- path and bad files

SMALL = """# Published numbers
## Table 1 — main
| method | DTD | EuSAT | Avg |
|---|---|---|---|
| Paper, full | 10.5 | | 10.5 |
"""


def test_path_argument_and_env_var(tmp_path, monkeypatch):
    small = tmp_path / "tables.md"
    small.write_text(SMALL)
    assert paper_accuracy("dtd", "Paper, full", path=small) == 10.5
    assert paper_accuracy("eurosat", "Paper, full", path=small) is None  # empty cell: not published
    monkeypatch.setenv(ENV_VAR, str(small))
    assert paper_tables_path() == small
    assert paper_accuracy("dtd", "Paper, full") == 10.5
    small.write_text(SMALL.replace("10.5 |", "11.5 |", 1))  # a changed file is read again
    assert paper_accuracy("dtd", "Paper, full") == 11.5


def test_missing_file_names_the_env_var(tmp_path):
    with pytest.raises(ConfigError, match=ENV_VAR):
        load_paper_tables(tmp_path / "nothing.md")


@pytest.mark.parametrize(("text", "message"), [
    ("# nothing here\n", "no '## Table N"),
    ("## Table 1 — x\n\njust prose\n", "expected a markdown table"),
    (SMALL.replace("| Paper, full | 10.5 | | 10.5 |", "| Paper, full | 10.5 | 10.5 |"), "has 3 cells, the header 4"),
    (SMALL.replace("10.5 |", "ten |", 1), "'ten' is not a number"),
    (SMALL + SMALL.split("\n", 1)[1], "appears twice"),
    (SMALL + "| Paper, full | 1 | 2 | 3 |\n", "two cells for row 'Paper, full'"),
    ("## Table 5 — synth\n| dataset | paper |\n|---|---|\n| Mars | 1.0 |\n", "unknown dataset 'Mars'"),
    ("## Table 7 — x\n| method | colour |\n|---|---|\n| a | 1.0 |\n", "no column names a dataset"),
    ("## Table 4 — shots\n| shots | AirC DD |\n|---|---|\n| one | 1.0 |\n", "shots 'one' is not a whole number"),
])
def test_malformed_files_are_one_line_errors(tmp_path, text, message):
    bad = tmp_path / "bad.md"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_paper_tables(bad)
    assert "\n" not in str(info.value)
    assert str(bad) in str(info.value) or "bad.md" in str(info.value)
