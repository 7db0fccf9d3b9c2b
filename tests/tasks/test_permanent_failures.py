"""Failures a retry cannot fix (a missing model, a benchmark in the wrong layout, a schema mismatch) fail at once
through the real `pseudoseg` command: one attempt, no traceback, one line per cause printed last, exit status 1.
A transient failure still gets Luigi's retries."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pseudoseg.models.catalog import ModelUnavailableError
from pseudoseg.pipeline.eval.benchmarks import DatasetError
from pseudoseg.schemas.contract import SchemaError
from pseudoseg.tasks.engine.failures import cause_of, explain, permanent_cause
from tests.helpers import cli, cli_env, write_good_images

pytestmark = pytest.mark.slow
CAUSE = "pseudoseg: failed, not retried: "


def run(args: list[str], env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    proc = cli(args, env)
    text, _ = proc.communicate(timeout=timeout)
    return proc.returncode, text


def log_of(text: str) -> str:
    """The run's log file (Luigi's INFO lines: which tasks ran), named on the table's footer."""
    found = re.search(r"^log: (.+)$", text, re.M)
    return Path(found.group(1)).read_text() if found else ""


def assert_one_cause_last(text: str, *parts: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    causes = [line for line in lines if line.startswith(CAUSE)]
    assert len(causes) == 1 and lines[-1] == causes[0], text[-3000:]
    for part in parts:
        assert part in causes[0], causes[0]
    assert "Traceback" not in text  # was the same traceback once per retry (3x with retry_count = 3)
    return causes[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("permanent") / "images"
    write_good_images(folder, 2)
    return folder


def test_missing_model_fails_once_and_names_role_key_and_path(tmp_path, images):
    missing = tmp_path / "models" / "clip-l14"
    env = cli_env(tmp_path)
    env["HF_HUB_OFFLINE"] = "1"
    code, text = run(["run", "FmbsegDense", "--images", str(images), "--dataset", "ds", "--out", str(tmp_path / "out"),
                      "--set", "models.preset=real", "--set", f"models.fmbseg_clip={missing}"], env)
    assert code == 1, text
    assert log_of(text).count("running   FmbsegDenseShard(") == 1  # one attempt, not retry_count of them
    assert_one_cause_last(text, "ModelUnavailableError", "CLIP model", f"`[models] fmbseg_clip = {missing}`",
                          "no such folder")


def test_wrong_benchmark_layout_fails_once_with_the_expected_layout(tmp_path, images):
    root = tmp_path / "VOC2012"  # JPEGImages and the split list, but labels in the wrong folder
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "JPEGImages").mkdir()
    (root / "JPEGImages" / "x.jpg").write_bytes(next(images.glob("*.jpg")).read_bytes())
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("x\n")
    out = tmp_path / "out"
    code, text = run(["run", "Evaluate", "--images", str(root), "--dataset", "voc21", "--out", str(out),
                      "--set", "Evaluate.benchmark=voc21", "--set", f"Evaluate.data_root={root}",
                      "--set", "Evaluate.method=car"], cli_env(tmp_path))
    assert code == 1, text
    assert log_of(text).count("running   Evaluate(") == 1
    assert_one_cause_last(text, "DatasetError: Evaluate voc21", f"{root}/SegmentationClass not found",
                          "Expected layout: <root>/JPEGImages/<id>.jpg")
    assert not any(out.rglob("report.md"))


# An older pseudoseg wrote the manifest: same folder (the stage hash does not cover schema versions), other tag.
OLD_MANIFEST_WRITER = """
from pseudoseg import schemas
object.__setattr__(schemas.ingest.MANIFEST, "version", 0)
"""


# A writer that stamps the manifest with an older version tag while this version's reader checks it.
STALE_MANIFEST_WRITER = """
from pseudoseg import schemas
from pseudoseg.schemas.contract import META_KEY
_stamp = type(schemas.ingest.MANIFEST).stamp
def stamp(table):
    table = _stamp(schemas.ingest.MANIFEST, table)
    return table.replace_schema_metadata({**table.schema.metadata, META_KEY: b"manifest/v0"})
object.__setattr__(schemas.ingest.MANIFEST, "stamp", stamp)
"""


def test_schema_mismatch_of_an_upstream_parquet_heals_or_fails_once(tmp_path, images):
    """An upstream Parquet of another schema version is redone by its reader (tasks.base.redo) and the run heals;
    when the redone file still mismatches (here: the writer itself is old), the reader fails once, not retried,
    and the cause is the last line."""
    out = tmp_path / "out"
    common = ["--images", str(images), "--dataset", "ds", "--out", str(out)]
    code, text = run(["run", "Ingest", *common], cli_env(tmp_path, OLD_MANIFEST_WRITER))
    assert code == 0, text
    manifest = (out / "ds" / "ingest" / "latest" / "shard-000000.parquet").resolve()  # errors name the hash folder
    captions = ["run", "UseCaptions", *common, "--set", "use.generate_captions=false"]
    code, text = run(captions, cli_env(tmp_path, STALE_MANIFEST_WRITER))
    assert code == 1, text
    assert "running   IngestShard(" not in log_of(text)  # the upstream is redone inside its reader, not rescheduled
    assert log_of(text).count("running   UseCaptionsShard(") == 1
    assert_one_cause_last(text, f"SchemaError: {manifest}: schema version mismatch: expected manifest/v1, "
                                "found manifest/v0")
    code, text = run(captions, cli_env(tmp_path))  # today's writer: the reader redoes the shard and goes on
    assert code == 0, text
    assert "schema version mismatch: expected manifest/v1, found manifest/v0" in text and CAUSE not in text


FAIL_FIRST_ATTEMPT = """
import pathlib
import pseudoseg.tasks.stages.ingest as ingest
_produce = ingest.IngestShard.produce
def produce(self, progress):
    marker = pathlib.Path({marker!r})
    if not marker.exists():
        marker.touch()
        raise OSError("injected transient failure (first attempt)")
    return _produce(self, progress)
ingest.IngestShard.produce = produce
"""


def test_a_transient_failure_is_still_retried(tmp_path, images):
    marker = tmp_path / "failed-once"
    code, text = run(["run", "Ingest", "--images", str(images), "--dataset", "ds", "--out", str(tmp_path / "out"),
                      "--set", "scheduler.retry_delay=0"], cli_env(tmp_path, FAIL_FIRST_ATTEMPT.format(marker=str(marker))))
    assert code == 0, text
    assert marker.exists() and log_of(text).count("running   IngestShard(") == 2
    assert "injected transient failure" in text and CAUSE not in text


def test_permanent_causes_are_found_through_the_exception_chain():
    try:
        try:
            raise SchemaError("x.parquet: schema version mismatch")
        except SchemaError as e:
            raise RuntimeError("while reading the upstream shard") from e
    except RuntimeError as e:
        wrapped = e
    assert isinstance(permanent_cause(wrapped), SchemaError)
    assert permanent_cause(RuntimeError("disk full")) is None
    assert explain(OSError("timeout")) is None
    line = explain(DatasetError("no\n  such\tfolder"), "Evaluate voc21")
    assert cause_of(line) == "DatasetError: Evaluate voc21: no such folder"
    assert cause_of(f'"{line}"') == "DatasetError: Evaluate voc21: no such folder"  # as the worker sends it
    assert cause_of(explain(ModelUnavailableError("gone"))) == "ModelUnavailableError: gone"
