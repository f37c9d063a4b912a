"""`python -m fsynth.generate`, run as a user runs it: the Ray job, the direct mode, and bad input."""

import subprocess
import sys

import pytest

from fsynth.generators.sd_random import write_random_sd
from tests.data.fake_roots import make_root

TOY = ["--set", "data.shots=2", "--set", "data.val_per_class=1", "--set", "generator.batch_size=2",
       "--set", "generator.steps=2", "--set", "generator.resolution=16", "--set", "generator.finetune.epochs=2",
       "--set", "generator.finetune.batch_size=4", "--set", "model.image_size=32",
        "--set", "resources.cpus_per_generator_actor=1"]


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fsynth.generate", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    return make_root("fashion-mnist", tmp / "data", per_class=4)


@pytest.mark.slow
def test_ray_job_prints_the_manifest_and_measures_quality(fashion, tmp_path):
    args = ["--dataset", "fashion-mnist", "--root", str(fashion), "--images-per-class", "2", "--out",
            str(tmp_path / "out"), "--actors", "1", *TOY]
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "preset embedded: ddpm backend, 2 images per class" in result.stdout
    manifest = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("manifest: ")]
    assert len(manifest) == 1 and manifest[0].endswith("manifest.parquet")
    set_dir = (tmp_path / "out").resolve()
    assert manifest[0].startswith(str(set_dir / "fashion-mnist-ddpm-"))
    quality = [line for line in result.stdout.splitlines() if line.startswith("quality: ")]
    assert quality and "frechet" in quality[0] and "centroid_distance" in quality[0]
    again = run(*args, "--direct", cwd=tmp_path)  # the same set, complete: nothing to make, same manifest
    assert again.returncode == 0 and "0 groups to make" in again.stdout
    assert f"manifest: {manifest[0]}" in again.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_random_sd(tmp_path_factory.mktemp("sd") / "tiny-sd", "tiny")


def test_direct_mode_with_the_sd_backend_on_a_local_pipeline(fashion, tiny, tmp_path):
    result = run("--dataset", "fashion-mnist", "--root", str(fashion), "--images-per-class", "1", "--backend", "sd",
                 "--direct", "--no-quality", "--out", str(tmp_path / "out"), "--set", f"generator.model={tiny}",
                 "--set", "generator.resolution=32", "--set", "generator.dtype=float32",
                 "--set", "generator.finetune.enabled=false", "--set", "data.shots=2", "--set",
                 "data.val_per_class=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "preset full: sd backend, 1 images per class" in result.stdout
    assert "fashion-mnist-sd-" in result.stdout and "quality:" not in result.stdout


def test_bad_input_is_one_line_and_status_2(fashion, tiny, tmp_path, capsys):
    base = ["--dataset", "fashion-mnist", "--root", str(fashion), "--out", str(tmp_path / "out"), "--direct",
            "--set", "data.shots=2", "--set", "data.val_per_class=1"]
    sd = ["--backend", "sd", "--set", "generator.finetune.enabled=false", "--set", "generator.dtype=float32"]
    not_a_lora = tmp_path / "lora.safetensors"
    not_a_lora.write_bytes(b"this is not a safetensors file")
    cases = [
        (["--images-per-class", "0"], "generator.images_per_class must be at least 1"),
        ([*sd, "--set", f"generator.model={tiny}", "--set", f"generator.lora_path={not_a_lora}",
          "--set", "generator.resolution=32"], str(not_a_lora)),
        ([*sd, "--set", f"generator.model={tmp_path / 'no-such-model'}"], "does not exist"),
        ([*sd, "--set", "generator.model=nobody/not-a-cached-model"], "nobody/not-a-cached-model"),
        (["--set", "generator.backend=dalle"], "must be one of 'sd', 'ddpm'"),
        (["--actors", "0"], "--actors must be at least 1"),
    ]
    from fsynth.cli import run_main
    from fsynth.generate import main

    for extra, expected in cases:  # in-process: the CLI's own code path, without an interpreter start per case
        code = run_main(main, [*base, *extra])
        err = capsys.readouterr().err
        assert code == 2, (extra, err[-2000:])
        assert err.startswith("error: ") and err.count("\n") == 1, (extra, err)
        assert expected in err, (extra, err)
    with pytest.raises(SystemExit) as exit_info:  # argparse's own check
        run_main(main, [*base, "--backend", "dalle"])
    assert exit_info.value.code == 2 and "invalid choice: 'dalle'" in capsys.readouterr().err
