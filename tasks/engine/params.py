"""Luigi parameters that say what they accept: integer / number ranges, an optional number, a plain name.

A range is declared where the parameter is declared (``IntParameter(default=1000, ge=1)``), checked by
``normalize`` (so a value from luigi.cfg, ``--set`` or Python is checked alike) and described by ``allowed()``:
``tasks.settings`` prints that text when a setting is out of range, before anything runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import luigi

from pseudoseg.pipeline.core.params import Range, StageParams


class _WithRange:
    """A declared range (``ge``/``gt``/``le``/``lt``, or a ``Range``) and ``allowed()``: "<kind> <range>"."""

    kind = "a value"

    def __init__(self, *args, ge=None, gt=None, le=None, lt=None, range_=None, **kwargs) -> None:
        self.range = range_ if range_ is not None else Range(ge, gt, le, lt)
        super().__init__(*args, **kwargs)

    def allowed(self) -> str:
        return f"{self.kind} {self.range.text}".strip()


class _Ranged(_WithRange):
    def normalize(self, x):
        x = super().normalize(x)
        if x is not None and x not in self.range:
            raise ValueError(f"{x!r} is not {self.allowed()}")
        return x


class IntParameter(_Ranged, luigi.IntParameter):
    """``luigi.IntParameter`` with an optional declared range, e.g. ``IntParameter(default=1000, ge=1)``."""

    kind = "an integer"


class FloatParameter(_Ranged, luigi.FloatParameter):
    """``luigi.FloatParameter`` with an optional declared range, e.g. ``FloatParameter(default=0.7, ge=0, le=1)``."""

    kind = "a number"


class OptionalFloatParameter(_WithRange, luigi.Parameter):
    """A number in a range, or empty ("use the default of something else"). The value stays a string (as a plain
    ``luigi.Parameter`` would), so content hashes do not change."""

    kind = "empty or a number"

    def normalize(self, x):
        x = super().normalize(x)
        if x is None or not str(x).strip():
            return x
        try:
            value = float(x)
        except ValueError:
            raise ValueError(f"{x!r} is not {self.allowed()}") from None
        if value not in self.range:
            raise ValueError(f"{x!r} is not {self.allowed()}")
        return x


class ItemsParameter(luigi.Parameter):
    """A comma list of known items, possibly empty ("use the default of something else"). The value stays the
    string as written (so content hashes do not change)."""

    def __init__(self, *args, items: tuple[str, ...] = (), **kwargs) -> None:
        self.items = tuple(items)
        super().__init__(*args, **kwargs)

    def allowed(self) -> str:
        return "empty or a comma list of " + " | ".join(self.items)

    def normalize(self, x):
        x = super().normalize(x)
        if x is None:
            return x
        if any(item.strip() not in self.items for item in str(x).split(",") if item.strip()):
            raise ValueError(f"{x!r} is not {self.allowed()}")
        return x


class AutoIntParameter(_WithRange, luigi.Parameter):
    """``auto`` or an integer in a declared range, e.g. ``AutoIntParameter(default="auto", ge=1)``; the value is
    the string ``"auto"`` or an int."""

    kind = "auto or an integer"

    def normalize(self, x):
        x = super().normalize(x)
        if isinstance(x, str) and x.strip().lower() == "auto":
            return "auto"
        try:
            value = int(str(x).strip())
        except ValueError:
            raise ValueError(f"{x!r} is not {self.allowed()}") from None
        if value not in self.range:
            raise ValueError(f"{x!r} is not {self.allowed()}")
        return value


class CheckedParameter(luigi.Parameter):
    """A string setting whose value a ``setting(check=fn)`` validates (e.g. that a side file is readable and of a
    layout the stage reads): ``fn(value)`` raises ValueError with one line, which ``allowed()`` then says."""

    def __init__(self, *args, check, **kwargs) -> None:
        self.check = check
        self.problem = ""
        super().__init__(*args, **kwargs)

    def normalize(self, x):
        x = super().normalize(x)
        try:
            self.check(x)
        except ValueError as e:
            self.problem = str(e)
            raise
        return x

    def allowed(self) -> str:
        return f"{self.description or 'a valid value'}: {self.problem}" if self.problem else \
            (self.description or "a valid value")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one folder name under the output root (None: it can)."""
    if not name or not name.strip():
        return "it is empty"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if name in (".", "..") or ".." in name:
        return "it contains '..'"
    if name != name.strip():
        return "it starts or ends with whitespace"
    return None


class NameParameter(luigi.Parameter):
    """A plain name used as one folder under the output root: no path separators, no '..'."""

    def allowed(self) -> str:
        return "a plain name (one folder under --out: no '/', '\\' or '..')"

    def normalize(self, x):
        x = super().normalize(x)
        problem = name_problem(str(x))
        if problem:
            raise ValueError(f"{x!r} is not {self.allowed()}: {problem}")
        return x


def parameter_of(field: dataclasses.Field) -> luigi.Parameter:
    """The Luigi parameter reading one ``setting`` field from its config section: type from the default, range,
    choices and help from the field."""
    meta, default = field.metadata, field.default
    common: dict[str, Any] = {"default": default, "description": meta.get("help") or None}
    if meta.get("choices"):
        return luigi.ChoiceParameter(choices=meta["choices"], var_type=str, **common)
    if meta.get("optional"):
        return OptionalFloatParameter(range_=meta["range"], **common)
    if meta.get("items"):
        return ItemsParameter(items=meta["items"], **common)
    if isinstance(default, bool):
        return luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING, **common)
    if isinstance(default, int):
        return IntParameter(range_=meta["range"], **common)
    if isinstance(default, float):
        return FloatParameter(range_=meta["range"], **common)
    if meta.get("check") is not None:
        return CheckedParameter(check=meta["check"], **common)
    return luigi.Parameter(**common)


def config_section(name: str, *params_types: type[StageParams], module: str,
                   **extra: luigi.Parameter) -> type[luigi.Config]:
    """The ``luigi.Config`` class of section ``[name]``: one parameter per field of the stages' params types (a field
    several stages share is declared identically in each: checked here) plus ``extra`` settings that change no
    stage's bytes (e.g. paths of side files read elsewhere)."""
    fields: dict[str, dataclasses.Field] = {}
    for params_type in params_types:
        for field in dataclasses.fields(params_type):
            seen = fields.setdefault(field.name, field)
            if (seen.default, dict(seen.metadata)) != (field.default, dict(field.metadata)):
                raise TypeError(f"[{name}] {field.name} is declared differently in {params_type.__name__}")
    attrs: dict[str, Any] = {key: parameter_of(f) for key, f in fields.items()}
    attrs.update(extra, params_types=params_types, __module__=module, __doc__=f"Section [{name}] of luigi.cfg: the fields of "
                 + ", ".join(t.__name__ for t in params_types) + ".")
    return type(name, (luigi.Config,), attrs)


def read_params(params_type: type[StageParams], section: luigi.Config) -> StageParams:
    """The stage's params object from its section's current values."""
    return params_type(**{f.name: getattr(section, f.name) for f in dataclasses.fields(params_type)})
