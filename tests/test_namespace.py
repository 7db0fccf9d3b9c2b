"""The code installs and imports as one namespace, ``pseudoseg`` (setup.cfg package_dir): nothing imports the folders
under their bare names (``tasks``, ``models``, ... collide with other projects' modules, and a module imported under
two names is two modules: two Luigi registries, two settings caches)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("pipeline", "tasks", "models", "schemas")


def python_files() -> list[Path]:
    return [p for folder in (*PACKAGES, "tests", "bench") for p in sorted((REPO / folder).rglob("*.py"))]


def bare_imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found += [n for n in names if n.split(".")[0] in PACKAGES]
    return found


def test_no_module_imports_a_package_by_its_bare_name():
    bad = {}
    for path in python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = bare_imports(tree)
        # code that tests hand to a subprocess as text (sitecustomize) is code too
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import " in node.value:
                try:
                    found += bare_imports(ast.parse(node.value.strip("\n")))
                except SyntaxError:
                    pass
        if found:
            bad[str(path.relative_to(REPO))] = found
    assert not bad


def test_the_cli_loads_only_namespaced_modules():
    code = ("import sys, pseudoseg.tasks.report.cli as cli, pseudoseg.tasks.stages.dag; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {PACKAGES!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------------ layers
def module_files() -> dict[str, Path]:
    """pseudoseg.<dotted name> → file, for every module of the package."""
    found = {}
    for folder in PACKAGES:
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found["pseudoseg." + ".".join(parts)] = path
    return found


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules ``path`` imports, wherever in the file (inside functions too), but for those under
    ``if TYPE_CHECKING:`` (never imported at run time)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    known = module_files()
    return {name: imported_modules(path, known) - {name} for name, path in known.items()}


def test_no_import_cycle_and_each_layer_imports_only_what_it_may():
    """No cycle among the package's modules (lazy imports included); the engine of tasks/ imports no stage and no
    report; pipeline/ never imports models/ at run time; schemas/ imports only schemas/; nothing outside
    models/adapters/ imports a private adapter module."""
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, name, dep])
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    rules = {  # importer prefix → forbidden prefixes
        "pseudoseg.tasks.engine": ("pseudoseg.tasks.stages", "pseudoseg.tasks.report"),
        "pseudoseg.tasks.stages": ("pseudoseg.tasks.report",),
        "pseudoseg.pipeline": ("pseudoseg.models", "pseudoseg.tasks"),
        "pseudoseg.schemas": ("pseudoseg.pipeline", "pseudoseg.models", "pseudoseg.tasks"),
        "pseudoseg.models": ("pseudoseg.tasks",),
    }
    bad = [f"{name} imports {dep}" for name, deps in graph.items() for dep in deps
           for prefix, forbidden in rules.items() if name.startswith(prefix) and dep.startswith(forbidden)]
    bad += [f"{name} imports the private {dep}" for name, deps in graph.items() for dep in deps
            if dep.startswith("pseudoseg.models.adapters._") and not name.startswith("pseudoseg.models.adapters")]
    assert not bad
