"""One configuration: the code's defaults are the shipped luigi.cfg's values, and luigi.cfg names every setting, so
what a reader sees in the file is what runs when the file is not read (an embedding, a test) and the reverse."""

from __future__ import annotations

import configparser
import dataclasses

import pytest

from pseudoseg.models.registry import ModelSettings
from pseudoseg.tasks.engine.base import pseudoseg
from pseudoseg.tasks.engine.settings import SHIPPED_CONFIG
from pseudoseg.tasks.engine.throughput import throughput


@pytest.fixture(scope="module")
def shipped() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    assert parser.read(SHIPPED_CONFIG) == [str(SHIPPED_CONFIG)]
    return parser


def test_models_defaults_are_the_shipped_luigi_cfg(shipped):
    from_file = ModelSettings.from_mapping(dict(shipped.items("models")))
    assert from_file == ModelSettings()
    assert {f.name for f in dataclasses.fields(ModelSettings)} == set(shipped.options("models"))


@pytest.mark.parametrize("section_class", [pseudoseg, throughput])
def test_engine_sections_defaults_are_the_shipped_luigi_cfg(shipped, section_class):
    section = section_class.get_task_family()
    params = dict(section_class.get_params())
    assert set(params) == set(shipped.options(section))
    for name, param in params.items():
        assert param.normalize(param.parse(shipped.get(section, name))) == param.normalize(param._default), name
