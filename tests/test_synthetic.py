"""The synthetic set on disk: seeds, ids, the prompt table and its groups, set folders, files, manifest, grid."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fsynth.data.fewshot import MANIFEST_COLUMNS
from fsynth.errors import ConfigError, FsynthError
from fsynth.synthetic import (
    PROMPT_COLUMNS,
    SYNTHETIC_COLUMNS,
    finish_synthetic_set,
    generate_group,
    image_seed,
    load_synthetic_manifest,
    missing_groups,
    plan_rows,
    prepare_synthetic_set,
    read_prompt_table,
    run_groups_direct,
    shot_sources,
    write_synthetic_images,
    write_synthetic_manifest,
)

CLASSES = ("T-shirt/top", "Ankle boot")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_columns_extend_the_real_manifest():
    assert SYNTHETIC_COLUMNS[:6] == MANIFEST_COLUMNS[:6]
    assert set(MANIFEST_COLUMNS) - set(SYNTHETIC_COLUMNS) == {"split"}


def test_image_seed_is_stable_and_distinct():
    seed = image_seed("fashion-mnist", "Trouser", 3, 0)
    expected = int.from_bytes(hashlib.sha256(json.dumps(["fashion-mnist", "Trouser", 3, 0]).encode()).digest()[:8],
                              "big") >> 1
    assert seed == expected and 0 <= seed < 2**63
    others = {image_seed("fashion-mnist", "Trouser", 4, 0), image_seed("fashion-mnist", "Trouser", 3, 1),
              image_seed("fashion-mnist", "Dress", 3, 0), image_seed("dtd", "Trouser", 3, 0)}
    assert len(others | {seed}) == 5


def test_plan_rows():
    rows = plan_rows("fashion-mnist", CLASSES, "", 3, 7, "abcd", group_size=2)
    assert tuple(rows.columns) == PROMPT_COLUMNS and len(rows) == 6
    assert list(rows["group"]) == [0, 0, 1, 2, 2, 3]  # slices of one class, the last one short
    assert rows["sample_id"].is_unique
    assert rows["sample_id"].iloc[4] == "synthetic/fashion-mnist/abcd/Ankle boot/00001"
    assert rows["sample_id"].iloc[0] == "synthetic/fashion-mnist/abcd/T-shirt-top/00000"
    assert list(rows["label"]) == [0, 0, 0, 1, 1, 1] and set(rows["domain"]) == {"synthetic"}
    assert set(rows["index"]) == {-1} and set(rows["generator"]) == {"abcd"} and set(rows["path"]) == {""}
    assert rows["prompt"].iloc[0] == "a photo of a T-shirt/top"
    assert rows["seed"].iloc[5] == image_seed("fashion-mnist", "Ankle boot", 2, 7)
    assert rows["seed"].dtype == "int64"
    assert plan_rows("dtd", ["banded"], "texture", 1, 0, "f")["prompt"].iloc[0] == "a texture photo of a banded"


def test_source_shots_cycle_through_each_class_s_shots():
    rows = plan_rows("fashion-mnist", CLASSES, "", 5, 0, "abcd", sources={0: ["r/a", "r/b"], 1: ["r/c"]})
    assert list(rows["source_id"]) == ["r/a", "r/b", "r/a", "r/b", "r/a", "r/c", "r/c", "r/c", "r/c", "r/c"]
    assert set(plan_rows("fashion-mnist", CLASSES, "", 2, 0, "abcd")["source_id"]) == {""}  # text-to-image


def write_fewshot(folder, shots_per_class):
    """A few-shot folder's manifest: shots_per_class[c] train rows (ids out of order) and one val row per class."""
    rows = []
    for label, (name, n) in enumerate(zip(CLASSES, shots_per_class, strict=True)):
        rows += [(f"real/{label}/{i}", "", i, label, name, "real", "train", 0) for i in reversed(range(n))]
        rows.append((f"real/{label}/val", "", 9, label, name, "real", "val", 0))
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).to_parquet(folder / "manifest.parquet")
    return folder


def test_shot_sources_sorts_the_shots_and_refuses_a_class_without(tmp_path):
    by_label, samples, digest = shot_sources(write_fewshot(tmp_path / "ok", (3, 1)))
    assert by_label == {0: ["real/0/0", "real/0/1", "real/0/2"], 1: ["real/1/0"]}
    assert set(samples) == {"real/0/0", "real/0/1", "real/0/2", "real/1/0"} and len(digest) == 16
    for fewshot, needle in ((write_fewshot(tmp_path / "gap", (2, 0)), "class 'Ankle boot' has none in"),
                            (None, "no few-shot set was given")):
        with pytest.raises(ConfigError, match=needle) as err:
            shot_sources(fewshot)
        assert "\n" not in str(err.value) and "generator.init_from=noise" in str(err.value)


def test_a_set_from_before_the_source_column_reads_and_reopens(tmp_path):
    key, table, out = toy_set(tmp_path)
    run_groups_direct(ColourGenerator(), table, out, missing_groups(table, out))
    manifest = finish_synthetic_set(out, table)
    for path in (out / "prompts.parquet", manifest):  # as written before `source_id` existed
        pd.read_parquet(path).drop(columns="source_id").to_parquet(path)
    stamp = manifest.stat().st_mtime_ns
    assert prepare_synthetic_set(tmp_path, key, table) == out and set(read_prompt_table(out)["source_id"]) == {""}
    assert finish_synthetic_set(out, table) == manifest and manifest.stat().st_mtime_ns == stamp  # not rewritten
    assert tuple(load_synthetic_manifest(manifest).columns) == SYNTHETIC_COLUMNS


def test_zero_images_per_class_is_one_line_error():
    with pytest.raises(FsynthError) as err:
        plan_rows("fashion-mnist", CLASSES, "", 0, 0, "abcd")
    assert "\n" not in str(err.value) and "images_per_class" in str(err.value)


def test_write_and_load_round_trip(tmp_path):
    rows = plan_rows("fashion-mnist", CLASSES, "", 2, 0, "abcd")
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]
    written = write_synthetic_images(rows, images, tmp_path)
    assert written["path"].iloc[3] == str(tmp_path.resolve() / "Ankle boot" / "00001.png")
    with Image.open(written["path"].iloc[2]) as img:
        assert np.asarray(img)[0, 0, 0] == 80 and img.text["fsynth:sample_id"] == rows["sample_id"].iloc[2]
    path = write_synthetic_manifest(written, tmp_path)
    assert path == tmp_path.resolve() / "manifest.parquet"
    pd.testing.assert_frame_equal(load_synthetic_manifest(path), written[list(SYNTHETIC_COLUMNS)])
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_load_bad_manifest_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"sample_id": ["x"]}).to_parquet(bad)
    for path in (bad, tmp_path / "missing.parquet"):
        with pytest.raises(FsynthError) as err:
            load_synthetic_manifest(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)




class ColourGenerator:
    """A stand-in backend whose image of a row is a colour computed from its seed; counts the rows it made."""

    fingerprint = "colour"

    def __init__(self, fail_after: int | None = None):
        self.made: list[int] = []
        self.fail_after = fail_after

    def generate(self, rows):
        if self.fail_after is not None and len(self.made) >= self.fail_after:
            raise KeyboardInterrupt  # what a user's Ctrl-C looks like in the middle of a run
        self.made.extend(int(s) for s in rows["seed"])
        return [Image.new("RGB", (8, 8), (int(s) % 251, int(s) % 241, int(s) % 239)) for s in rows["seed"]]


def toy_set(tmp_path, n=5, group_size=2):
    key = {"dataset": "fashion-mnist", "backend": "colour", "n": n, "group_size": group_size}
    table = plan_rows("fashion-mnist", CLASSES, "", n, 0, "colour", group_size)
    return key, table, prepare_synthetic_set(tmp_path, key, table)


def test_set_folder_is_addressed_and_never_reused_for_other_prompts(tmp_path):
    key, table, out = toy_set(tmp_path)
    assert out.parent == tmp_path.resolve() and out.name.startswith("fashion-mnist-colour-")
    assert json.loads((out / "set.json").read_text()) == key
    assert prepare_synthetic_set(tmp_path, key, table) == out  # reopened
    other_key = {**key, "n": 4}
    assert prepare_synthetic_set(tmp_path, other_key, plan_rows("fashion-mnist", CLASSES, "", 4, 0, "colour", 2)) != out
    (out / "prompts.parquet").write_bytes(b"")  # replaced below by another table under the same address
    table.iloc[:3].to_parquet(out / "prompts.parquet")
    with pytest.raises(FsynthError, match="another prompt table") as err:
        prepare_synthetic_set(tmp_path, key, table)
    assert "\n" not in str(err.value)


def test_interrupted_run_resumes_with_exactly_the_missing_images(tmp_path):
    key, table, out = toy_set(tmp_path)
    groups = missing_groups(table, out)
    assert groups == sorted(table["group"].unique())
    with pytest.raises(KeyboardInterrupt):
        run_groups_direct(ColourGenerator(fail_after=4), table, out, groups)
    assert missing_groups(table, out) == groups[2:]  # two whole groups (4 images) were written before the stop
    corrupt = out / "T-shirt-top" / "00003.png"
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # a partial write
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.png") if p != corrupt}
    resumed = ColourGenerator()
    assert run_groups_direct(resumed, table, out, missing_groups(table, out)) == 7  # the corrupt one + 6 missing
    assert sorted(resumed.made) == sorted(table["seed"].iloc[2:])  # whole groups: 1 (corrupt) and 2..5
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # nothing valid is rewritten

    fresh_dir = tmp_path / "fresh"
    _, _, fresh = toy_set(fresh_dir)
    run_groups_direct(ColourGenerator(), table, fresh, missing_groups(table, fresh))
    for sid in table["sample_id"]:
        name = "/".join(sid.split("/")[-2:]) + ".png"
        assert (out / name).read_bytes() == (fresh / name).read_bytes()


def test_generate_group_writes_only_invalid_images(tmp_path):
    _, table, out = toy_set(tmp_path)
    rows = table[table["group"] == 0]
    first = generate_group(ColourGenerator(), rows, out)
    assert list(first["written"]) == [True, True]
    again = generate_group(ColourGenerator(), rows, out)
    assert list(again["written"]) == [False, False] and list(again["path"]) == list(first["path"])

    class Short(ColourGenerator):
        def generate(self, rows):
            return super().generate(rows)[:-1]

    with pytest.raises(FsynthError, match="one image per row"):
        generate_group(Short(), table[table["group"] == 1], out)


def test_finish_writes_manifest_joined_to_files_and_a_grid(tmp_path):
    _, table, out = toy_set(tmp_path)
    with pytest.raises(FsynthError, match="run the same command again") as err:
        finish_synthetic_set(out, table)
    assert "\n" not in str(err.value)
    run_groups_direct(ColourGenerator(), table, out, missing_groups(table, out))
    manifest = load_synthetic_manifest(finish_synthetic_set(out, table, grid_per_class=4))
    assert tuple(manifest.columns) == SYNTHETIC_COLUMNS and len(manifest) == 10
    for row in manifest.itertuples():
        with Image.open(row.path) as img:
            assert img.text["fsynth:sample_id"] == row.sample_id
    with Image.open(out / "samples.png") as grid:
        assert grid.size == (4 * 64, 2 * 64)


def test_finishing_a_finished_set_rewrites_nothing(tmp_path):
    _, table, out = toy_set(tmp_path)
    run_groups_direct(ColourGenerator(), table, out, missing_groups(table, out))
    manifest = finish_synthetic_set(out, table)
    stamps = {p.name: p.stat().st_mtime_ns for p in (manifest, out / "samples.png")}
    assert finish_synthetic_set(out, table) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in (manifest, out / "samples.png")} == stamps
    pd.DataFrame({"x": [1]}).to_parquet(manifest)  # a manifest that is not this set's is written again
    assert len(load_synthetic_manifest(finish_synthetic_set(out, table))) == len(table)
