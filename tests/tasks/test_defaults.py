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


def test_config_lists_every_setting_with_where_it_came_from(tmp_path, capsys):
    """`pseudoseg config`: every setting in effect, as `git config --list --show-origin` does: the shipped
    luigi.cfg's file:line, --set, a user's file; --defaults: the code's defaults."""
    from pseudoseg.tasks.engine.settings import load_config_files
    from pseudoseg.tasks.report.cli import main

    mine = tmp_path / "mine.cfg"
    mine.write_text("[fmbseg]\n# mine\ntop_k = 3\n")
    try:
        assert main(["config", "--config", str(mine), "--set", "use.box_threshold=0.1"]) == 0
        rows = {line.split("\t")[1].split("=", 1)[0]: line.split("\t") for line in capsys.readouterr().out.splitlines()}
        shipped = SHIPPED_CONFIG.read_text().splitlines()
        origin, setting = rows["ingest.shard_size"]
        number = int(origin.rsplit(":", 1)[1])
        assert origin.startswith(f"{SHIPPED_CONFIG}:") and shipped[number - 1].replace(" ", "") == "shard_size=1000"
        assert rows["fmbseg.top_k"] == [f"{mine.resolve()}:3", "fmbseg.top_k=3"]
        assert rows["use.box_threshold"] == ["--set use.box_threshold=0.1", "use.box_threshold=0.1"]
        assert {"models.preset", "pseudoseg.progress_seconds", "throughput.post_threads", "car.crf_image"} <= set(rows)
        assert main(["config", "--defaults", "--set", "use.box_threshold=0.1"]) == 0
        defaults = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
        assert {origin for origin, _ in defaults} == {"default"} and ["default", "use.box_threshold=0.05"] in defaults
    finally:
        load_config_files()  # the files every other test reads
