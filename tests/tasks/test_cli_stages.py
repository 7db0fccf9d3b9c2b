"""Every task a user may want is runnable by name (`pseudoseg run NAME`), and `pseudoseg stages` lists them in DAG
order with one line each (tasks.stages.catalog: declared once, beside each task)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from pseudoseg.tasks.engine.base import StageWrapper
from pseudoseg.tasks.report.cli import check, parser
from pseudoseg.tasks.stages.catalog import outputs, stage_index
from pseudoseg.tasks.stages.chained import ChainedShardTask
from pseudoseg.tasks.stages.dag import stage_classes

STAGES = stage_index()


def _all_subclasses(cls):
    out, pending = set(), [cls]
    while pending:
        for sub in pending.pop().__subclasses__():
            out.add(sub)
            pending.append(sub)
    return out


def test_every_stage_wrapper_trainer_and_export_is_runnable_by_name():
    names = [stage.name for stage in STAGES]
    assert len(names) == len(set(names))
    classes = stage_classes()
    wrappers = {c.__name__ for c in _all_subclasses(StageWrapper) if c.__module__.startswith("pseudoseg.tasks.")}
    assert wrappers <= set(classes)
    assert {"TrainAlignment", "TrainUse", "TextClasses", "Evaluate", "ExportCoco", "UsePreview",
            "FullDAG", "ModelProbe"} <= set(classes)


def test_stages_are_in_dag_order():
    """A stage wrapper comes after the wrappers of its shard task's upstreams (and after Ingest)."""
    order = {stage.name: i for i, stage in enumerate(STAGES)}
    classes = stage_classes()
    wrapper_of = {c.shard_task: name for name, c in classes.items()
                  if isinstance(c, type) and issubclass(c, StageWrapper)}
    checked = 0
    for name, cls in classes.items():
        if not (isinstance(cls, type) and issubclass(cls, StageWrapper)):
            continue
        shard = cls.shard_task
        if issubclass(shard, ChainedShardTask):
            assert order["Ingest"] < order[name], name
            upstreams = inspect.getattr_static(shard, "upstreams")
            for upstream in upstreams.values() if isinstance(upstreams, dict) else ():  # some are properties
                if upstream in wrapper_of:
                    assert order[wrapper_of[upstream]] < order[name], (wrapper_of[upstream], name)
                    checked += 1
    assert checked >= 6
    assert order["TrainAlignment"] > order["FeaturesFmbseg"] and order["TrainUse"] > order["UseText"]


def test_run_accepts_every_listed_stage(tmp_path):
    (tmp_path / "images").mkdir()
    for stage in STAGES:
        args = parser().parse_args(["run", stage.name, "--images", str(tmp_path / "images"), "--out",
                                    str(tmp_path / "out")])
        check(args)  # raises SettingsError for an unknown stage


@pytest.mark.slow  # the real `pseudoseg` command in a subprocess
def test_stages_command_prints_one_line_per_stage_in_order():
    proc = subprocess.run([sys.executable, "-m", "pseudoseg.tasks.report.cli", "stages"], capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [stage.name for stage in STAGES]


def test_one_name_per_stage_folder_wrapper_and_shard_task():
    """A stage's `run` name is its folder in CamelCase, and its shard task is that name + "Shard" (one shard class
    serving two folders is named after their common prefix: FeaturesShard)."""
    import re

    from pseudoseg.tasks.engine.base import StageWrapper
    from pseudoseg.tasks.report.cli import stage_classes
    classes = stage_classes()
    for out in outputs():
        assert out.name == "".join(part.title() for part in out.folder.split("_")), out
        wrapper = classes[out.name]
        shard = getattr(wrapper, "shard_task", None) or getattr(classes.get(out.name + "Shards"), "shard_task", None)
        if shard is not None:
            assert out.name.startswith(shard.__name__.removesuffix("Shard")), (out.name, shard.__name__)
            if isinstance(vars(shard).get("stage"), str):  # FeaturesShard's depends on its purpose
                assert shard.stage == out.folder, (out.name, shard.stage)
    wrappers = [c for c in classes.values() if isinstance(c, type) and issubclass(c, StageWrapper)]
    assert all(re.fullmatch(r"[A-Z]\w+", c.__name__) for c in wrappers)


def test_an_old_stage_name_says_its_new_name(tmp_path):
    from pseudoseg.tasks.report.cli import RENAMED

    proc = subprocess.run([sys.executable, "-m", "pseudoseg.tasks.report.cli", "run", "PseudoLabels", "--images", str(tmp_path),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "'PseudoLabels' is now called 'FmbsegLabels'" in proc.stderr
    assert RENAMED["TrainUSEHead"] == "TrainUse" and set(RENAMED.values()) <= set(__import__("pseudoseg.tasks.report.cli").tasks.report.cli.stage_classes())


@pytest.mark.slow  # the real `pseudoseg` command in a subprocess
def test_a_reader_that_leaves_early_is_not_an_error():
    """`pseudoseg stages | head -1`: output into a pipe nobody reads any more ends quietly with status 0."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        proc = subprocess.run([sys.executable, "-m", "pseudoseg.tasks.report.cli", "stages"], stdout=write_end, stderr=subprocess.PIPE,
                              text=True)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
