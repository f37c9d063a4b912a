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
        (["--backend", "dalle"], "argument --backend: invalid choice: 'dalle'"),  # argparse's own check
    ]
    from fsynth.cli import run_main
    from fsynth.generate import main

    for extra, expected in cases:  # in-process: the CLI's own code path, without an interpreter start per case
        code = run_main(main, [*base, *extra])
        err = capsys.readouterr().err
        assert code == 2, (extra, err[-2000:])
        assert err.startswith("error: ") and err.count("\n") == 1, (extra, err)
        assert expected in err, (extra, err)


def _pngs(out) -> dict:
    """Every image the loader would take for done (visible *.png; temp files are hidden) -> its mtime."""
    return {p: p.stat().st_mtime_ns for p in out.glob("*/*/*.png")}


def _settled(out, quiet_s: float = 3.0) -> dict:
    """What the killed job left, once nothing has changed for `quiet_s` (an actor may outlive its driver by a
    group: it dies when it notices that its raylet is gone)."""
    import time

    last, since = _pngs(out), time.time()
    while time.time() - since < quiet_s:
        time.sleep(0.2)
        now = _pngs(out)
        if now != last:
            last, since = now, time.time()
    return last


def _kill_mid_run(proc, out, total: int, timeout: float = 300) -> dict:
    """SIGKILL the job (driver, Ray and actors: one process group) once some but not all images exist."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if total // 4 <= len(_pngs(out)) < total // 2:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return _settled(out)
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the job ended (exit {proc.poll()}) or timed out before it was half done")


@pytest.mark.slow
def test_a_generation_job_killed_mid_run_makes_only_the_missing_images_on_rerun(fashion, tiny, tmp_path, one_thread):
    import numpy as np
    from PIL import Image

    from fsynth import generate
    from fsynth.generation import run_generation_direct
    from fsynth.stages import ensure_fewshot
    from fsynth.synthetic import is_valid_png

    per_class, out = 8, tmp_path / "out"
    args = ["--dataset", "fashion-mnist", "--root", str(fashion), "--images-per-class", str(per_class), "--backend",
            "sd", "--no-quality", "--set", f"generator.model={tiny}", "--set", "generator.resolution=32", "--set",
            "generator.dtype=float32", "--set", "generator.finetune.enabled=false", "--set", "generator.steps=4",
            "--set", "generator.batch_size=2", "--set", "data.shots=2", "--set", "data.val_per_class=1",
            "--set", "resources.cpus_per_generator_actor=1", "--set", "resources.gpus_per_generator_actor=0"]
    total = 10 * per_class
    first = subprocess.Popen([sys.executable, "-m", "fsynth.generate", *args, "--actors", "1", "--out", str(out)],
                             cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    made = _kill_mid_run(first, out, total)
    assert not list(out.glob("*/manifest.parquet"))  # no manifest of an unfinished set
    assert all(is_valid_png(p) for p in _pngs(out))  # whatever was cut off mid-write is not a visible image

    again = run(*args, "--actors", "1", "--out", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    written = [line for line in again.stdout.splitlines() if "images done (" in line][-1]
    valid_before = sum(is_valid_png(p) for p in made)
    assert f"({total - valid_before} written)" in written  # only the missing images were made
    assert all(p.stat().st_mtime_ns == t for p, t in made.items() if is_valid_png(p))  # nothing made twice
    # Never interrupted: the same config made in this process, with one thread like the job's actor (CPU kernels
    # with other thread counts may round differently).
    fresh = tmp_path / "fresh"
    cfg = generate.resolve(generate.build_parser().parse_args([*args, "--out", str(fresh)]))
    run_generation_direct(cfg, ensure_fewshot(cfg, fresh / "fewshot"), fresh)
    resumed, clean = _pngs(out), _pngs(fresh)
    assert len(resumed) == len(clean) == total
    for path in clean:
        twin = out / path.relative_to(fresh)
        assert np.array_equal(np.asarray(Image.open(twin)), np.asarray(Image.open(path))), twin
    assert len(list(out.glob("*/manifest.parquet"))) == 1
