"""The layout is the rule: `fsynth/jobs/` alone imports `ray` or `mlflow`; the library imports neither, nor the jobs;
the CLIs call into the jobs without touching Ray or MLflow themselves; and no module imports itself back."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import fsynth

PACKAGE = Path(fsynth.__file__).parent
JOBS = "fsynth.jobs"
# The commands users run: they parse arguments and call into the library or the jobs.
CLIS = {"fsynth.tune", "fsynth.train", "fsynth.generate", "fsynth.report", "fsynth.data.cli", "fsynth.data.__main__"}
ORCHESTRATION_ROOTS = ("ray", "mlflow")


def module_files() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported_names(name: str, source: str, is_package: bool = False) -> set[str]:
    """Every module `source` imports, wherever the import stands (module level, inside a function, under
    TYPE_CHECKING): `from a import b` names `a.b` when that is a module of fsynth, else `a`."""
    known = module_files()
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            subs = {f"{base}.{alias.name}" for alias in node.names} & set(known)
            found |= subs or {base}
    return found


def imports_of(name: str, path: Path) -> set[str]:
    return imported_names(name, path.read_text(), path.name == "__init__.py")


def library_modules() -> list[str]:
    return [n for n in module_files() if not (n == JOBS or n.startswith(JOBS + ".")) and n not in CLIS]


def _offending(names: set[str], roots: tuple[str, ...]) -> list[str]:
    return sorted(i for i in names if i.split(".")[0] in roots or i == JOBS or i.startswith(JOBS + "."))


def test_the_scanner_sees_lazy_and_relative_imports():
    source = "def f():\n    import ray.tune\n\nif 1:\n    from ..jobs import sweep\nfrom mlflow import MlflowClient\n"
    found = imported_names("fsynth.data.cli", source)
    assert {"ray.tune", "fsynth.jobs.sweep", "mlflow"} <= found
    assert _offending(found, ORCHESTRATION_ROOTS) == ["fsynth.jobs.sweep", "mlflow", "ray.tune"]


def test_the_library_imports_neither_ray_mlflow_nor_the_jobs_anywhere():
    files = module_files()
    bad = {n: _offending(imports_of(n, files[n]), ORCHESTRATION_ROOTS) for n in library_modules()}
    assert {n: b for n, b in bad.items() if b} == {}
    assert {"fsynth.config", "fsynth.loop", "fsynth.loss", "fsynth.partition", "fsynth.data.fewshot"} <= set(bad)


def test_the_clis_call_into_the_jobs_but_import_no_ray_or_mlflow():
    files = module_files()
    direct = {n: sorted(i for i in imports_of(n, files[n]) if i.split(".")[0] in ORCHESTRATION_ROOTS) for n in CLIS}
    assert {n: d for n, d in direct.items() if d} == {}
    assert set(CLIS) <= set(files)


def test_every_job_module_is_orchestration():
    """A module in fsynth/jobs/ imports ray, mlflow or another job: pure code belongs in the library."""
    files = module_files()
    jobs = [n for n in files if n.startswith(JOBS + ".")]
    assert len(jobs) >= 5
    pure = [n for n in jobs if not _offending(imports_of(n, files[n]), ORCHESTRATION_ROOTS)]
    assert pure == []


def import_graph() -> dict[str, set[str]]:
    """fsynth module -> the fsynth modules it imports."""
    files = module_files()
    graph = {}
    for name, path in files.items():
        deps = set()
        for target in imports_of(name, path):
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter = counter + 1
        stack.append(root), on.add(root)
        while work:
            node, edges = work[-1]
            nxt = next((w for w in edges if w not in index or w in on), None)
            if nxt is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif nxt in index:
                low[node] = min(low[node], index[nxt])
            else:
                index[nxt] = low[nxt] = counter = counter + 1
                stack.append(nxt), on.add(nxt)
                work.append((nxt, iter(sorted(graph[nxt]))))
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_even_through_lazy_imports():
    assert cycles(import_graph()) == []


def test_pure_modules_import_without_ray_or_mlflow():
    """The same rule at run time: every library module imports with `ray` and `mlflow` blocked."""
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("ray", "mlflow"):
                    raise ImportError(f"blocked import of {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        for name in {library_modules()!r}:
            if not name.endswith("__main__"):
                importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow"))
        assert not leaked, leaked
        print("ok", len({library_modules()!r}))
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
    """A Tune trial and a Train controller import fsynth.jobs.sweep / fsynth.jobs.training (to build the trainer,
    to unpickle the worker's function and callbacks), two processes per Train run beside its worker, so they stay
    light, at import and when they name a Train run: the loop, the models and open_clip are imported by the Train
    worker alone."""
    script = ("import sys, fsynth.jobs.sweep, fsynth.jobs.training\n"
              "from fsynth.config import build_config\n"
              "cfg = build_config('embedded')\n"  # and what a trial calls: naming its Train run
              "name = fsynth.jobs.training.job_name(cfg, fewshot_dir='/a', synthetic_manifest='/b')\n"
              "assert name.startswith(cfg.data.dataset + '-'), name\n"
              "heavy = ('fsynth.loop', 'fsynth.models', 'fsynth.stages', 'fsynth.trainset', 'open_clip', 'timm')\n"
              "print(sorted(m for m in heavy if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
