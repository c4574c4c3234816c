"""The package's shape: a fairseq-free core, thin fairseq glue of one registered component per file, imports that
point one way and never in a circle, scripts that use the installed package (docs/architecture.md)."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "fairseq_mmkd"
CORE = ("modules", "encoders", "d2v", "distill", "losses", "data", "retrieval")  # no fairseq, no glue
CORE_FILES = ("files", "testing.fixtures")
ENTRY_POINTS = ("retrieval.cli", "retrieval.__main__", "retrieval.pairs_cli")  # the retrieval CLI sits with what it runs, on top of it
GLUE = ("tasks", "models", "criterions", "optim", "runtime")
REGISTRATIONS = {"register_task": "tasks", "register_model": "models", "register_criterion": "criterions",
                 "register_optimizer": "optim"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_core(module: str) -> bool:
    rest = module.split(".", 1)[1] if "." in module else ""
    return (rest.split(".")[0] in CORE or rest in CORE_FILES) and rest not in ENTRY_POINTS


def imports_of(module: str) -> set:
    """Package modules ``module`` imports anywhere in its file (inside functions too): ``from pkg import name`` counts
    as importing the submodule ``pkg.name`` when there is one, else ``pkg``; the parent packages Python imports on the
    way are not counted (every module would then import the package root)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fairseq_mmkd":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in MODULES)
    return found - {module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_no_import_cycles():
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_check_sees_imports_inside_functions():
    assert "fairseq_mmkd.losses.regression" in GRAPH["fairseq_mmkd.distill.distiller"]  # imported in Distiller.loss


def test_the_core_never_imports_the_fairseq_glue_or_the_entry_points():
    wrong = {m: sorted(n for n in GRAPH[m] if not is_core(n) and n != "fairseq_mmkd")
             for m in GRAPH if is_core(m)}
    assert not {m: v for m, v in wrong.items() if v}, wrong


def test_the_core_imports_without_fairseq_hydra_or_omegaconf(tmp_path):
    """Every core module, imported in a process where fairseq, Hydra and OmegaConf cannot be imported."""
    core = [m for m in MODULES if is_core(m)]
    assert len(core) > 30
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in ("fairseq", "hydra", "omegaconf")))
    code = ("import importlib, traceback\nbad = []\n"
            f"for m in {core!r}:\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
            "print(repr(bad))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-3000:]


def test_one_registered_fairseq_component_per_file_named_after_it():
    seen = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in REGISTRATIONS \
                    and node.args and isinstance(node.args[0], ast.Constant):
                seen.setdefault(module, []).append((node.func.id, node.args[0].value))
    assert seen
    for module, registered in seen.items():
        assert len(registered) == 1, f"{module} registers {registered}"
        kind, name = registered[0]
        assert module == f"fairseq_mmkd.{REGISTRATIONS[kind]}.{name}", f"{kind}({name!r}) lives in {module}"


def test_glue_helpers_are_private_modules():
    """fairseq imports every module of a user dir's tasks/ and models/ whose name does not start with ``_``: helpers
    of those folders start with ``_``, so a listing shows the components."""
    for folder in ("tasks", "models", "criterions", "optim"):
        for path in (PACKAGE / folder).glob("*.py"):
            if path.name == "__init__.py" or path.name.startswith("_"):
                continue
            assert re.search(r"@register_(task|model|criterion|optimizer)\(", path.read_text()), path


@pytest.mark.parametrize("path", sorted((REPO / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_scripts_use_the_installed_package(path):
    """Scripts import the package (the editable install makes it importable), never tests/, and leave sys.path."""
    text = path.read_text()
    assert "sys.path" not in text, f"{path.name} edits sys.path"
    tree = ast.parse(text)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] in ("conftest", "tests") or m.startswith("test_")}, path.name


TEST_FILES = sorted((REPO / "tests").glob("*/test_*.py"))


def test_tests_are_grouped_by_area_and_share_helpers_through_conftest():
    """Every test file sits in an area folder; it imports another test file only from its own folder (what areas
    share lives in tests/conftest.py or fairseq_mmkd/testing), and no two files share a name (pytest's rootdir
    import mode needs unique basenames)."""
    assert not list((REPO / "tests").glob("test_*.py")), "test files belong in an area folder of tests/"
    assert len({p.name for p in TEST_FILES}) == len(TEST_FILES)
    crossing = []
    for path in TEST_FILES:
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        crossing += [f"{path.relative_to(REPO)} imports {m}" for m in sorted(names)
                     if m.startswith("test_") and not (path.parent / f"{m}.py").exists()]
    assert not crossing, crossing
