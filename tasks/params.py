"""Luigi parameters that say what they accept: integer / number ranges, an optional number, a plain name.

A range is declared where the parameter is declared (``IntParameter(default=1000, ge=1)``), checked by
``normalize`` (so a value from luigi.cfg, ``--set`` or Python is checked alike) and described by ``allowed()``:
``tasks.settings`` prints that text when a setting is out of range, before anything runs.
"""

from __future__ import annotations

import luigi


class Range:
    """ge/gt/le/lt bounds (None = open); ``text`` is how settings errors print them."""

    def __init__(self, ge: float | None = None, gt: float | None = None, le: float | None = None,
                 lt: float | None = None) -> None:
        self.ge, self.gt, self.le, self.lt = ge, gt, le, lt

    def __contains__(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    @property
    def text(self) -> str:
        low = (f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None)
        high = (f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"≥ {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
        if high:
            return f"≤ {self.le:g}" if self.le is not None else f"< {self.lt:g}"
        return ""


class _Ranged:
    kind = "a value"

    def __init__(self, *args, ge=None, gt=None, le=None, lt=None, **kwargs) -> None:
        self.range = Range(ge, gt, le, lt)
        super().__init__(*args, **kwargs)

    def allowed(self) -> str:
        return f"{self.kind} {self.range.text}".strip()

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


class OptionalFloatParameter(luigi.Parameter):
    """A number in a range, or empty ("use the default of something else"). The value stays a string (as a plain
    ``luigi.Parameter`` would), so content hashes do not change."""

    def __init__(self, *args, ge=None, gt=None, le=None, lt=None, **kwargs) -> None:
        self.range = Range(ge, gt, le, lt)
        super().__init__(*args, **kwargs)

    def allowed(self) -> str:
        return f"empty or a number {self.range.text}".strip()

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


class AutoIntParameter(luigi.Parameter):
    """``auto`` or an integer in a declared range, e.g. ``AutoIntParameter(default="auto", ge=1)``; the value is
    the string ``"auto"`` or an int."""

    def __init__(self, *args, ge=None, gt=None, le=None, lt=None, **kwargs) -> None:
        self.range = Range(ge, gt, le, lt)
        super().__init__(*args, **kwargs)

    def allowed(self) -> str:
        return f"auto or an integer {self.range.text}".strip()

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
