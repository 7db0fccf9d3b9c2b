"""Scheduling: coarse Luigi tasks (ranges of K shards, ``[pseudoseg] shards_per_task``) make the same bytes as
one task per shard, depend range to range, rerun per shard and report per range; each shard reads only its own
part of the plan; unfinished shards are cleared by name; per-process caches follow the settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import luigi
import luigi.configuration
import pyarrow.parquet as pq
import pytest

import pseudoseg.tasks.stages.ingest as ingest_module
from pseudoseg.pipeline.core import artifacts
from pseudoseg.pipeline.core.artifacts import ShardOutput, StageDir, commit_shard
from pseudoseg.pipeline.core.sources import list_source, plan_entries
from pseudoseg.schemas import PLAN
from pseudoseg.tasks.engine.base import ShardRange, ShardTask, build_tasks, range_class, shards_per_task
from pseudoseg.tasks.engine.settings import problems
from pseudoseg.tasks.report.summary import summarise, walk_dag
from pseudoseg.tasks.stages.ingest import Ingest, IngestShard, read_plan_shard
from pseudoseg.tasks.stages.sam import SamEmbeddings, SamEmbeddingsShard
from tests.helpers import luigi_settings, tree_bytes, write_good_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHARDS = 5


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sched") / "images"
    write_good_images(folder, SHARDS, size=(32, 40))
    return folder


@pytest.fixture(scope="module")
def models(tiny_cache) -> str:
    return str(tiny_cache)


def settings(k: int | str, models: str, **more) -> dict:
    return {"ingest": {"shard_size": 1}, "pseudoseg": {"shards_per_task": k},
            "models": {"preset": "tiny", "cache_dir": models, "device": "cpu"}, **more}


def build(task: luigi.Task) -> None:
    result = build_tasks([task], local_scheduler=True, workers=1, log_level="WARNING")
    assert result.scheduling_succeeded, result.summary_text


def artifacts_of(out: Path) -> dict[str, object]:
    """Every visible file; done.json without its run-dependent ``seconds``."""
    tree: dict[str, object] = {}
    for rel, data in tree_bytes(out).items():
        if rel.endswith(".done.json"):
            record = json.loads(data)
            record.pop("seconds")
            tree[rel] = record
        else:
            tree[rel] = data
    return tree


class UnitRuns:
    """Which shards run (ShardTask.run: the unit, alone or inside a range), and which ranges."""

    def __init__(self, monkeypatch) -> None:
        self.units: list[str] = []
        self.ranges: list[str] = []
        unit_run, range_run = ShardTask.run, ShardRange.run
        monkeypatch.setattr(ShardTask, "run", lambda task: (self.units.append(task.describe()), unit_run(task))[1])
        monkeypatch.setattr(ShardRange, "run", lambda task: (self.ranges.append(task.describe()), range_run(task))[1])


def test_any_shards_per_task_makes_byte_identical_artifacts(tmp_path, images, models, monkeypatch):
    trees = {}
    for k in (1, 2, 3):
        runs = UnitRuns(monkeypatch)
        with luigi_settings(**settings(k, models)):
            root = SamEmbeddings(images=str(images), dataset="ds", out=str(tmp_path / f"k{k}"))
            build(root)
            scheduled = [t for t in walk_dag([root]) if not isinstance(t, ShardTask) or k == 1]
            assert all(row.done == row.shards == SHARDS for row in summarise([root]))
        ranges = sorted(t.task_family for t in scheduled if isinstance(t, ShardRange))
        if k == 1:
            assert not ranges and not runs.ranges
        else:
            count = -(-SHARDS // k)  # ranges per stage
            assert ranges == ["IngestShardRange"] * count + ["SamEmbeddingsShardRange"] * count
            assert len(runs.ranges) == 2 * count
        assert len(runs.units) == 2 * SHARDS, "every shard of both stages ran once"
        trees[k] = artifacts_of(tmp_path / f"k{k}")
    assert trees[1].keys() == trees[2].keys() == trees[3].keys()
    assert trees[1] == trees[2] == trees[3]


def test_ranges_depend_on_the_upstream_ranges_covering_them(tmp_path, images, models):
    with luigi_settings(**settings(2, models)):
        common = {"images": str(images), "dataset": "ds", "out": str(tmp_path)}
        sam_range = SamEmbeddingsShard(shard=3, **common).scheduled()
        assert (type(sam_range), sam_range.first, sam_range.stop) == (range_class(SamEmbeddingsShard), 2, 4)
        assert [u.shard for u in sam_range.shard_tasks()] == [2, 3]
        (upstream,) = sam_range.deps()
        assert (type(upstream), upstream.first, upstream.stop) == (range_class(IngestShard), 2, 4)
        assert [t.task_family for t in upstream.deps()] == ["PlanIngest"]
        last = IngestShard(shard=4, **common).scheduled()
        assert (last.first, last.stop) == (4, 5), "the last range holds what is left"
        # requires() keeps naming shards (readers need their files); only what Luigi schedules is grouped
        assert [t.shard for t in SamEmbeddings(**common).requires()] == list(range(SHARDS))
        assert sorted((t.first, t.stop) for t in SamEmbeddings(**common).deps()) == [(0, 2), (2, 4), (4, 5)]
    with luigi_settings(**settings(1, models)):
        assert IngestShard(shard=3, **common).scheduled() == IngestShard(shard=3, **common)


def test_a_rerun_under_coarse_tasks_redoes_only_the_missing_shards(tmp_path, images, models, monkeypatch):
    out = tmp_path / "out"
    with luigi_settings(**settings(3, models)):
        root = SamEmbeddings(images=str(images), dataset="ds", out=str(out))
        build(root)
        records = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.done.json")}
        (sam_4,) = out.glob("ds/sam_embeddings/*/_meta/shard-000004.done.json")
        (ingest_1,) = out.glob("ds/ingest/*/_meta/shard-000001.done.json")
        sam_4.unlink()
        ingest_1.unlink()
        runs = UnitRuns(monkeypatch)
        build(root)
        assert runs.units == ["sam_embeddings shard 4"], "SAM shard 1 is done: its ingest shard is not needed"
        assert runs.ranges == ["sam_embeddings shards 3-4"]
        build(Ingest(images=str(images), dataset="ds", out=str(out)))
    assert runs.units == ["sam_embeddings shard 4", "ingest shard 1"]
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.done.json")}
    assert after.keys() == records.keys()
    assert {p for p in records if records[p] != after[p]} == {sam_4, ingest_1}, "no other record was rewritten"


def test_a_failing_shard_fails_its_range_after_the_others_and_is_the_only_one_redone(tmp_path, images, models,
                                                                                       monkeypatch):
    out = tmp_path / "out"
    produce = IngestShard.produce

    def fail_shard_1(task, progress):
        if task.shard == 1:
            raise RuntimeError("injected failure in shard 1")
        return produce(task, progress)

    monkeypatch.setattr(IngestShard, "produce", fail_shard_1)
    with luigi_settings(**settings(3, models, scheduler={"retry_count": 1})):
        root = Ingest(images=str(images), dataset="ds", out=str(out))
        result = build_tasks([root], local_scheduler=True, workers=1, log_level="CRITICAL")
        assert not result.scheduling_succeeded
        (row,) = summarise([root])
        assert (row.shards, row.done, row.failed) == (SHARDS, SHARDS - 1, 1)
        assert sorted(int(p.name[6:12]) for p in out.glob("ds/ingest/*/_meta/shard-*.done.json")) == [0, 2, 3, 4]
        assert not list(out.glob("ds/ingest/*/shard-000001.*")), "the failed shard left nothing visible"
        (marker,) = out.glob("ds/ingest/*/_meta/shard-000001.failed.json")  # for `pseudoseg status`
        assert "injected failure in shard 1" in json.loads(marker.read_text())["error"]
        monkeypatch.setattr(IngestShard, "produce", produce)
        runs = UnitRuns(monkeypatch)
        build(root)
    assert runs.units == ["ingest shard 1"] and runs.ranges == ["ingest shards 0-2"]
    assert not list(out.glob("ds/ingest/*/_meta/*.failed.json")), "done again: the failure is history"


def test_range_progress_counts_shards_and_passes_on_the_shards_messages(tmp_path, images, models):
    reports: list[tuple[str, object]] = []
    with luigi_settings(**settings(3, models)):
        build(ingest_module.PlanIngest(images=str(images), dataset="ds", out=str(tmp_path)))
        task = IngestShard(shard=0, images=str(images), dataset="ds", out=str(tmp_path)).scheduled()
        task.set_status_message = lambda m: reports.append(("message", m))
        task.set_progress_percentage = lambda p: reports.append(("percent", p))
        task.run()
        task.set_status_message = task.set_progress_percentage = None
        assert task.complete()
    assert reports[:2] == [("percent", 0.0), ("message", "0/3 shards")]
    assert reports[-2:] == [("percent", 100.0), ("message", "3/3 shards")]
    assert any(kind == "message" and str(m).startswith("0/3 shards; shard 0: ") for kind, m in reports), reports


def test_shards_per_task_auto_keeps_each_stage_under_250_tasks_and_is_checked():
    with luigi_settings(pseudoseg={"shards_per_task": "auto"}):
        assert [shards_per_task(n) for n in (1, 250, 251, 1000, 100_000)] == [1, 1, 2, 4, 400]
    with luigi_settings(pseudoseg={"shards_per_task": "7"}):
        assert shards_per_task(3) == 7
    for bad in ("0", "-2", "many", "1.5"):
        with luigi_settings(pseudoseg={"shards_per_task": bad}):
            lines = problems(luigi.configuration.get_config(), lambda section, key: "test")
        assert len(lines) == 1 and "shards_per_task" in lines[0] and "auto or an integer ≥ 1" in lines[0], lines


def test_each_shard_reads_only_its_row_groups_of_the_plan(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    write_good_images(folder, 23, size=(8, 8))
    rows = [e.__dict__ for e in plan_entries(list_source(str(folder)).entries, 3)]
    monkeypatch.setattr(ingest_module, "PLAN_GROUP_ROWS", 7)  # 2 shards (6 rows) per row group
    grouped, single = tmp_path / "grouped.parquet", tmp_path / "single.parquet"
    grouped.write_bytes(PLAN.to_parquet_bytes(PLAN.table(rows), row_group_size=ingest_module.plan_row_group_size(3)))
    single.write_bytes(PLAN.to_parquet_bytes(PLAN.table(rows)))  # as older plans were written
    assert pq.ParquetFile(grouped).metadata.num_row_groups == 4 and pq.ParquetFile(single).metadata.num_row_groups == 1

    read_groups: list[int] = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: (read_groups.append(i), real(self, i, *a, **k))[1])
    whole = PLAN.read_parquet(single).to_pylist()
    for path in (grouped, single):
        read_groups.clear()
        for shard in range(9):
            expected = sorted((r for r in whole if r["shard"] == shard), key=lambda r: r["position"])
            assert [e.__dict__ for e in read_plan_shard(str(path), shard)] == expected, (path.name, shard)
        # each row group read once (the last two read stay cached for the next shards of a range)
        assert read_groups == ([0, 1, 2, 3] if path == grouped else [0]), path.name


def test_unfinished_units_are_cleared_by_name_without_listing_the_stage_folder(tmp_path, monkeypatch):
    stage = StageDir(tmp_path, "ds", "st", {"a": 1})
    for shard in range(3):
        commit_shard(stage, shard, ShardOutput(files={"parquet": b"p", "tar": b"t"}, in_count=1, ok_count=1),
                     seconds=0)
    assert not list(stage.tmp_path.iterdir()), "a commit leaves nothing in .tmp/"
    done = sorted(p.name for p in stage.path.iterdir())
    # a commit of shard 3 killed between its first payload rename and its done.json
    real_replace = os.replace

    def die_after_first_payload(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("shard-000003.parquet"):
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(artifacts.os, "replace", die_after_first_payload)
    with pytest.raises(KeyboardInterrupt):
        commit_shard(stage, 3, ShardOutput(files={"parquet": b"p", "tar": b"t"}, in_count=1, ok_count=1),
                     seconds=0)
    monkeypatch.undo()
    stage.begin(4)  # and an attempt at shard 4 killed while writing its tar
    artifacts.temporary_path(stage.shard_path(4, "tar")).write_bytes(b"half")
    assert stage.shard_path(3, "parquet").exists() and len(list(stage.tmp_path.iterdir())) == 2  # done.json, tar

    listed: list[str] = []
    real_scandir, real_iterdir = os.scandir, Path.iterdir
    monkeypatch.setattr(artifacts.os, "scandir", lambda p: (listed.append(str(p)), real_scandir(p))[1])
    monkeypatch.setattr(Path, "iterdir", lambda p: (listed.append(str(p)), real_iterdir(p))[1])
    for shard in range(5):
        stage.clear_unfinished(shard)
    monkeypatch.undo()
    assert str(stage.path) not in listed and set(listed) <= {str(stage.tmp_path)}
    assert sorted(p.name for p in stage.path.iterdir()) == done and not list(stage.tmp_path.iterdir())


def test_sha256_of_an_unchanged_file_is_computed_once(tmp_path, monkeypatch):
    calls: list[Path] = []
    digest = artifacts._file_digest
    monkeypatch.setattr(artifacts, "_file_digest", lambda p: (calls.append(p), digest(p))[1])
    monkeypatch.setattr(artifacts, "TRUST_AFTER_NS", -10**18)  # trust even a file written just now
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 1000)
    first = artifacts.file_sha256(path)
    assert artifacts.file_sha256(path) == first and len(calls) == 1
    replacement = tmp_path / "g.bin"
    replacement.write_bytes(b"b" * 1000)
    replacement.replace(path)  # same name and size, another file
    assert artifacts.file_sha256(path) != first and len(calls) == 2
    monkeypatch.setattr(artifacts, "TRUST_AFTER_NS", 10**18)  # written too recently to trust its timestamps
    replacement.write_bytes(b"c" * 1000)
    replacement.replace(path)
    artifacts.file_sha256(path)
    artifacts.file_sha256(path)
    assert len(calls) == 4


def test_stage_folders_follow_settings_changed_in_process(tmp_path, images):
    common = {"images": str(images), "dataset": "ds", "out": str(tmp_path)}
    with luigi_settings(ingest={"shard_size": 2}):
        before = IngestShard(shard=0, **common).stage_dir
        with luigi_settings(ingest={"max_side": 99}):
            changed = IngestShard(shard=0, **common).stage_dir
        assert IngestShard(shard=1, **common).stage_dir == before
    assert changed.hash != before.hash and changed.params["params"]["max_side"] == 99


def started_workers(monkeypatch, tmp_path, *extra: str) -> list[tuple[list[str], dict]]:
    """``pseudoseg workers FullDAG --n 3 ... EXTRA`` with Popen faked: each worker's (argv, env)."""
    from pseudoseg.tasks.report import cli

    started: list[tuple[list[str], dict]] = []

    class Worker:
        pid = 0

        def __init__(self, args, env=None, **kwargs) -> None:
            started.append((args, env))

        def wait(self) -> int:
            return 0

    class Done(luigi.Task):
        def complete(self) -> bool:
            return True

    monkeypatch.setattr(cli.subprocess, "Popen", Worker)
    monkeypatch.setattr(cli, "make_task", lambda *args: Done())
    write_good_images(tmp_path / "x", 1)
    args = cli.parser().parse_args(["workers", "FullDAG", "--n", "3", "--images", str(tmp_path / "x"), "--dataset", "x",
                                    "--out", str(tmp_path), *extra])
    assert cli.cmd_workers(args) == 0
    return started


def test_workers_reach_a_luigid_on_another_host(monkeypatch, tmp_path):
    started = started_workers(monkeypatch, tmp_path, "--scheduler-host", "sched.example", "--scheduler-port", "8099")
    assert len(started) == 3
    for argv, _ in started:
        assert argv[argv.index("--scheduler-host") + 1] == "sched.example" and "--central" in argv
        assert argv[argv.index("--scheduler-port") + 1] == "8099"


def test_workers_are_pinned_to_their_gpus_round_robin(monkeypatch, tmp_path):
    from pseudoseg.tasks.report import cli

    started = started_workers(monkeypatch, tmp_path, "--gpus", "0,1")
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["0", "1", "0"]
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["workers", "FullDAG", "--images", "/data/x", "--gpus", "0,,1"])


def test_luigid_gpu_pool_is_cluster_wide_and_set_from_the_command(monkeypatch, tmp_path):
    """luigid counts [resources] over all workers of all hosts, so its gpu pool cannot be luigi.cfg's per-host 1."""
    from pseudoseg.tasks.report import cli

    seen: dict[str, str] = {}
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(cli.luigi.cmdline, "luigid",
                        lambda argv: seen.update(gpu=luigi.configuration.get_config().get("resources", "gpu")))
    with luigi_settings(resources={"gpu": 1}):
        assert cli.cmd_luigid(cli.parser().parse_args(["luigid", "--out", str(tmp_path / "out"), "--gpu-slots",
                                                        "12"])) == 0
        assert seen["gpu"] == "12"
        cli.cmd_luigid(cli.parser().parse_args(["luigid", "--out", str(tmp_path / "out")]))
        assert seen["gpu"] == "1024"


def test_luigid_listens_on_loopback_unless_given_an_address_and_keeps_its_state_per_user(monkeypatch, tmp_path):
    from pseudoseg.tasks.report import cli

    seen: list[list[str]] = []
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(cli.luigi.cmdline, "luigid", seen.append)
    for extra, address in (([], "127.0.0.1"), (["--address", "0.0.0.0"], "0.0.0.0")):
        assert cli.cmd_luigid(cli.parser().parse_args(["luigid", "--out", str(tmp_path / "out"), *extra])) == 0
        assert seen[-1][seen[-1].index("--address") + 1] == address
        assert seen[-1][seen[-1].index("--state-path") + 1] == f"{tmp_path}/state/pseudoseg/luigid/state.pickle"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.cmd_luigid(cli.parser().parse_args(["luigid", "--out", str(tmp_path / "out")])) == 0
    assert seen[-1][seen[-1].index("--state-path") + 1] == f"{tmp_path}/home/.local/state/pseudoseg/luigid/state.pickle"
