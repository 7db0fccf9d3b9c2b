"""Every task `pseudoseg run NAME` accepts, declared once, beside its task class, with ``declare``: what it makes
(`pseudoseg stages` prints it) and, for a stage folder, what its counts count, what its rows are and its contract.

Two readings of the same declarations:
- ``stage_index()``: read from the stage modules' source (``ast``), without importing them — so a command can
  list the stages and check its arguments before any model library loads (the stage modules import torch);
- ``declared()``: the modules imported, each declaration with its task class (``stage_classes``, ``FullDAG``,
  the card's contracts).
The stage modules are the modules of this package, in ``BRANCHES`` order (upstream before downstream) and then any
other module of the package's ``__path__`` by name; within a module, in the order of its declarations.
tests/tasks/test_stage_catalog.py checks that both readings agree.
"""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pseudoseg.schemas import Contract

T = TypeVar("T", bound=type)

# The branch modules of this package, upstream before downstream: the DAG order of `pseudoseg stages`, the
# end-of-run table, run.json and the card.
BRANCHES = ("ingest", "models", "sam", "use", "export", "fmbseg", "car_labels", "features", "train", "evaluate",
            "dag")


@dataclass(frozen=True)
class Stage:
    """One task `pseudoseg run NAME` accepts: what it makes (`pseudoseg stages`) and, for one that writes a stage
    folder (``<out>/<dataset>/<folder>/<hash>/``, the snake_case of its name), what the end-of-run summary, run.json
    and the dataset card say of that folder: what its in/ok/rejected counts count (``counts``), what its rows are
    (``rows_are``) and the contract of its main table (None: not a table, or not known to ``stage_index``); whether
    ``FullDAG`` requires it (``full_dag``)."""

    name: str
    makes: str
    counts: str | None = None  # None: writes no stage folder of its own (a wrapper of other stages)
    rows_are: str = "rows"
    contract: Contract | None = None
    full_dag: bool = False

    @property
    def folder(self) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).lower()


_DECLARED: dict[str, tuple[Stage, type]] = {}


def declare(task: T | None = None, /, *, makes: str, counts: str | None = None, rows_are: str = "rows",
            contract: Contract | None = None, full_dag: bool = False) -> Any:
    """Declare ``task`` (the class `pseudoseg run` takes, named as its name) a stage: ``UseBoxes = declare(
    stage_wrapper(UseBoxesShard), makes=..., counts="captions", rows_are="boxes", contract=BOXES)``, or as a class
    decorator ``@declare(makes=...)``. Write the keywords as literals (``contract`` as a name): ``stage_index``
    reads them from the source."""
    def bind(cls: T) -> T:
        stage = Stage(cls.__name__, makes, counts, rows_are, contract, full_dag)
        cls.declaration = stage  # type: ignore[attr-defined]
        _DECLARED[stage.name] = (stage, cls)
        return cls

    return bind if task is None else bind(task)


def _stage_modules() -> list[tuple[str, Path]]:
    """(module name, source file) of every stage module, in DAG order (module docstring)."""
    from pseudoseg.tasks import stages

    found = {info.name: Path(info.module_finder.path) / f"{info.name}.py"  # type: ignore[union-attr]
             for info in pkgutil.iter_modules(stages.__path__) if not info.ispkg and info.name != "catalog"}
    order = [name for name in BRANCHES if name in found] + sorted(set(found) - set(BRANCHES))
    return [(f"{stages.__name__}.{name}", found[name]) for name in order]


def _declaration(call: ast.expr, name: str, where: str) -> Stage | None:
    """The Stage a ``declare(...)`` call (or decorator) in the source declares for ``name``; None if not one."""
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "declare"):
        return None
    literal = {k.arg: k.value for k in call.keywords if k.arg != "contract"}
    try:
        values = {key: ast.literal_eval(value) for key, value in literal.items()}
    except ValueError:
        raise TypeError(f"{where}: declare() of {name}: write makes / counts / rows_are / full_dag as literals") from None
    return Stage(name, **values)


def _declarations_in(source: Path) -> list[Stage]:
    found: list[Stage] = []
    for node in ast.parse(source.read_text(encoding="utf-8"), str(source)).body:
        if isinstance(node, ast.ClassDef):
            found += [s for d in node.decorator_list if (s := _declaration(d, node.name, str(source)))]
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            stage = _declaration(node.value, node.targets[0].id, str(source))
            found += [stage] if stage else []
    return found


@functools.lru_cache(maxsize=1)
def stage_index() -> tuple[Stage, ...]:
    """Every declared stage in DAG order, read from the stage modules' source (no import; ``contract`` None)."""
    return tuple(stage for _, source in _stage_modules() for stage in _declarations_in(source))


def declared() -> tuple[tuple[Stage, type], ...]:
    """(declaration, task class) of every stage in DAG order: the stage modules imported."""
    modules = _stage_modules()
    for name, _ in modules:
        importlib.import_module(name)
    index = stage_index()
    missing = [stage.name for stage in index if stage.name not in _DECLARED]
    if missing:
        raise TypeError(f"declared in the source but not at import: {', '.join(missing)}")
    return tuple(_DECLARED[stage.name] for stage in index)


def outputs() -> tuple[Stage, ...]:
    """The stages that write a folder, in DAG order (the summary's order)."""
    return tuple(stage for stage in stage_index() if stage.counts is not None)


def output_of(folder: str) -> Stage | None:
    """The stage writing ``folder``, None if none does."""
    return next((stage for stage in outputs() if stage.folder == folder), None)


def contract_of(folder: str) -> Contract | None:
    """The contract of the main table of the stage writing ``folder`` (imports the stage modules)."""
    return next((stage.contract for stage, _ in declared() if stage.folder == folder), None)
