"""Where the README's Fidelity table says what we do with a setting, it writes the setting as ``default `[section]
key = value` `` and this test holds the code's default and the shipped luigi.cfg to that value: the table is the
reference, so a changed default (in either place) fails here until the row, with its reason, says so too."""

from __future__ import annotations

import configparser
import dataclasses
import re

from pseudoseg.models.registry import ModelSettings
from pseudoseg.tasks.engine.sections import SECTIONS
from pseudoseg.tasks.engine.settings import SHIPPED_CONFIG
from tests.fidelity.test_mutant_table import fidelity_rows

CLAIM = re.compile(r"default `\[(\w+)\] (\w+) = ([^`]+)`")


def stated() -> list[tuple[str, str, str, str]]:
    """(row, section, key, value) of every ``default `[section] key = value` `` in the Fidelity table."""
    return [(step, *m.groups()) for step, row in fidelity_rows().items() for m in CLAIM.finditer(row)]


def code_default(section: str, key: str) -> object:
    if section == "models":
        return getattr(ModelSettings(), key)
    for config in SECTIONS:
        if config.get_task_family() == section:
            for params_type in config.params_types:
                fields = {f.name: f for f in dataclasses.fields(params_type)}
                if key in fields:
                    return fields[key].default
    raise KeyError(f"[{section}] {key} is no setting")


def same(value: object, text: str, like: object = None) -> bool:
    """``value`` (of the type of ``like``, default its own; a luigi.cfg string is read as that type) equals the
    table's ``text``."""
    like = value if like is None else like
    if isinstance(like, bool):
        return str(value).strip().lower() == text.strip().lower()
    if isinstance(like, (int, float)):
        return float(value) == float(text)
    return str(value).strip() == text.strip()


def test_the_fidelity_table_states_the_defaults_the_code_and_luigi_cfg_have():
    claims = stated()
    assert len(claims) >= 10
    shipped = configparser.ConfigParser(interpolation=None)
    shipped.read(SHIPPED_CONFIG)
    for row, section, key, value in claims:
        default = code_default(section, key)
        assert same(default, value), f"{row}: the code's [{section}] {key} is not {value}"
        assert same(shipped.get(section, key), value, default), f"{row}: luigi.cfg's [{section}] {key} is not {value}"
