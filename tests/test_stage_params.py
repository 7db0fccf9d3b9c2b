"""Stage settings have one source of truth: each stage's frozen params object (pipeline/*/params.py) is read from
its luigi.cfg section, hashed whole into the stage folder and is what ``produce`` reads.

- every field of every stage's params changes the stage's folder hash when its value changes in the config (so a
  setting can never change the bytes of a stale folder);
- the shipped luigi.cfg repeats the dataclass defaults exactly (the two cannot drift apart);
- no stage module reads a settings section directly outside the params machinery (static check).
"""

from __future__ import annotations

import ast
import configparser
import dataclasses
from pathlib import Path

import pytest

from tasks.base import ShardTask, new_build
from tasks.settings import import_task_modules
from tests.helpers import REPO, luigi_settings, write_good_images


def _stage_classes() -> list[type[ShardTask]]:
    import_task_modules()
    found, todo = [], [ShardTask]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "params_type" in vars(cls) and not cls.__name__.endswith("Range"):
            found.append(cls)
    return sorted(found, key=lambda c: c.__name__)


STAGES = _stage_classes()


def _other_value(field: dataclasses.Field, value, tmp_path: Path):
    """A different valid value of ``field`` (inside its range / choices)."""
    meta = field.metadata
    if meta.get("choices"):
        return next(c for c in meta["choices"] if c != value)
    if meta.get("items"):
        return meta["items"][0] if value != meta["items"][0] else meta["items"][1]
    if meta.get("file") or meta.get("digest"):  # a side file, or a name/path hashed by content (a vocabulary)
        other = tmp_path / f"{field.name}.txt"
        other.write_text("another side file\n")
        return str(other)
    if meta.get("optional"):
        return "0.5" if value != "0.5" else "0.25"
    if isinstance(value, bool):
        return not value
    bounds = meta["range"]
    if isinstance(value, int):
        up = value + 1
        return up if up in bounds else value - 1
    if isinstance(value, float):
        for candidate in (value + 0.05, value - 0.05, value * 2 + 1):
            if candidate in bounds:
                return round(candidate, 6)
        raise AssertionError(f"no other value for {field.name}")
    return f"{value} changed"


def test_every_stage_declares_its_params():
    names = {c.__name__ for c in STAGES}
    assert {"CaptionShard", "ExpressionShard", "GroundShard", "BoxMaskShard", "SegmentNMSShard"} <= names
    assert {"ClipDenseShard", "DetectShard", "QueryPointMaskShard", "AutoMaskLabelShard", "PseudoLabelShard",
            "SamEmbedShard", "CaRLabelShard"} <= names


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.__name__)
def test_changing_any_setting_changes_the_stage_hash(cls, tmp_path):
    write_good_images(tmp_path / "images", 2)
    section = cls.section.get_task_family()

    def task():
        new_build()
        return cls(images=str(tmp_path / "images"), dataset="ds", out=str(tmp_path / "out"), shard=0)

    base = task()
    before = base.stage_dir.hash
    defaults = base.params
    assert dataclasses.asdict(base.params) == dataclasses.asdict(cls.params_type())  # luigi.cfg = the defaults
    for field in dataclasses.fields(cls.params_type):
        value = _other_value(field, getattr(defaults, field.name), tmp_path)
        with luigi_settings(**{section: {field.name: value}}):
            changed = task()
            assert str(getattr(changed.params, field.name)) == str(value)
            assert changed.stage_dir.hash != before, f"[{section}] {field.name} does not change {cls.__name__}'s hash"
    assert task().stage_dir.hash == before


def test_shipped_luigi_cfg_repeats_the_dataclass_defaults():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "luigi.cfg")
    from pipeline.features.sam_params import SamSharingParams
    from tasks.sam import sam_embeddings

    checked = 0
    # every stage's params, and the settings of a section that are no stage's ([sam_embeddings] share)
    for section_cls, params_type in [*((c.section, c.params_type) for c in STAGES),
                                     (sam_embeddings, SamSharingParams)]:
        section = section_cls.get_task_family()
        param = dict(section_cls.get_params())
        for field in dataclasses.fields(params_type):
            if not parser.has_option(section, field.name):
                continue
            shipped = param[field.name].normalize(param[field.name].parse(parser.get(section, field.name)))
            assert shipped == field.default, f"luigi.cfg [{section}] {field.name} = {shipped!r}, code: {field.default!r}"
            checked += 1
    assert checked >= 20


def test_stage_modules_read_settings_only_through_params():
    """A section's class (``use()``, ...) is called nowhere in the stage modules: settings reach ``produce``
    through ``self.params`` only."""
    sections = {c.section.__name__ for c in STAGES}
    offenders = []
    for path in sorted((REPO / "tasks").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in sections:
                offenders.append(f"{path.name}:{node.lineno} {node.func.id}()")
    assert not offenders, offenders
