"""The maths stays pure: every pure module imports with `ray` and `mlflow` blocked."""

import subprocess
import sys
import textwrap
from pathlib import Path

import fsynth

PACKAGE = Path(fsynth.__file__).parent
# Orchestration modules (Ray, MLflow, their CLIs) are the only ones allowed to import ray or mlflow.
ORCHESTRATION = {"fsynth.tune", "fsynth.tracking", "fsynth.generate_job", "fsynth.train_job", "fsynth.cluster",
                 "fsynth.sweep", "fsynth.experiment", "fsynth.report"}


def pure_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if parts[-1] != "__main__" and not any(name == o or name.startswith(o + ".") for o in ORCHESTRATION):
            names.append(name)
    return names


def test_pure_modules_found():
    names = pure_modules()
    assert {"fsynth.config", "fsynth.data.registry", "fsynth.data.fewshot", "fsynth.prompts"} <= set(names)


def test_pure_modules_import_without_ray_or_mlflow():
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("ray", "mlflow"):
                    raise ImportError(f"blocked import of {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        for name in {pure_modules()!r}:
            importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow"))
        assert not leaked, leaked
        print("ok", len({pure_modules()!r}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


def test_blocker_really_blocks():
    script = (
        "import importlib.abc, sys\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'ray': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, B())\n"
        "import ray\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "blocked" in result.stderr


def test_the_trial_and_controller_side_of_training_imports_no_loop_models_or_open_clip():
    """A Tune trial and a Train controller import fsynth.sweep / fsynth.train_job (to build the trainer, to unpickle
    the worker's function and callbacks), two processes per Train run beside its worker, so they stay light: the
    loop, the models and open_clip are imported by the Train worker alone."""
    script = ("import sys, fsynth.sweep, fsynth.train_job\n"
              "heavy = ('fsynth.loop', 'fsynth.models', 'fsynth.stages', 'fsynth.trainset', 'open_clip', 'timm')\n"
              "print(sorted(m for m in heavy if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
