"""A run explains itself: the end-of-run table (DAG order, units, in → ok / rejected, rows written, top reject
reasons, a warning for a stage that produced nothing, ran vs. skipped, output paths), printed once after Luigi
finishes; the same as run.json; the dataset card (README.md) with runnable read snippets; Luigi's log in a file;
N/N and 100 % sent to luigid at the end of each shard; done.json v1 records still read."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pseudoseg.pipeline.core.artifacts import (
    ShardOutput,
    StageDir,
    commit_shard,
    load_shard_stats,
    record_problems,
)
from pseudoseg.tasks.engine.base import ProgressReporter
from pseudoseg.tasks.stages.catalog import outputs, stage_index
from tests.helpers import REPO, cli, cli_env, write_good_images

STAGE_NAMES = [o.name for o in outputs()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_cache):
    """`pseudoseg run ExportCoco` on two photos with the papers' SAM thresholds: random tiny SAM predicts IoUs far
    below 0.6, so every box is rejected (low_predicted_iou) and UseBoxMasks / UseSegments produce nothing — the
    run of the issue (exit 0, 0 masks). Then the same command again: everything is skipped."""
    tmp = tmp_path_factory.mktemp("summary")
    images = tmp / "photos"
    write_good_images(images, 2)
    env = cli_env(tmp)
    env["HF_HUB_OFFLINE"] = "1"
    args = ["run", "ExportCoco", "--images", str(images), "--out", str(tmp / "out"),
            "--set", f"models.cache_dir={tiny_cache}"]
    first = cli(args, env)
    text, _ = first.communicate(timeout=600)
    assert first.returncode == 0, text
    second = cli(args, env)
    again, _ = second.communicate(timeout=600)
    assert second.returncode == 0, again
    return {"root": tmp / "out" / "photos", "text": text, "again": again}


def table_names(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    names = []
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("WARNING"):
            break
        names.append(line.split()[0])
    return names


@pytest.mark.slow  # uses `run`: two `pseudoseg run ExportCoco` subprocesses
def test_empty_stage_is_a_warning_with_its_top_reject_reason(run):
    text = run["text"]
    assert re.search(r"^WARNING: UseBoxMasks produced no masks: \d+ boxes in, 0 ok, \d+ rejected "
                     r"\(low_predicted_iou \d+\); to keep more, lower \[use\] pred_iou_thresh \(random tiny models "
                     r"\(preset = tiny\) rarely pass the papers' thresholds: .*\)$", text, re.M), text
    assert re.search(r"^WARNING: UseSegments produced no segments: it received no masks", text, re.M), text
    row = next(line for line in text.splitlines() if line.startswith("UseBoxMasks "))
    assert "boxes" in row and "masks" in row and "low_predicted_iou" in row

    record = json.loads((run["root"] / "run.json").read_text())
    stages = {s["stage"]: s for s in record["stages"]}
    masks = stages["UseBoxMasks"]
    assert masks["counts"] == "boxes" and masks["rows_are"] == "masks" and masks["rows"] == 0
    assert masks["in"] == masks["rejected"] > 0 and masks["reject_reasons"] == {"low_predicted_iou": masks["in"]}
    assert stages["UseBoxes"]["rows"] == masks["in"]  # every box written is a UseBoxMasks input
    assert any(w.startswith("UseBoxMasks produced no masks") for w in record["warnings"])
    assert stages["UseSegments"]["warning"] and record["status"] == "ok"
    assert record["artifacts"]["coco.json"].endswith("coco.json") and Path(record["artifacts"]["coco.json"]).exists()
    assert [s["stage"] for s in record["stages"]] == sorted(stages, key=STAGE_NAMES.index)


@pytest.mark.slow  # uses `run`: two `pseudoseg run ExportCoco` subprocesses
def test_table_is_in_dag_order_printed_once_after_luigi_with_ran_and_skipped(run):
    text, again = run["text"], run["again"]
    names = table_names(text)
    assert names == ["Ingest", "SamEmbeddings", "UseCaptions", "UseExpressions", "UseBoxes", "UseBoxMasks", "UseSegments",
                     "ExportCoco"]
    assert names == sorted(names, key=STAGE_NAMES.index)
    for output in (text, again):
        assert len(re.findall(r"^stage +counts +shards", output, re.M)) == 1
        assert "Luigi Execution Summary" not in output  # Luigi's summary and INFO lines go to the log file
        assert "INFO:" not in output
    assert re.search(r"^ran 8 unit\(s\), skipped 0 already done", text, re.M)
    assert re.search(r"^ran 0 unit\(s\), skipped 8 already done", again, re.M)
    record = json.loads((run["root"] / "run.json").read_text())  # the second run's
    assert (record["ran"], record["skipped"]) == (0, 8)
    log = Path(re.search(r"^log: (.+)$", again, re.M).group(1))
    assert log.parent == run["root"] / "logs" and "Luigi Execution Summary" in log.read_text()
    assert record["log"] == str(log)


@pytest.mark.slow  # uses `run`: two `pseudoseg run ExportCoco` subprocesses
def test_dataset_card_has_every_section_and_its_read_snippets_run(run):
    root = run["root"]
    card = (root / "README.md").read_text(encoding="utf-8")
    for needle in ("## Stages", "## What each folder holds", "### UseBoxMasks — `use_box_masks/", "Schema `box_masks/v",
                   "| `predicted_iou` |", "Models: ", "segmenter = `tiny:", "`pred_iou_thresh`: `0.6`",
                   "**Warning:** UseBoxMasks produced no masks", "## Reading it", "import duckdb",
                   "import webdataset as wds", "from pycocotools.coco import COCO", "low_predicted_iou"):
        assert needle in card, needle
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == 3
    for snippet in snippets:
        proc = subprocess.run([sys.executable, "-c", snippet], cwd=root, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (snippet, proc.stderr)
        assert proc.stdout.strip(), snippet
        if "import duckdb" in snippet:  # the rejects query, grouped by reason
            assert "reason" in proc.stdout


def test_every_stage_folder_of_the_full_dag_has_a_declared_unit(tmp_path):
    """The declared stages with a folder (catalog.outputs, in DAG order) cover every folder FullDAG writes."""
    from pseudoseg.tasks.report.summary import walk_dag
    from pseudoseg.tasks.stages.dag import FullDAG

    write_good_images(tmp_path / "img", 1)
    folders = set()
    for task in walk_dag([FullDAG(images=str(tmp_path / "img"), dataset="d", out=str(tmp_path / "out"))]):
        if hasattr(type(task), "stage_dir") and type(task).__name__ != "PlanIngest":
            folders.add(task.stage_dir.stage)
    declared_folders = {o.folder for o in outputs()}
    assert folders <= declared_folders, folders - declared_folders
    order = [stage.name for stage in stage_index()]
    assert [o.name for o in outputs()] == [name for name in order if name in {o.name for o in outputs()}]


class FakeTask:
    stage, shard = "use_boxes", 3

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.percentages: list[float] = []
        self.set_status_message = self.messages.append
        self.set_progress_percentage = self.percentages.append


def test_a_finished_shard_reports_n_of_n_and_100_percent():
    task = FakeTask()
    with ProgressReporter(task) as progress:
        progress.start(2)
        progress.step(0)
        progress.step(1)  # throttled: luigid would keep showing "0/2 images" (was: "1/2") without the end report
    assert task.messages[-1] == "2/2 images" and task.percentages[-1] == 100

    failed = FakeTask()
    with pytest.raises(RuntimeError), ProgressReporter(failed) as progress:
        progress.start(2)
        progress.step(0)
        raise RuntimeError("boom")
    assert "2/2 images" not in failed.messages and 100 not in failed.percentages


def test_done_json_v1_records_stay_done_and_read_without_rows_or_reasons(tmp_path):
    stage = StageDir(tmp_path, "ds", "use_boxes", {"a": 1})
    commit_shard(stage, 0, ShardOutput(files={"x": b"1"}, in_count=2, ok_count=1, rejected_count=1), seconds=0.1)
    record = json.loads(stage.done_path(0).read_text())
    assert record["schema"] == "shard_stats/v2" and "rows" in record and "reject_reasons" in record
    record.pop("rows"), record.pop("reject_reasons")
    record["schema"] = "shard_stats/v1"
    stage.done_path(0).write_text(json.dumps(record))
    assert record_problems(stage, 0, "sha256") == {}  # still done: an upgrade redoes nothing
    stats = load_shard_stats(stage.done_path(0))
    assert stats["rows"] is None and stats["reject_reasons"] is None and stats["ok_count"] == 1


def test_readme_shows_the_table_run_json_card_and_log():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "run.json" in readme and "logs/run-" in readme and "dataset card" in readme
    assert re.search(r"^stage +counts +shards +done +failed +ran +skipped", readme, re.M)
