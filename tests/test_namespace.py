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
    code = ("import sys, pseudoseg.tasks.cli as cli, pseudoseg.tasks.dag; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {PACKAGES!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
