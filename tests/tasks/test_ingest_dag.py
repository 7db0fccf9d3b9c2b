"""Ingest through Luigi, in-process: fault injection, accounting, WebDataset readability, determinism,
content addressing, no-op reruns."""

from __future__ import annotations

import json
import os
from pathlib import Path

import luigi
import numpy as np
import pytest
import webdataset as wds

from pseudoseg.pipeline.core.artifacts import record_unit_file
from pseudoseg.pipeline.core.images import decode_image
from pseudoseg.schemas import MANIFEST, REJECTS, SHARD_STATS
from pseudoseg.tasks.engine.base import ShardTask, build_tasks
from pseudoseg.tasks.stages.ingest import Ingest, PlanIngest
from tests.bad_inputs import BAD_INPUTS
from tests.helpers import luigi_settings, tree_bytes, write_good_images

SHARD_SIZE = 4


def build(task: luigi.Task) -> None:
    result = build_tasks([task], local_scheduler=True, workers=1, log_level="WARNING")
    assert result.scheduling_succeeded, result.summary_text


def ingest_task(images: Path, out: Path, dataset: str = "ds") -> Ingest:
    return Ingest(images=str(images), dataset=dataset, out=str(out))


@pytest.fixture
def messy_folder(tmp_path: Path) -> tuple[Path, dict[str, str], list[Path]]:
    """Good images interleaved with every catalogued bad input plus file-level faults.

    Returns (folder, {file name: expected reject reason}, good paths)."""
    folder = tmp_path / "images"
    good = write_good_images(folder, 6)
    expected: dict[str, str] = {}
    for name, (make, reason) in sorted(BAD_INPUTS.items()):
        path = folder / f"bad_{name}.jpg"  # decoding sniffs content; the extension only gets it listed
        path.write_bytes(make())
        expected[path.name] = reason
    # File-level faults that only exist on a real file system.
    os.symlink(folder / "does-not-exist.jpg", folder / "dangling_link.jpg")
    expected["dangling_link.jpg"] = "unreadable"
    (folder / "a_directory.jpg").mkdir()
    expected["a_directory.jpg"] = "unreadable"
    (folder / "zz_copy_of_good_000.jpg").write_bytes(good[0].read_bytes())
    expected["zz_copy_of_good_000.jpg"] = "duplicate"
    (folder / "notes.txt").write_text("not listed: not an image extension")
    return folder, expected, good


def read_stage(out: Path, dataset: str, stage: str) -> list[Path]:
    folders = sorted((out / dataset / stage).iterdir())
    assert len(folders) == 1, folders
    return sorted(folders[0].glob("_meta/shard-*.done.json"))


def test_bad_inputs_become_reject_rows_and_good_images_are_all_written(messy_folder, tmp_path):
    folder, expected, good = messy_folder
    assert len(expected) >= 12 + 3
    out = tmp_path / "out"
    with luigi_settings(ingest={"shard_size": SHARD_SIZE}):
        build(ingest_task(folder, out))
    done_files = read_stage(out, "ds", "ingest")
    total_in = len(good) + len(expected)
    assert len(done_files) == -(-total_in // SHARD_SIZE)

    manifest_rows, reject_rows, samples = [], [], {}
    for done in done_files:
        stats = SHARD_STATS.read_json(done)
        assert stats["in_count"] == stats["ok_count"] + stats["rejected_count"]

        manifest = MANIFEST.read_parquet(record_unit_file(done, "parquet")).to_pylist()
        rejects = REJECTS.read_parquet(record_unit_file(done, "rejects.parquet")).to_pylist()
        assert (stats["ok_count"], stats["rejected_count"]) == (len(manifest), len(rejects))
        manifest_rows += manifest
        reject_rows += rejects
        for sample in wds.WebDataset(str(record_unit_file(done, "tar")), shardshuffle=False, empty_check=False):
            samples[sample["__key__"]] = sample

    got = {Path(r["source"]).name: r["reason"] for r in reject_rows}
    assert got == expected
    assert all(r["detail"] and r["stage"] == "ingest" for r in reject_rows)
    assert sorted(Path(r["source"]).name for r in manifest_rows) == sorted(p.name for p in good)
    assert sum(SHARD_STATS.read_json(d)["in_count"] for d in done_files) == total_in

    # The tar is plain WebDataset: key = image id, payload + JSON meta that agrees with the manifest.
    for row in manifest_rows:
        sample = samples[row["image_id"]]
        meta = json.loads(sample["json"])
        assert (meta["width"], meta["height"], meta["source"]) == (row["width"], row["height"], row["source"])
        stored = decode_image(sample[row["stored_ext"]]).rgb
        direct = decode_image(Path(row["source"]).read_bytes()).rgb
        np.testing.assert_array_equal(stored, direct)


def test_same_inputs_give_byte_identical_artifacts(tmp_path):
    folder = tmp_path / "images"
    write_good_images(folder, 5)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    trees = []
    for name in ("a", "b"):
        with luigi_settings(ingest={"shard_size": 2}):
            build(ingest_task(folder, tmp_path / name))
        trees.append(tree_bytes(tmp_path / name))
    a, b = trees
    assert a.keys() == b.keys()
    for rel in a:
        if rel.endswith(".done.json"):  # seconds differ run to run; everything else must not
            ja, jb = json.loads(a[rel]), json.loads(b[rel])
            ja.pop("seconds"), jb.pop("seconds")
            assert ja == jb, rel
        else:
            assert a[rel] == b[rel], rel


class RunCounter:
    """Every shard a build runs and every ingest plan it makes (made while Luigi schedules: see
    PlanIngest.content_digest)."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for cls, method in ((ShardTask, "run"), (PlanIngest, "produce_unit")):
            original = getattr(cls, method)

            def counted(task, _original=original):
                self.calls.append(task.task_id)
                return _original(task)

            monkeypatch.setattr(cls, method, counted)


def test_noop_rerun_runs_nothing_and_changed_params_run_into_a_new_folder(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    write_good_images(folder, 5)
    out = tmp_path / "out"
    counter = RunCounter(monkeypatch)
    with luigi_settings(ingest={"shard_size": 2}):
        build(ingest_task(folder, out))
        first = len(counter.calls)
        assert first == 1 + 3  # plan + 3 shards
        build(ingest_task(folder, out))
        assert len(counter.calls) == first, "a no-op rerun must not execute any run()"
    (old_folder,) = (out / "ds" / "ingest").iterdir()
    old_bytes = tree_bytes(old_folder)

    with luigi_settings(ingest={"shard_size": 2, "max_side": 32}):
        build(ingest_task(folder, out))
    # Only the three shards re-ran (the plan does not depend on max_side), into a new hash folder;
    # the old folder is untouched.
    assert len(counter.calls) == first + 3
    folders = sorted((out / "ds" / "ingest").iterdir())
    assert len(folders) == 2
    assert tree_bytes(old_folder) == old_bytes
    (new_folder,) = [f for f in folders if f != old_folder]
    assert json.loads((new_folder / "_meta" / "params.json").read_text())["params"]["max_side"] == 32
    rows = MANIFEST.read_parquet(new_folder / "shard-000000.parquet").to_pylist()
    assert all(max(r["width"], r["height"]) == 32 and r["resized"] for r in rows)

    # The same bytes written again (new mtimes, new inodes): the listing changed, so a new plan is made, but it
    # holds what the old one held: no shard is redone and the ingest folder stays the same.
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
        os.utime(path, (1e9, 1e9))
    with luigi_settings(ingest={"shard_size": 2}):
        build(ingest_task(folder, out))
    assert len(counter.calls) == first + 3 + 1
    assert len(list((out / "ds" / "plan").iterdir())) == 2 and len(list((out / "ds" / "ingest").iterdir())) == 2

    # A new image changes the listing → new plan with other content → every shard re-runs.
    write_good_images(folder, 1, seed=99, size=(20, 20))[0].rename(folder / "zz_new.png")
    with luigi_settings(ingest={"shard_size": 2}):
        build(ingest_task(folder, out))
    assert len(counter.calls) == first + 3 + 1 + 1 + 3
    assert len(list((out / "ds" / "ingest").iterdir())) == 3
