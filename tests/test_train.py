"""`python -m fsynth.train`, run as a user runs it, on a tiny folder dataset with a tiny CLIP."""

import subprocess
import sys

import pytest

from tests.data.fake_roots import make_root

TINY = ["--set", "model.arch=tiny-clip", "--set", "model.pretrained=", "--set", "model.head=zeroshot",
        "--set", "model.image_size=32", "--set", "training.epochs=2", "--set", "training.batch_size=8",
        "--set", "data.shots=2", "--set", "data.val_per_class=0", "--set", "model.lora.rank=2"]


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fsynth.train", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_real_only_run_prints_val_and_test_and_resumes(tmp_path):
    make_root("folder", tmp_path / "data", per_class=8)
    args = ["--dataset", "folder", "--root", str(tmp_path / "data"), "--baseline", "real-only",
            "--out", str(tmp_path / "runs"), *TINY]
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch   1" in result.stdout and "test accuracy" in result.stdout
    finals = list((tmp_path / "runs").glob("folder-real-only-*/final/adapters.safetensors"))
    assert len(finals) == 1 and (finals[0].parent / "config.yaml").is_file()
    assert (finals[0].parent.parent / "result.json").is_file()
    again = run(*args, "--resume", cwd=tmp_path)  # every epoch is done: resuming only re-tests
    assert again.returncode == 0 and "resuming from epoch_0001" in again.stdout
    assert "epoch   0" not in again.stdout


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    make_root("folder", tmp_path / "data", per_class=8)
    base = ["--dataset", "folder", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]
    cases = [
        (["--baseline", "method"], "trains on synthetic images; pass --synthetic MANIFEST"),
        (["--baseline", "real-only", "--set", "training.lrr=1"], "unknown config key 'training.lrr'"),
        (["--baseline", "real-only", "--preset", "nope"], "unknown preset 'nope'"),
        (["--baseline", "method", "--synthetic", str(tmp_path / "none.parquet"), *TINY],
         "synthetic manifest"),
    ]
    from fsynth.cli import run_main
    from fsynth.train import main

    for extra, expected in cases:  # in-process: the CLI's own code path, without an interpreter start per case
        code = run_main(main, [*base, *extra])
        err = capsys.readouterr().err
        assert code == 2, (extra, err[-2000:])
        assert expected in err and len(err.strip().splitlines()) == 1, err


def test_result_carries_the_synthetic_set_s_quality(tmp_path):
    from fsynth.quality import write_quality
    from fsynth.train import synthetic_quality

    manifest = tmp_path / "set" / "manifest.parquet"
    assert synthetic_quality(None) is None and synthetic_quality(str(manifest)) is None
    write_quality(manifest.parent, {"frechet": 0.5, "encoder": "tiny-clip"})
    assert synthetic_quality(str(manifest)) == {"frechet": 0.5, "encoder": "tiny-clip"}
