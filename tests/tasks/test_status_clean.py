"""`pseudoseg status` on a tree with a failed shard (done / pending / failed per stage, rows, rejects by reason, hash
folders and which is latest; exit 1) and `pseudoseg clean --stale` (only hash folders that are not latest go; asks
first, --yes skips; no terminal and no --yes: nothing removed)."""

from __future__ import annotations

from pathlib import Path

import pytest

import pseudoseg.tasks.stages.ingest as ingest_module
from pseudoseg.tasks.report.cli import build, main
from pseudoseg.tasks.report.status import clean_stale, folder_status, tree_status
from pseudoseg.tasks.stages.ingest import Ingest
from tests.helpers import luigi_settings, write_good_images

SHARDS = 3  # 7 good + 1 bad image, 3 per shard


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    write_good_images(folder, 7)
    (folder / "zz_bad.jpg").write_bytes(b"not an image")
    return folder


def ingest_dir(images: Path, out: Path, **settings: int):
    with luigi_settings(ingest={"shard_size": 3, **settings}):
        return Ingest(images=str(images), dataset="ds", out=str(out)).requires()[0].stage_dir


def run_ingest(images: Path, out: Path, **settings: int) -> bool:
    with luigi_settings(ingest={"shard_size": 3, **settings}, scheduler={"retry_count": 1}):
        return build("Ingest", str(images), "ds", str(out), summary=False)[0]


def status(out: Path, capsys, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["status", str(out), *extra])
    return code, capsys.readouterr().out


def table_row(text: str, stage: str, hash_: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if line.split()[:2] == [stage, hash_]]
    return line.split()


def test_status_reports_a_failed_shard_and_exits_1_until_it_is_redone(tmp_path, images, capsys, monkeypatch):
    out = tmp_path / "out"
    produce = ingest_module.IngestShard.produce

    def fail_shard_1(task, progress):
        if task.shard == 1:
            raise RuntimeError("injected failure in shard 1")
        return produce(task, progress)

    monkeypatch.setattr(ingest_module.IngestShard, "produce", fail_shard_1)
    assert not run_ingest(images, out)
    stage = ingest_dir(images, out)

    code, text = status(out, capsys)
    assert code == 1, text
    # stage, hash, latest?, shards, done, pending, failed, rows, rejects by reason; not complete: not latest yet
    assert table_row(text, "ingest", stage.hash) == ["ingest", stage.hash, str(SHARDS), "2", "0", "1", "4",
                                                     "not_an_image", "1"]
    assert text.index("plan ") < text.index("ingest "), "stages in DAG order"
    assert f"failed: ingest/{stage.hash} shard-000001: RuntimeError: injected failure in shard 1" in text
    (row,) = tree_status(out)["ds"][1:]
    assert (row.done, row.pending, row.failed, row.latest) == (2, 0, ["shard-000001"], False)

    monkeypatch.setattr(ingest_module.IngestShard, "produce", produce)
    # a run with other parameters succeeds: the failure belongs to an earlier run's folder, exit 0
    assert run_ingest(images, out, max_side=32)
    code, text = status(out, capsys)
    assert code == 0, text
    assert f"failed: ingest/{stage.hash} shard-000001 (an earlier run's folder): RuntimeError" in text

    assert run_ingest(images, out)
    code, text = status(out, capsys, "--dataset", "ds")
    assert code == 0, text
    assert table_row(text, "ingest", stage.hash) == ["ingest", stage.hash, "*", str(SHARDS), str(SHARDS), "0", "0",
                                                     "7", "not_an_image", "1"]
    assert "failed:" not in text


def test_status_counts_pending_shards_of_an_interrupted_stage(tmp_path, images):
    out = tmp_path / "out"
    assert run_ingest(images, out)
    stage = ingest_dir(images, out)
    stage.done_path(2).unlink()  # as if the run had stopped before shard 2
    row = folder_status("ingest", stage.path, latest=True)
    assert (row.shards, row.done, row.pending, row.failed) == (SHARDS, SHARDS - 1, 1, [])


def test_clean_stale_removes_only_hash_folders_that_are_not_latest(tmp_path, images, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run_ingest(images, out)
    assert run_ingest(images, out, max_side=32)  # a parameter change: a second ingest hash folder, now latest
    old, new = ingest_dir(images, out), ingest_dir(images, out, max_side=32)
    plan = new.stage_path.parent / "plan"
    (plan_folder,) = [p for p in plan.iterdir() if p.is_dir() and not p.is_symlink()]

    code, text = status(out, capsys)
    assert code == 0
    assert table_row(text, "ingest", new.hash)[2] == "*" and table_row(text, "ingest", old.hash)[2] == str(SHARDS)

    # no terminal, no --yes: one clear line, nothing removed
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    capsys.readouterr()
    assert main(["clean", str(out), "--stale"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pseudoseg: clean --stale: not a terminal, nothing removed; pass --yes to remove them"]
    assert old.path.is_dir()

    # on a terminal: asks, and "no" (or just Enter) keeps everything
    assert clean_stale(out, None, yes=False, interactive=True, ask=lambda question: "") == 1
    assert old.path.is_dir()
    assert clean_stale(out, "ds", yes=False, interactive=True, ask=lambda question: "y") == 0
    assert not old.path.exists() and new.path.is_dir() and plan_folder.is_dir()
    assert (new.stage_path / "latest").resolve() == new.path

    assert run_ingest(images, out)  # back to the first parameters: a new latest, the max_side=32 one is stale
    lock = new.path / ".lock-shard-000000"
    lock.write_text("{}")  # a run working in it: left alone
    assert main(["clean", str(out), "--stale", "--yes"]) == 0
    assert new.path.is_dir() and "a shard lock is held there, skipped" in capsys.readouterr().out
    lock.unlink()
    assert main(["clean", str(out), "--stale", "--yes"]) == 0
    assert old.path.is_dir() and not new.path.exists() and plan_folder.is_dir()
    assert main(["clean", str(out), "--stale", "--yes"]) == 0  # nothing left to remove
    assert "no stale hash folders" in capsys.readouterr().out


def test_status_counts_only_records_of_their_own_unit_and_a_rerun_redoes_the_others(tmp_path, images, capsys):
    import json
    import shutil

    out = tmp_path / "out"
    assert run_ingest(images, out)
    stage = ingest_dir(images, out)
    meta = stage.path / "_meta"
    # a record copied under another shard's name, and one of a shard the stage does not have
    shutil.copy(meta / "shard-000000.done.json", meta / "shard-000001.done.json.tmp")
    (meta / "shard-000001.done.json").unlink()
    (meta / "shard-000001.done.json.tmp").rename(meta / "shard-000001.done.json")
    shutil.copy(meta / "shard-000000.done.json", meta / "shard-000007.done.json")
    (row,) = tree_status(out)["ds"][1:]
    assert (row.shards, row.done) == (SHARDS, 2), "a record counts only for the unit it records"

    # the scheduler agrees: the shard whose record is another's is redone
    capsys.readouterr()
    with luigi_settings(ingest={"shard_size": 3}, scheduler={"retry_count": 1}):
        ok, _ = build("Ingest", str(images), "ds", str(out))
    record = json.loads((out / "ds" / "run.json").read_text())
    stages = {s["stage"]: s for s in record["stages"]}
    assert ok and record["status"] == "ok" and stages["Ingest"]["done"] == SHARDS  # the rerun redid shard 1


def test_clean_keeps_what_a_latest_stands_on_ignores_a_latest_outside_its_stage_and_waits_for_live_runs(
        tmp_path, images, tiny_cache, capsys):
    from pseudoseg.tasks.report.status import run_lease

    out = tmp_path / "out"
    with luigi_settings(models={"cache_dir": str(tiny_cache)}, use={"caption_max_new_tokens": 4}, ingest={"shard_size": 3}):
        assert build("UseCaptions", str(images), "ds", str(out), summary=False)[0]
    first = ingest_dir(images, out)
    assert run_ingest(images, out, max_side=32)  # ingest's latest moves; the captions' latest was made from `first`
    assert (out / "ds" / "ingest" / "latest").resolve().name != first.hash

    assert run_ingest(images, out, max_side=16)  # now the max_side=32 folder is no latest's and nothing stands on it
    second = ingest_dir(images, out, max_side=32)
    # a latest naming '..' names nothing: that stage's folders are left alone, and the pointer is reported
    plan = out / "ds" / "plan"
    (plan / "latest").unlink()
    (plan / "latest").symlink_to("..")
    plans = sorted(p.name for p in plan.iterdir() if p.name not in ("latest", "LATEST"))

    with run_lease(out / "ds", stale_after=600) as lease:  # a run in progress on the dataset, using `second`
        lease([second.path])
        assert clean_stale(out, None, yes=True, interactive=False) == 2
        assert "a run is working on ds" in capsys.readouterr().err
        assert clean_stale(out, None, yes=True, interactive=False, force=True) == 0
        assert second.path.is_dir(), "the live run's folder is kept"
    assert not list((out / "ds" / ".runs").iterdir()), "the lease is gone with its run"
    capsys.readouterr()
    assert clean_stale(out, None, yes=True, interactive=False) == 0
    text = capsys.readouterr().out
    assert "plan/latest names '..', not a hash folder of the stage: ignored" in text
    assert not second.path.exists(), "no run and no latest uses it any more: removed"
    assert first.path.is_dir(), "the captions' latest stands on it: kept"
    assert sorted(p.name for p in plan.iterdir() if p.name not in ("latest", "LATEST")) == plans
