"""`python -m fsynth.data list|prepare`, run as a user runs it; bad input exits 2 with one line."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fsynth.data.cli import main
from tests.data.fake_roots import make_root


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fsynth.data", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_list_shows_every_dataset_with_its_class_count():
    result = run("list")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:]}
    assert rows == {
        "imagenet": "1000", "caltech101": "100", "dtd": "47", "eurosat": "10", "fgvc_aircraft": "100",
        "oxford_pets": "37", "stanford_cars": "196", "sun397": "397", "food101": "101", "flowers102": "102",
        "fashion-mnist": "10", "folder": "any",
    }


def test_prepare_writes_the_manifest_and_datadream_layout(tmp_path):
    make_root("dtd", tmp_path / "data")
    out = tmp_path / "out"
    result = run("prepare", "--dataset", "dtd", "--root", str(tmp_path / "data"), "--shots", "2", "--seed", "3",
                 "--out", str(out), "--export-datadream")
    assert result.returncode == 0, result.stderr
    assert f"manifest: {out / 'manifest.parquet'}" in result.stdout
    frame = pd.read_parquet(out / "manifest.parquet")
    assert (frame.split == "train").sum() == 94 and set(frame.seed) == {3}
    assert len(list((out / "shot2_seed3" / "banded").iterdir())) == 2


def test_relative_paths_are_resolved(tmp_path, monkeypatch):
    make_root("eurosat", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--dataset", "eurosat", "--root", "data", "--shots", "1", "--out", "o"]) == 0
    frame = pd.read_parquet(tmp_path / "o" / "manifest.parquet")
    assert all(Path(p).is_absolute() for p in frame.path)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--dataset", "nope"], "error: unknown dataset 'nope'; known datasets: imagenet"),
        (["--dataset", "dtd", "--root", "{tmp}/missing"], "does not exist; pass --root DIR"),
        (["--dataset", "dtd", "--root", "{tmp}"], "DTD not found under"),
        (["--dataset", "eurosat", "--root", "{data}", "--shots", "0"], "data.shots must be at least 1, got 0"),
        (["--dataset", "eurosat", "--root", "{data}", "--shots", "9"],
         "fewer than the 9 shots asked (10 classes short); pass --shots 3 or fewer"),
        (["--dataset", "eurosat", "--root", "{data}", "--val-fraction", "1.5"], "data.val_fraction must lie in"),
    ],
)
def test_bad_input_is_one_line_and_status_2(tmp_path, args, expected):
    make_root("eurosat", tmp_path / "data")
    args = [a.format(tmp=tmp_path, data=tmp_path / "data") for a in args]
    result = run("prepare", *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_unreadable_image_is_one_line_and_status_2(tmp_path):
    make_root("eurosat", tmp_path / "data")
    for f in (tmp_path / "data" / "eurosat" / "2750" / "c000").iterdir():
        f.write_bytes(b"broken")
    result = run("prepare", "--dataset", "eurosat", "--root", str(tmp_path / "data"), "--shots", "1",
                 "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "error: cannot read image" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "manifest.parquet").exists()
