"""Stage settings have one source of truth: each stage's frozen params object (pipeline/*/params.py,
models/training/params.py) is read from its luigi.cfg section, hashed into the stage folder and is what ``produce``
(a trainer's or Evaluate's ``run``) reads. Covered: every ``tasks.base.StageSettings`` task (shard stages, the ingest
plan, the trainers, Evaluate), each variant of a task whose settings follow a parameter.

- every field of every stage's params changes the stage's folder hash when its value changes in the config (so a
  setting can never change the bytes of a stale folder), except a field declared ``hashed=False``, which must not;
- the shipped luigi.cfg repeats the dataclass defaults exactly (the two cannot drift apart);
- no stage module reads a settings section directly outside the params machinery (static check).
"""

from __future__ import annotations

import ast
import configparser
import dataclasses
from pathlib import Path

import pytest

from pseudoseg.tasks.engine.base import ShardTask, StageSettings, new_build
from pseudoseg.tasks.engine.sections import section_of
from pseudoseg.tasks.stages.dag import stage_classes
from tests.helpers import REPO, luigi_settings, write_good_images

# Tasks whose settings depend on one of their parameters (``params_source``): every variant is checked.
VARIANTS: dict[str, list[dict[str, str]]] = {
    "FeaturesShard": [{"purpose": "use"}, {"purpose": "fmbseg"}],
    "Evaluate": [{"method": "car"}, {"method": "use_sam"}, {"method": "fmbseg"}],
}


def _stage_classes() -> list[type[StageSettings]]:
    """Every task class with settings: the shard stages, the ingest plan, the trainers, Evaluate."""
    stage_classes()  # every task module imported: every task class registered
    found, todo = [], [StageSettings]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls is StageSettings or cls.__name__.endswith("Range"):
            continue
        if "params_type" in vars(cls) or "params_source" in vars(cls):
            found.append(cls)
    return sorted(set(found), key=lambda c: c.__name__)


STAGES = _stage_classes()


def _task(cls: type[StageSettings], tmp_path: Path, **kwargs: str) -> StageSettings:
    common = {"images": str(tmp_path / "images"), "dataset": "ds", "out": str(tmp_path / "out")}
    if issubclass(cls, ShardTask):
        return cls(shard=0, **common, **kwargs)
    if cls.__name__ == "Evaluate":
        return cls(benchmark="voc21", data_root=str(tmp_path / "voc"), **common, **kwargs)
    return cls(**common, **kwargs)


CASES = [(cls, kwargs) for cls in STAGES for kwargs in VARIANTS.get(cls.__name__, [{}])]


def _case_id(case) -> str:
    cls, kwargs = case
    return cls.__name__ + "".join(f"-{v}" for v in kwargs.values())


def _sources(tmp_path: Path) -> list[tuple[type, type]]:
    """Every (params type, section) a task reads its settings from."""
    types = dict.fromkeys(_task(cls, tmp_path, **kwargs).params_source() for cls, kwargs in CASES)
    return [(params_type, section_of(params_type)) for params_type in types]


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
        if meta.get("check"):  # one the setting's check accepts: a caption file, or a box file (a list)
            other.write_text('[]' if field.name == "gt_boxes" else '{"images": [], "annotations": []}')
            meta["check"](str(other))
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
    assert {"UseCaptionsShard", "UseExpressionsShard", "UseBoxesShard", "UseBoxMasksShard", "UseSegmentsShard", "PlanIngest",
            "IngestShard", "FeaturesShard", "UseTextShard", "TrainUse", "TrainAlignment",
            "Evaluate"} <= names
    assert {c.__name__ for c in STAGES if "params_source" in vars(c)} <= set(VARIANTS), "add their variants"
    assert {"FmbsegDenseShard", "FmbsegDetectShard", "FmbsegQueryMasksShard", "FmbsegAutoMasksShard", "FmbsegLabelsShard",
            "SamEmbeddingsShard", "CarLabelsShard"} <= names


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_changing_any_setting_changes_the_stage_hash(case, tmp_path):
    """Every hashed field moves the folder; a field declared ``hashed=False`` (a trainer's loader workers, its
    checkpoint retention) is read but leaves the folder where it is (a run resumes across it)."""
    cls, kwargs = case
    write_good_images(tmp_path / "images", 2)

    def task():
        new_build()
        return _task(cls, tmp_path, **kwargs)

    base = task()
    params_type = base.params_source()
    section_class = section_of(params_type)
    section = section_class.get_task_family()
    before = base.stage_dir.hash
    defaults = base.params
    assert dataclasses.asdict(base.params) == dataclasses.asdict(params_type())  # luigi.cfg = the defaults
    for field in dataclasses.fields(params_type):
        value = _other_value(field, getattr(defaults, field.name), tmp_path)
        with luigi_settings(**{section: {field.name: value}}):
            changed = task()
            assert str(getattr(changed.params, field.name)) == str(value)
            if field.metadata.get("hashed", True):
                assert changed.stage_dir.hash != before, f"[{section}] {field.name} does not change {cls.__name__}'s hash"
            else:
                assert changed.stage_dir.hash == before, f"[{section}] {field.name} changes {cls.__name__}'s hash"
    assert task().stage_dir.hash == before


def test_shipped_luigi_cfg_repeats_the_dataclass_defaults(tmp_path):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "luigi.cfg")
    from pseudoseg.pipeline.car.params import CarSettings
    from pseudoseg.pipeline.features.params import SamSharingParams
    from pseudoseg.tasks.engine.sections import section

    checked = 0
    # every stage's params, and the settings of a section that are no stage's ([sam_embeddings] share, [car])
    for params_type, section_class in [*_sources(tmp_path), (SamSharingParams, section("sam_embeddings")),
                                             (CarSettings, section("car"))]:
        section = section_class.get_task_family()
        param = dict(section_class.get_params())
        for field in dataclasses.fields(params_type):
            assert parser.has_option(section, field.name), f"luigi.cfg [{section}] does not name {field.name}"
            shipped = param[field.name].normalize(param[field.name].parse(parser.get(section, field.name)))
            assert shipped == field.default, f"luigi.cfg [{section}] {field.name} = {shipped!r}, code: {field.default!r}"
            checked += 1
    assert checked >= 80


def test_car_settings_move_every_car_run(tmp_path):
    """[car] holds no stage's own params but every CaR run's (the label stage, Evaluate method=car): each of its
    settings moves both folders, and no other evaluation's."""
    from pseudoseg.pipeline.car.params import CarSettings

    write_good_images(tmp_path / "images", 2)
    classes = {c.__name__: c for c in STAGES}

    def hashes(**car):
        with luigi_settings(car=car):
            new_build()
            return (_task(classes["CarLabelsShard"], tmp_path).stage_dir.hash,
                    _task(classes["Evaluate"], tmp_path, method="car").stage_dir.hash,
                    _task(classes["Evaluate"], tmp_path, method="fmbseg").stage_dir.hash)

    before = hashes()
    for field in dataclasses.fields(CarSettings):
        other = _other_value(field, getattr(CarSettings(), field.name), tmp_path)
        labels, evaluate_car, evaluate_fmbseg = hashes(**{field.name: other})
        assert labels != before[0] and evaluate_car != before[1] and evaluate_fmbseg == before[2], field.name


def test_stage_modules_read_settings_only_through_params(tmp_path):
    """A section's class (``use()``, ``train_use()``, ...) is called nowhere in the stage modules: settings reach
    ``produce`` / ``run`` through ``self.params`` only."""
    sections = {section.__name__ for _, section in _sources(tmp_path)}
    offenders = []
    for path in sorted((REPO / "tasks").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in sections:
                offenders.append(f"{path.name}:{node.lineno} {node.func.id}()")
    assert not offenders, offenders
