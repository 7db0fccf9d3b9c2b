"""The mutant table (tests/fidelity/mutants.py) is well-formed, so ``make fidelity`` fails only on a surviving mutant:
every original text occurs exactly once in its file, every named test exists, every mutant names a row of the
README's Fidelity table and is named in it, and every row has a mutant. Static checks (no test is run here)."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

from tests.fidelity.mutants import MUTANTS

REPO = Path(__file__).resolve().parents[2]


def fidelity_rows() -> dict[str, str]:
    """step → the whole table row, from the README's ``## Fidelity`` section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Fidelity\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("step", "") and not set(cells[0]) <= set("-"):
            rows[cells[0]] = line
    return rows


@cache
def defined_tests(path: str) -> frozenset[str]:
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    return frozenset(node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                     and node.name.startswith("test"))


def test_names_are_unique_and_each_mutant_changes_something():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names)) and all(re.fullmatch(r"[a-z0-9_]+", n) for n in names)
    assert all(m.original != m.replacement and m.tests for m in MUTANTS)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_original_text_occurs_exactly_once(mutant):
    path = REPO / mutant.file
    assert path.is_file(), mutant.file
    assert path.read_text(encoding="utf-8").count(mutant.original) == 1, \
        f"{mutant.name}: the original text must occur exactly once in {mutant.file}"


@pytest.mark.parametrize("mutant", [m for m in MUTANTS if m.file.endswith(".py")], ids=lambda m: m.name)
def test_mutated_python_still_parses(mutant):
    source = (REPO / mutant.file).read_text(encoding="utf-8")
    ast.parse(source.replace(mutant.original, mutant.replacement), mutant.file)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_named_tests_exist(mutant):
    for node in mutant.tests:
        path, _, name = node.partition("::")
        assert path.startswith("tests/") and (REPO / path).is_file(), node
        assert name.split("[")[0] in defined_tests(path), f"{mutant.name}: no test {node}"


def test_every_fidelity_row_has_a_mutant_named_in_it():
    rows = fidelity_rows()
    assert len(rows) >= 25
    by_row = {}
    for m in MUTANTS:
        assert m.row in rows, f"{m.name}: {m.row!r} is not a row of the README's Fidelity table"
        assert f"`{m.name}`" in rows[m.row], f"the README's {m.row!r} row does not name its mutant {m.name}"
        by_row.setdefault(m.row, []).append(m.name)
    assert set(by_row) == set(rows), f"rows without a mutant: {sorted(set(rows) - set(by_row))}"
