"""Every setting checked before anything runs: luigi.cfg (and LUIGI_CONFIG_PATH), ``--config FILE``, ``--set``.

The known sections and keys come from the code that reads them, never from a list kept here:

- every registered Luigi task family: our ``luigi.Config`` sections (``[ingest]``, ``[use]``, ...), task-parameter
  sections (``[Evaluate] benchmark``) and Luigi's own (``[core]``, ``[worker]``, ``[scheduler]``, ...), each key a
  parameter of that class (or a parameter's ``config_path`` alias);
- ``[models]``: the fields of ``models.registry.ModelSettings``;
- ``[resources]``: the pools tasks request (``tasks.base.RESOURCES``);
- ``[core]`` keys Luigi reads without a parameter (``LUIGI_RAW_CORE``: logging, range autoload, RPC retries).

A value is checked by its parameter's own ``parse`` + ``normalize`` (type, choices, and the ranges declared with
``tasks.params``), ``[models]`` values by ``models.registry.setting_problems``. Each problem is one line naming
the section, key, value, where it came from and what is allowed (or the closest known name); ``SettingsError``
carries them and the command exits with status 2.
"""

from __future__ import annotations

import configparser
import dataclasses
import difflib
import importlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import luigi
import luigi.configuration
from luigi.task_register import Register

from pseudoseg.models.registry import ModelSettings, setting_problems
from pseudoseg.tasks.engine.params import IntParameter
from pseudoseg.tasks.engine.shipped import DEMO_CONFIG, PACKAGE_ROOT, SHIPPED_CONFIG  # noqa: F401 (callers look here)

Check = Callable[[str], "str | None"]  # value → what is allowed (None: fine)

# [core] keys Luigi reads directly from the config, not through a parameter (luigi/setup_logging.py,
# luigi/__init__.py, luigi/rpc.py).
LUIGI_RAW_CORE: dict[str, luigi.Parameter] = {
    "no_configure_logging": luigi.BoolParameter(),
    "autoload_range": luigi.BoolParameter(),
    "rpc_connect_timeout": luigi.FloatParameter(),
    "rpc_retry_attempts": luigi.IntParameter(),
    "rpc_retry_wait": luigi.IntParameter(),
    "rpc_log_retries": luigi.BoolParameter(),
}


# Keys renamed so that one setting has one name in every section (segment-anything's names): an old key says its
# new name.
RENAMED_KEYS = {("use", "stability_thresh"): "stability_score_thresh", ("use", "box_nms_iou"): "box_nms_thresh"}


class SettingsError(Exception):
    """One or more bad settings; ``lines`` holds one message per problem."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")  # Luigi accepts dashed option names too


def allowed(param: luigi.Parameter, error: Exception) -> str:
    """What ``param`` accepts, in words."""
    if hasattr(param, "allowed"):
        return param.allowed()
    if isinstance(param, luigi.ChoiceParameter):
        return "one of " + " | ".join(str(c) if str(c) else "(empty)" for c in param._choices)
    if isinstance(param, luigi.BoolParameter):
        return "true or false"
    if isinstance(param, luigi.IntParameter):
        return "an integer"
    if isinstance(param, luigi.FloatParameter):
        return "a number"
    return f"a valid {type(param).__name__} value ({error})"


def param_check(param: luigi.Parameter) -> Check:
    def check(value: str) -> str | None:
        try:
            param.normalize(param.parse(value))
        except Exception as e:  # noqa: BLE001 — whatever the parameter refuses is a bad value
            return allowed(param, e)
        return None

    return check


# The modules declaring every luigi.Config section of ours: what a check of the usual settings needs. The task
# modules (which load model libraries) are imported only for a section none of these declares, e.g. a task's own
# parameters ([Evaluate] benchmark).
CONFIG_MODULES = ("pseudoseg.tasks.engine.base", "pseudoseg.tasks.engine.sections", "pseudoseg.tasks.engine.throughput")


def known_sections(load_tasks: Callable[[], object] | None = None) -> dict[str, dict[str, Check | None]]:
    """section → {key (underscored, lower case) → value check}; ``[models]`` values are checked together.
    Luigi's and our configuration sections (``CONFIG_MODULES``) and every task class registered so far;
    ``load_tasks`` (the caller's: the settings know no stage) imports every task module first."""
    from pseudoseg.tasks.engine.base import RESOURCES

    for module in CONFIG_MODULES:
        importlib.import_module(module)
    if load_tasks is not None:
        load_tasks()
    sections: dict[str, dict[str, Check | None]] = {}
    for family, cls in Register._get_reg().items():
        if cls is Register.AMBIGUOUS_CLASS:
            continue
        for name, param in cls.get_params():
            sections.setdefault(family, {})[_key(name)] = param_check(param)
            alias = getattr(param, "_config_path", None)
            if alias:
                sections.setdefault(alias["section"], {})[_key(alias["name"])] = param_check(param)
    sections.setdefault("core", {}).update({k: param_check(p) for k, p in LUIGI_RAW_CORE.items()})
    sections["models"] = {f.name: None for f in dataclasses.fields(ModelSettings)}
    sections["resources"] = {name: param_check(IntParameter(ge=0)) for name in RESOURCES}
    return sections


def closest(name: str, known: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.0)
    return match[0] if match else ""


@dataclasses.dataclass
class Origins:
    """Where each value came from, for the messages: ``--set`` or the last config file defining it."""

    sets: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)

    def __call__(self, section: str, option: str) -> str:
        if (section, _key(option)) in self.sets:
            return f"--set {self.sets[section, _key(option)]}"
        for path in reversed(config_paths()):
            parser = configparser.RawConfigParser(strict=False)
            try:
                parser.read(path)
            except configparser.Error:
                continue
            if parser.has_section(section) and any(_key(o) == _key(option) for o in parser.options(section)):
                return str(Path(path).resolve())
        return "the configuration"


    def where(self, section: str, option: str) -> str | None:
        """``--set ITEM``, or ``FILE:LINE`` of the last configuration file setting it; None: nobody set it."""
        if (section, _key(option)) in self.sets:
            return f"--set {self.sets[section, _key(option)]}"
        for path in reversed(config_paths()):
            line = _line_of(Path(path), section, option)
            if line is not None:
                return f"{Path(path).resolve()}:{line}"
        return None


def _line_of(path: Path, section: str, option: str) -> int | None:
    """The line of ``path`` that sets ``[section] option`` (the last one), if any."""
    found, current = None, None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for number, text in enumerate(lines, 1):
        stripped = text.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped[1:-1].strip()
        elif current == section and stripped and not stripped.startswith(("#", ";")) and not text[0].isspace():
            key = stripped.split("=", 1)[0].split(":", 1)[0]
            if _key(key) == _key(option):
                found = number
    return found


def effective_settings(origins: Origins, *, defaults_only: bool = False) -> list[tuple[str, str, str, str]]:
    """(origin, section, key, value) of every setting pseudoseg declares (its sections, ``[models]``,
    ``[resources]``) and of every other one the configuration sets (Luigi's ``[core]``, ...): the value in effect
    and where it came from (``FILE:LINE``, ``--set ...``, or ``default``: the code's). ``defaults_only``: the code's
    defaults, whatever the files say."""
    from pseudoseg.tasks.engine.sections import SECTIONS

    cfg = luigi.configuration.get_config()
    ours: dict[str, dict[str, str]] = {}
    for config in SECTIONS:
        ours[config.get_task_family()] = {name: str(param._default) for name, param in config.get_params()}
    for config_module in CONFIG_MODULES:
        importlib.import_module(config_module)
    for family in ("pseudoseg", "throughput"):
        cls = Register.get_task_cls(family)
        ours[family] = {name: str(param._default) for name, param in cls.get_params()}
    ours["models"] = {f.name: ",".join(f.default) if isinstance(f.default, tuple) else str(f.default)
                      for f in dataclasses.fields(ModelSettings)}
    rows = []
    for section, keys in ours.items():
        for key, default in keys.items():
            origin = None if defaults_only else origins.where(section, key)
            value = default if origin is None else cfg.get(section, key, raw=True)
            rows.append((origin or "default", section, key, value))
    if not defaults_only:
        for section in cfg.sections():
            if section in ours:
                continue
            for key in cfg.options(section):
                rows.append((origins.where(section, key) or "the configuration", section, key,
                             cfg.get(section, key, raw=True)))
    return rows




DATASET_SETTINGS = "settings.cfg"  # <out>/<dataset>/settings.cfg: what the dataset was made with
RUNTIME_MODEL_KEYS = ("device", "keep_loaded", "cache_dir")  # where and how models run: never recorded


def user_config_path() -> str | None:
    """The user's settings file: ``LUIGI_CONFIG_PATH`` (``PSEUDOSEG_USER_CONFIG`` once ``pseudoseg.tasks`` took it
    from Luigi: see its ``__init__``)."""
    return os.environ.get("LUIGI_CONFIG_PATH") or os.environ.get("PSEUDOSEG_USER_CONFIG") or None


def load_config_files(dataset_settings: Path | None = None) -> None:
    """The configuration every command starts from, the same wherever it runs: the shipped luigi.cfg, then the
    settings a dataset was made with (``dataset_settings``: its ``settings.cfg``), then the user's file named by
    ``LUIGI_CONFIG_PATH`` (if set). Luigi's own search of the working directory (``./luigi.cfg``, ``./client.cfg``)
    and of ``/etc/luigi/`` is replaced, so results never depend on the folder a command is typed in; a command's
    own files (``--config``, the demo's) are added by ``configure``."""
    paths = [str(SHIPPED_CONFIG)]
    if dataset_settings is not None and dataset_settings.is_file():
        paths.append(str(dataset_settings.resolve()))
    user = user_config_path()
    if user and os.path.isfile(user) and Path(user).resolve() != SHIPPED_CONFIG:
        paths.append(str(Path(user).resolve()))
    cls = luigi.configuration.LuigiConfigParser
    cls._config_paths = paths
    config = cls.instance()
    config.clear()  # what an earlier load read (Luigi read LUIGI_CONFIG_PATH and ./luigi.cfg at import)
    config.defaults().clear()
    try:
        cls.reload()
    except configparser.Error as e:  # a section or key written twice, a line that is no setting
        raise SettingsError([f"pseudoseg: {' '.join(str(e).split())}"]) from None


def content_settings() -> dict[str, dict[str, str]]:
    """The settings in effect that decide what a dataset's stages make (every stage section and ``[models]`` but
    where models run) and differ from the shipped luigi.cfg: section → key → value as written."""
    from pseudoseg.tasks.engine.sections import SECTIONS

    shipped = configparser.RawConfigParser()
    shipped.read(SHIPPED_CONFIG)
    cfg = luigi.configuration.get_config()
    found: dict[str, dict[str, str]] = {}
    for section in ["models", *(s.get_task_family() for s in SECTIONS)]:
        if not cfg.has_section(section):
            continue
        for key in cfg.options(section):
            if section == "models" and _key(key) in RUNTIME_MODEL_KEYS:
                continue
            value = cfg.get(section, key, raw=True)
            default = shipped.get(section, key, raw=True, fallback=None)
            if default is None or value.strip() != default.strip():
                found.setdefault(section, {})[_key(key)] = value.strip()
    return found


def write_dataset_settings(path: Path, values: dict[str, dict[str, str]]) -> None:
    """``<out>/<dataset>/settings.cfg``: ``values`` (``content_settings``), read by the next run on the dataset."""
    from pseudoseg.pipeline.core.artifacts import atomic_write_bytes

    lines = ["# The settings this dataset was made with that differ from the shipped luigi.cfg, written by the last",
             "# `pseudoseg run` / `demo` on it. Every later run on the dataset reads them right after luigi.cfg (so",
             "# `make export-coco`, `make preview` and one stage again give the same folders); your LUIGI_CONFIG_PATH",
             "# file, --config and --set still win, and --fresh-settings ignores this file.", ""]
    for section, keys in sorted(values.items()):
        lines.append(f"[{section}]")
        lines += [f"{key} = {value}" for key, value in sorted(keys.items())]
        lines.append("")
    body = "\n".join(lines).encode()
    if not path.is_file() or path.read_bytes() != body:
        atomic_write_bytes(path, body)


def config_paths() -> list[str]:
    """The config files Luigi read, in order (later ones win)."""
    cls = luigi.configuration.LuigiConfigParser
    return [p for p in cls._config_paths if os.path.isfile(p)]


def configure(config: str | None, sets: Iterable[str], presets: Sequence[str] = (),
              load_tasks: Callable[[], object] | None = None) -> Origins:
    """Read ``presets`` (a command's own config files, e.g. the demo's ``demo.cfg``), then ``--config``, apply
    ``--set`` items, then check every section and key (``problems``); SettingsError on any problem."""
    lines: list[str] = []
    env_path = user_config_path()
    if env_path and not os.path.isfile(env_path):
        lines.append(f"pseudoseg: LUIGI_CONFIG_PATH={env_path}: no such file")
    files = [(path, path) for path in presets] + ([(config, f"--config {config}")] if config else [])
    for path, name in files:
        if not Path(path).is_file():
            raise SettingsError(lines + [f"pseudoseg: {name}: no such file"])
        try:
            luigi.configuration.add_config_path(str(Path(path).resolve()))
        except configparser.Error as e:
            raise SettingsError(lines + [f"pseudoseg: {name}: not a config file: "
                                         f"{' '.join(str(e).split())}"]) from None
    cfg = luigi.configuration.get_config()
    origins = Origins()
    for item in sets:
        key, eq, value = item.partition("=")
        section, dot, option = key.strip().partition(".")
        if not (eq and dot and section and option.strip()):
            lines.append(f"pseudoseg: --set expects SECTION.KEY=VALUE, got {item!r}")
            continue
        option = option.strip()
        if not cfg.has_section(section):
            cfg.add_section(section)
        try:
            cfg.set(section, option, value)
        except ValueError as e:  # configparser's interpolation syntax ('%')
            lines.append(f"pseudoseg: --set {item}: {e}")
            continue
        origins.sets[section, _key(option)] = item
    lines += problems(cfg, origins, load_tasks)
    if lines:
        raise SettingsError(lines)
    return origins


def problems(cfg: configparser.ConfigParser, origin: Callable[[str, str], str],
             load_tasks: Callable[[], object] | None = None) -> list[str]:
    """One line per unknown section, unknown key or bad value in ``cfg``. ``load_tasks`` imports every task module:
    called only for a section the configuration modules do not declare and that may be a task's own ([Evaluate]:
    task families are CamelCase); a lower-case one is no task's: a typo, said at once."""
    known = known_sections()
    if load_tasks is not None and any(section not in known and not section.islower() for section in cfg.sections()):
        known = known_sections(load_tasks)
    lines: list[str] = []
    for section in cfg.sections():
        keys = known.get(section)
        if keys is None:
            first = next(iter(cfg.options(section)), "")
            lines.append(f"pseudoseg: unknown section [{section}] (from {origin(section, first)}); "
                         f"did you mean [{closest(section, known)}]?")
            continue
        values: dict[str, str] = {}
        for option in cfg.options(section):
            where = origin(section, option)
            if _key(option) not in keys:
                renamed = RENAMED_KEYS.get((section, _key(option)))
                lines.append(f"pseudoseg: [{section}] {option} (from {where}) is now called {renamed}" if renamed else
                             f"pseudoseg: unknown key {option} in [{section}] (from {where}); "
                             f"did you mean {closest(_key(option), keys)}?")
                continue
            try:
                value = cfg.get(section, option)
            except (configparser.Error, ValueError) as e:
                lines.append(f"pseudoseg: [{section}] {option} (from {where}): {' '.join(str(e).split())}")
                continue
            values[_key(option)] = value
            check = keys[_key(option)]
            what = check(value) if check else None
            if what:
                lines.append(f"pseudoseg: [{section}] {option} = {value!r} (from {where}): must be {what}")
        if section == "models":
            for key, what in setting_problems(values):
                lines.append(f"pseudoseg: [models] {key} = {values[key]!r} (from {origin(section, key)}): "
                             f"must be {what}")
    return lines
