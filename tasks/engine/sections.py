"""The sections of luigi.cfg that hold the stages' settings: one ``luigi.Config`` class each, generated from the
params dataclasses that name it (``section = "use"`` on the class; ``tasks.params.config_section``: the section's
keys are their fields). Found by walking the declarations: every ``StageParams`` subclass of the ``params`` modules
of ``pseudoseg.pipeline`` and ``pseudoseg.models``, and of any module imported since (a stage module may declare
its own). A task names only its params type; ``section_of`` says which section holds it."""

from __future__ import annotations

import configparser
import importlib
import pkgutil

import luigi

from pseudoseg.pipeline.core.params import StageParams
from pseudoseg.tasks.engine.params import config_section
from pseudoseg.tasks.engine.shipped import SHIPPED_CONFIG

PARAMS_PACKAGES = ("pseudoseg.pipeline", "pseudoseg.models")
_BUILT: dict[str, type[luigi.Config]] = {}  # section name → its class: each made once (Luigi registers it)


def _import_params_modules() -> None:
    for package_name in PARAMS_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            if info.name.rsplit(".", 1)[-1] == "params":
                importlib.import_module(info.name)


def _params_types() -> list[type[StageParams]]:
    """Every StageParams subclass that names its section, in definition order (subclasses after their base)."""
    found, stack = [], list(reversed(StageParams.__subclasses__()))
    while stack:
        cls = stack.pop()
        if "section" in vars(cls) and cls not in found:
            found.append(cls)
        stack.extend(reversed(cls.__subclasses__()))
    return found


def _shipped_order() -> list[str]:
    shipped = configparser.RawConfigParser()
    shipped.read(SHIPPED_CONFIG)
    return shipped.sections()


def sections() -> tuple[type[luigi.Config], ...]:
    """The section classes, in the shipped luigi.cfg's order (a section it lacks after, by name)."""
    grouped: dict[str, list[type[StageParams]]] = {}
    for params_type in _params_types():
        grouped.setdefault(params_type.section, []).append(params_type)  # type: ignore[attr-defined]
    for name, params_types in grouped.items():
        built = _BUILT.get(name)
        if built is None:
            _BUILT[name] = config_section(name, *params_types, module=__name__)
        elif built.params_types != tuple(params_types):
            raise TypeError(f"[{name}]: {', '.join(t.__name__ for t in params_types)} name it after its settings "
                            "were read: import a stage's params before its settings are used")
    order = _shipped_order()
    return tuple(sorted(_BUILT.values(), key=lambda s: (order.index(s.__name__) if s.__name__ in order
                                                       else len(order), s.__name__)))


def section(name: str) -> type[luigi.Config]:
    """The class of section ``[name]``."""
    return next(s for s in sections() if s.__name__ == name)


def section_of(params_type: type[StageParams]) -> type[luigi.Config]:
    """The section whose keys are ``params_type``'s fields."""
    built = _BUILT.get(vars(params_type).get("section", ""))
    if built is None or params_type not in built.params_types:
        built = section(params_type.section)  # type: ignore[attr-defined]
    return built


_import_params_modules()
SECTIONS = sections()  # the sections of pseudoseg's own params; ``sections()`` adds any declared since
