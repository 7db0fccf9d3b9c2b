"""Every task a user may want is runnable by name (`pseudoseg run NAME`), and `pseudoseg stages` lists them in DAG
order with one line each (tasks.dag.STAGES)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from tasks.base import StageWrapper
from tasks.chained import ChainedShardTask
from tasks.cli import check, parser
from tasks.dag import STAGES, stage_classes


def _all_subclasses(cls):
    out, pending = set(), [cls]
    while pending:
        for sub in pending.pop().__subclasses__():
            out.add(sub)
            pending.append(sub)
    return out


def test_every_stage_wrapper_trainer_and_export_is_runnable_by_name():
    names = [name for name, _ in STAGES]
    assert len(names) == len(set(names))
    classes = stage_classes()
    wrappers = {c.__name__ for c in _all_subclasses(StageWrapper) if c.__module__.startswith("tasks.")}
    assert wrappers <= set(classes)
    assert {"TrainAlignment", "TrainUSEHead", "ClassTextEmbeddings", "Evaluate", "ExportCoco", "Preview",
            "FullDAG", "ModelProbe"} <= set(classes)


def test_stages_are_in_dag_order():
    """A stage wrapper comes after the wrappers of its shard task's upstreams (and after Ingest)."""
    order = {name: i for i, (name, _) in enumerate(STAGES)}
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
    assert order["TrainAlignment"] > order["FmbsegFeatures"] and order["TrainUSEHead"] > order["UseTextEmbeddings"]


def test_run_accepts_every_listed_stage(tmp_path):
    for name, _ in STAGES:
        args = parser().parse_args(["run", name, "--images", str(tmp_path), "--out", str(tmp_path / "out")])
        check(args)  # raises SettingsError for an unknown stage


@pytest.mark.slow  # the real `pseudoseg` command in a subprocess
def test_stages_command_prints_one_line_per_stage_in_order():
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", "stages"], capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [name for name, _ in STAGES]
