"""A stage is declared once, beside its task (``tasks.stages.catalog.declare``): the list `pseudoseg stages` prints,
the names `run` takes, FullDAG, the end-of-run table, run.json, `status`, the card and the luigi.cfg sections are all
derived from the declarations. A toy stage written as three files — its params, its contract, its task — shows up in
every one of them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pseudoseg.tasks.stages.catalog import declared, stage_index
from tests.helpers import REPO, cli_env, write_good_images

# What FullDAG ran before its list was derived from the declarations (pinned: a stage dropped from or added to the
# full DAG is a decision, not an accident of a flag).
FULL_DAG = ["Ingest", "ModelProbe", "UseSegments", "ExportCoco", "UsePreview", "FmbsegLabels", "CarLabels",
            "FeaturesUse", "FeaturesFmbseg", "UseText", "TextClasses", "TrainUse", "TrainAlignment"]


def test_the_source_reading_and_the_imported_declarations_agree():
    """`pseudoseg stages` and the argument checks read the declarations from the source (no model library
    imported); the DAG imports them: the two must be the same list, in the same order."""
    imported = [stage for stage, _ in declared()]
    index = stage_index()
    assert [s.name for s in index] == [s.name for s in imported]
    for light, full in zip(index, imported, strict=True):
        assert (light.makes, light.counts, light.rows_are, light.full_dag) == (full.makes, full.counts, full.rows_are,
                                                                          full.full_dag), full.name
    tables = [s.name for s in imported if s.contract is not None]
    assert {"Ingest", "UseBoxes", "UseSegments", "FmbsegLabels", "CarLabels", "FeaturesUse"} <= set(tables)
    for stage, task in declared():
        assert task.__name__ == stage.name and task.declaration is stage


def test_full_dag_requires_the_declared_leaves(tmp_path):
    from pseudoseg.tasks.stages.dag import FullDAG

    write_good_images(tmp_path / "img", 1)
    required = FullDAG(images=str(tmp_path / "img"), dataset="d", out=str(tmp_path / "out")).requires()
    assert sorted(type(task).__name__ for task in required) == sorted(FULL_DAG)
    assert [s.name for s in stage_index() if s.full_dag] == [n for n in (s.name for s in stage_index())
                                                             if n in FULL_DAG]


TOY_PARAMS = '''
from dataclasses import dataclass

from pseudoseg.pipeline.core.params import StageParams, setting


@dataclass(frozen=True)
class ToyBrightParams(StageParams):
    section = "toy_bright"

    threshold: int = setting(128, ge=0, le=255, help="a pixel at or above this (mean of RGB) is bright")
'''

TOY_CONTRACT = '''
import pyarrow as pa

from pseudoseg.schemas.contract import Contract, column, schema

TOY_BRIGHT = Contract("toy_bright", 1, schema(column("image_id", pa.string()), column("bright", pa.float64())))
'''

TOY_TASK = '''
from pseudoseg.pipeline.toy.params import ToyBrightParams
from pseudoseg.schemas import MANIFEST
from pseudoseg.schemas.toy import TOY_BRIGHT
from pseudoseg.tasks.engine.base import stage_wrapper
from pseudoseg.tasks.stages.catalog import declare
from pseudoseg.tasks.stages.chained import ChainedShardTask


class ToyBrightShard(ChainedShardTask):
    stage = "toy_bright"
    params_type = ToyBrightParams
    uses_model = False

    def produce(self, progress):
        manifest = self.read("ingest", MANIFEST)
        progress.start(len(manifest))
        rows, rejects = [], []
        with self.image_errors(rejects) as errors:
            for image_id, rgb, _ in self.decoded(errors, progress):
                bright = float((rgb.mean(axis=-1) >= self.params.threshold).mean())
                rows.append({"image_id": image_id, "bright": bright})
        return self.finish(TOY_BRIGHT, rows, rejects, in_count=len(manifest))


ToyBright = declare(stage_wrapper(ToyBrightShard), makes="toy: the fraction of bright pixels of each image",
                    counts="images", rows_are="images", contract=TOY_BRIGHT, full_dag=True)
'''


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory):
    """The real `pseudoseg` command with a toy stage: three files in folders added to the packages' search paths
    (as a stage added to the repository would be found), nothing else told about it."""
    tmp = tmp_path_factory.mktemp("toy")
    for folder, name, text in (("pipeline_ext/toy", "params.py", TOY_PARAMS), ("schemas_ext", "toy.py", TOY_CONTRACT),
                               ("stages_ext", "toy.py", TOY_TASK)):
        (tmp / folder).mkdir(parents=True, exist_ok=True)
        (tmp / folder / name).write_text(text)
    (tmp / "pipeline_ext/toy/__init__.py").write_text("")
    env = cli_env(tmp, sitecustomize=f"""
        import pseudoseg.pipeline, pseudoseg.schemas, pseudoseg.tasks.stages
        pseudoseg.pipeline.__path__.append({str(tmp / 'pipeline_ext')!r})
        pseudoseg.schemas.__path__.append({str(tmp / 'schemas_ext')!r})
        pseudoseg.tasks.stages.__path__.append({str(tmp / 'stages_ext')!r})
    """)
    write_good_images(tmp / "images", 2)
    return tmp, env


def _pseudoseg(env, *args):
    return subprocess.run([sys.executable, "-m", "pseudoseg.tasks.report.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # the real command in subprocesses
def test_a_toy_stage_of_three_files_is_in_the_dag_the_cli_status_the_card_and_run_json(toy_env):
    tmp, env = toy_env
    listed = _pseudoseg(env, "stages")
    assert listed.returncode == 0, listed.stderr
    assert "ToyBright" in listed.stdout and "the fraction of bright pixels" in listed.stdout

    dag = subprocess.run([sys.executable, "-c", "from pseudoseg.tasks.stages.dag import FullDAG; print(sorted("
                          f"type(t).__name__ for t in FullDAG(images={str(tmp / 'images')!r}, dataset='d', "
                          f"out={str(tmp / 'x')!r}).requires()))"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert dag.returncode == 0, dag.stderr
    assert "'ToyBright'" in dag.stdout

    config = _pseudoseg(env, "config", "--defaults")
    assert "toy_bright" in config.stdout and "threshold" in config.stdout

    out = tmp / "out"
    run = _pseudoseg(env, "run", "ToyBright", "--images", str(tmp / "images"), "--out", str(out),
                     "--set", "toy_bright.threshold=0")
    assert run.returncode == 0, run.stdout + run.stderr
    table = run.stdout + run.stderr
    assert "ToyBright" in table

    (folder,) = (out / "images" / "toy_bright").glob("[0-9a-f]*")
    rows = pq.read_table(next(folder.glob("shard-*.parquet"))).to_pylist()
    assert [r["bright"] for r in rows] == [1.0, 1.0]  # threshold 0 (--set): every pixel is bright

    report = json.loads((out / "images" / "run.json").read_text())
    (toy,) = [s for s in report["stages"] if s["stage"] == "ToyBright"]
    assert (toy["folder"], toy["counts"], toy["ok"], toy["rows_are"]) == ("toy_bright", "images", 2, "images")

    status = _pseudoseg(env, "status", str(out), "--dataset", "images")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "toy_bright" in status.stdout

    card = (out / "images" / "README.md").read_text()
    assert "the fraction of bright pixels" in card and "toy_bright/v1" in card

    unknown = _pseudoseg(env, "run", "ToyBright", "--images", str(tmp / "images"), "--out", str(out),
                         "--set", "toy_bright.treshold=0")
    assert unknown.returncode == 2 and "threshold" in unknown.stderr, unknown.stderr


def test_declarations_are_literal(tmp_path, monkeypatch):
    """The source reading needs the keywords as literals: a computed one is a clear error, not a silent gap."""
    from pseudoseg.tasks import stages
    from pseudoseg.tasks.stages import catalog

    (tmp_path / "computed.py").write_text(textwrap.dedent('''
        from pseudoseg.tasks.stages.catalog import declare
        MAKES = "something"

        @declare(makes=MAKES)
        class Computed:
            pass
    '''))
    monkeypatch.setattr(stages, "__path__", [*stages.__path__, str(tmp_path)])
    catalog.stage_index.cache_clear()
    try:
        with pytest.raises(TypeError, match="literals"):
            catalog.stage_index()
    finally:
        catalog.stage_index.cache_clear()
    assert Path(stages.__path__[0]).name == "stages"
