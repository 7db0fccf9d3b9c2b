"""Committed units in-process: done.json verification (size / sha256), quarantine, durable commits (directory
fsync order), per-unit locks (exclusive, stale take-over), garbage records = not done, summary never crashes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pseudoseg.pipeline.core import artifacts
from pseudoseg.pipeline.core.artifacts import (
    QUARANTINE,
    ShardOutput,
    StageDir,
    commit_shard,
    load_shard_stats,
    record_problems,
)
from pseudoseg.pipeline.core.locks import LockBusy, UnitLock
from tests.helpers import luigi_settings, write_good_images


def committed(tmp_path, shard: int = 0) -> StageDir:
    stage = StageDir(tmp_path, "ds", "st", {"a": 1})
    commit_shard(stage, shard, ShardOutput(files={"parquet": b"rows" * 100, "tar": b"payload" * 100},
                                           in_count=2, ok_count=2), seconds=0.1)
    return stage


def test_a_committed_unit_verifies_and_every_fault_is_named(tmp_path):
    stage = committed(tmp_path)
    assert record_problems(stage, 0, "sha256") == {}
    tar = stage.shard_path(0, "tar")

    data = bytearray(tar.read_bytes())
    data[10:26] = bytes(b ^ 0xFF for b in data[10:26])  # 16 flipped bytes, same size
    tar.write_bytes(bytes(data))
    assert record_problems(stage, 0, "size") == {}, "size cannot see flipped bytes"
    assert "sha256" in record_problems(stage, 0, "sha256")["shard-000000.tar"]
    assert record_problems(stage, 0, "off") == {}

    tar.write_bytes(bytes(data[:300]))  # cut
    assert record_problems(stage, 0, "size") == {"shard-000000.tar": "300 bytes, recorded 700"}
    tar.unlink()
    assert record_problems(stage, 0, "size") == {"shard-000000.tar": "missing"}

    stage.done_path(0).write_text("{garbage")
    (problem,) = record_problems(stage, 0, "off").values()
    assert problem.startswith("invalid: not a readable JSON record")
    stage.done_path(0).unlink()
    assert record_problems(stage, 0, "sha256") == {"shard-000000.done.json": "missing"}


def test_a_record_of_another_unit_is_invalid(tmp_path):
    stage = committed(tmp_path, shard=0)
    os.replace(stage.done_path(0), stage.done_path(1))  # e.g. copied by hand
    (problem,) = record_problems(stage, 1, "off").values()
    assert "record of another unit" in problem and "'shard': 0" in problem


def test_quarantine_moves_the_record_first_and_keeps_the_evidence(tmp_path):
    stage = committed(tmp_path)
    where = stage.quarantine(0, "st shard 0 failed verification: x", files=["shard-000000.tar"])
    assert where.parent == stage.path / QUARANTINE
    assert sorted(p.name for p in where.iterdir()) == ["reason.txt", "shard-000000.done.json", "shard-000000.tar"]
    assert not stage.done_path(0).exists() and stage.shard_path(0, "parquet").exists()
    stage.clear_unfinished(0)  # the rerun clears what is left; the evidence stays
    assert not stage.shard_path(0, "parquet").exists() and where.joinpath("shard-000000.tar").exists()
    assert stage.quarantine(0, "again", files=["gone"]).exists(), "a record already moved away is not an error"


def test_commit_fsyncs_the_folder_after_the_payloads_and_after_done_json(tmp_path, monkeypatch):
    events: list[str] = []
    real_replace, real_fsync_dir = os.replace, artifacts.fsync_dir
    monkeypatch.setattr(artifacts.os, "replace",
                        lambda a, b: (events.append(f"rename {os.path.basename(b)}"), real_replace(a, b))[1])
    monkeypatch.setattr(artifacts, "fsync_dir",
                        lambda p: (events.append(f"fsync {os.path.basename(p)}"), real_fsync_dir(p))[1])
    stage = StageDir(tmp_path, "ds", "st", {"a": 1})
    files = {"parquet": b"1", "rejects.parquet": b"3", "tar": b"2"}
    commit_shard(stage, 3, ShardOutput(files=files, in_count=1, ok_count=1), seconds=0)
    shard = [e for e in events if "params" not in e]
    tail = shard[shard.index("rename shard-000003.parquet"):]
    # rows, then rejects (into _rejects/, created and its entry made durable), then the tar; every folder that
    # received a payload is fsynced before done.json is renamed into _meta/, which is fsynced last
    assert tail == ["rename shard-000003.parquet", f"fsync {stage.hash}", "rename shard-000003.parquet",
                    "rename shard-000003.tar", f"fsync {stage.hash}", "fsync _rejects",
                    "rename shard-000003.done.json", "fsync _meta"]
    assert stage.rejects_path(3).read_bytes() == b"3" and stage.shard_path(3, "parquet").read_bytes() == b"1"
    assert stage.done_path(3).parent.name == "_meta"
    # the folder's own entry (and its parents') made durable when it was first written into
    assert {"fsync st", "fsync ds"} <= set(events)


def test_load_shard_stats_is_none_for_garbage(tmp_path):
    stage = committed(tmp_path)
    assert load_shard_stats(stage.done_path(0))["in_count"] == 2
    for garbage in (b"", b"{garbage", b"[1, 2]", b'{"schema": "shard_stats/v1"}', b"\xff\xfe"):
        stage.done_path(0).write_bytes(garbage)
        assert load_shard_stats(stage.done_path(0)) is None, garbage


# ---------------------------------------------------------------------------------------------- locks
def test_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / ".lock-shard-000000"
    with UnitLock(path) as first:
        assert first.held() and json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(LockBusy, match=f"pid {os.getpid()}"):
            UnitLock(path).acquire(wait=False)
    assert not path.exists()


def test_a_waiter_gets_the_lock_when_the_holder_releases_it(tmp_path):
    path, order = tmp_path / ".lock-shard-000000", []
    holder = UnitLock(path)
    holder.acquire()
    waited: list[dict] = []

    def second() -> None:
        with UnitLock(path, poll=0.02, on_wait=waited.append):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.2)
    order.append("first done")
    holder.release()
    thread.join(timeout=10)
    assert order == ["first done", "second"] and waited and waited[0]["pid"] == os.getpid()


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    path = tmp_path / ".lock-shard-000000"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "start": "1",
                                "token": "old", "since": time.time()}))
    with UnitLock(path, poll=0.01) as lock:
        assert lock.held()


def test_a_live_holder_on_this_host_is_waited_for(tmp_path):
    path = tmp_path / ".lock-shard-000000"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from pseudoseg.pipeline.core.locks import process_start

        time.sleep(0.1)
        path.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(),
                                    "start": process_start(live.pid), "token": "t", "since": time.time()}))
        with pytest.raises(LockBusy):
            UnitLock(path).acquire(wait=False)
        live.kill()
        live.wait()  # reaped: gone
        with UnitLock(path) as lock:
            assert lock.held()
    finally:
        live.kill()


def test_a_pid_reused_by_another_process_does_not_hold_the_lock(tmp_path):
    path = tmp_path / ".lock-shard-000000"
    path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "start": "123",
                                "token": "t", "since": time.time()}))  # alive, but started at another time
    with UnitLock(path) as lock:
        assert lock.held()


def test_other_hosts_lock_is_stale_only_after_its_heartbeat_stops(tmp_path):
    path = tmp_path / ".lock-shard-000000"
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": None, "token": "t", "since": 0}))
    with pytest.raises(LockBusy, match="on elsewhere"):
        UnitLock(path, stale_after=60).acquire(wait=False)
    old = time.time() - 61
    os.utime(path, (old, old))
    with UnitLock(path, stale_after=60) as lock:
        assert lock.held()


def test_the_holder_heartbeat_keeps_its_lock_fresh(tmp_path):
    path = tmp_path / ".lock-shard-000000"
    with UnitLock(path, stale_after=0.4):
        old = time.time() - 100
        os.utime(path, (old, old))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 1


def test_an_unreadable_lock_is_stale_after_a_grace_period(tmp_path):
    path = tmp_path / ".lock-shard-000000"
    path.write_bytes(b"")  # killed between create and write
    with pytest.raises(LockBusy):
        UnitLock(path).acquire(wait=False)
    old = time.time() - 31
    os.utime(path, (old, old))
    with UnitLock(path) as lock:
        assert lock.held()


def test_two_takers_of_one_stale_lock_never_both_hold_it(tmp_path):
    path = tmp_path / ".lock-shard-000000"
    for _ in range(20):
        path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "t", "since": 0}))
        os.utime(path, (0, 0))
        holders, barrier = [], threading.Barrier(2)

        def take(barrier: threading.Barrier = barrier, holders: list = holders) -> None:
            lock = UnitLock(path, stale_after=1)
            barrier.wait()
            try:
                lock.acquire(wait=False)
            except LockBusy:
                return
            holders.append(lock)

        threads = [threading.Thread(target=take) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(lock.held() for lock in holders) <= 1 and len(holders) >= 1
        for lock in holders:
            lock.release()
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- tasks in-process
def test_garbage_done_json_is_not_done_and_the_summary_counts_it_so(tmp_path):
    import luigi

    from pseudoseg.tasks.report.summary import summarise
    from pseudoseg.tasks.stages.ingest import IngestShard

    write_good_images(tmp_path / "images", 3)
    with luigi_settings(ingest={"shard_size": 2}):
        task = IngestShard(images=str(tmp_path / "images"), dataset="ds", out=str(tmp_path / "out"), shard=1)
        assert luigi.build([task], local_scheduler=True, log_level="WARNING")
        assert task.complete()
        done = task.stage_dir.done_path(1)
        before = done.read_bytes()
        for garbage in (b"{garbage", b"", json.dumps({"schema": "shard_stats/v1"}).encode()):
            done.write_bytes(garbage)
            assert not task.complete()
            (row,) = [r for r in summarise([task]) if r.stage == "ingest"]
            assert (row.shards, row.done) == (1, 0)
        assert luigi.build([task], local_scheduler=True, log_level="WARNING")
        after = json.loads(done.read_bytes())
        expected = json.loads(before)
        after.pop("seconds"), expected.pop("seconds")
        assert after == expected
        assert len(list((task.stage_dir.path / QUARANTINE).iterdir())) == 1


def test_verify_setting_size_misses_flipped_bytes_sha256_heals_them(tmp_path):
    import luigi

    from pseudoseg.tasks.engine.base import verify_inputs
    from pseudoseg.tasks.stages.ingest import IngestShard

    write_good_images(tmp_path / "images", 3)
    with luigi_settings(ingest={"shard_size": 2}):
        shard = IngestShard(images=str(tmp_path / "images"), dataset="ds", out=str(tmp_path / "out"), shard=1)
        assert luigi.build([shard], local_scheduler=True, log_level="WARNING")
        plan = shard.requires()
        good = plan.plan_path.read_bytes()
        data = bytearray(good)
        data[len(data) // 2] ^= 0xFF
        plan.plan_path.write_bytes(bytes(data))
        for mode in ("off", "size"):
            with luigi_settings(pseudoseg={"verify": mode}):
                verify_inputs(shard, [plan])
            assert plan.plan_path.read_bytes() == bytes(data) and plan.complete(), mode
        with luigi_settings(pseudoseg={"verify": "sha256"}):
            verify_inputs(shard, [plan])
        assert plan.plan_path.read_bytes() == good and plan.complete()
        (evidence,) = (plan.stage_dir.path / QUARANTINE).iterdir()
        assert "plan.parquet: sha256" in (evidence / "reason.txt").read_text()
        assert (evidence / "plan.parquet").read_bytes() == bytes(data)


def test_one_heartbeat_thread_serves_every_held_lock(tmp_path):
    locks = [UnitLock(tmp_path / f".lock-shard-{i:06d}", stale_after=0.4) for i in range(3)]
    for lock in locks:
        lock.acquire()
    try:
        old = time.time() - 100
        for lock in locks:
            os.utime(lock.path, (old, old))
        time.sleep(0.35)
        assert all(time.time() - lock.path.stat().st_mtime < 1 for lock in locks)
        assert sum(t.name == "lock-heartbeat" for t in threading.enumerate()) == 1
    finally:
        for lock in locks:
            lock.release()
    assert not any(lock.path.exists() for lock in locks)


def test_a_resumed_stale_holder_clears_only_its_own_temporaries_and_its_late_commit_is_refused(tmp_path, caplog):
    """Holder A was judged stale (paused past lock_stale_seconds) and B took the unit over; A resumes. A's clear must
    not touch B's temporaries nor the payloads B's done.json temporary names, and A's commit writes nothing."""
    stage = StageDir(tmp_path, "ds", "st", {"a": 1})
    a = UnitLock(stage.lock_path(0))
    a.acquire()
    try:
        stage.begin(0)
        own = artifacts._write_temporary(stage.shard_path(0, "parquet"), b"A's rows", stage.tmp_path)
        assert artifacts.tmp_owner(own.name) == a.token, "A's temporaries carry its token"
        with artifacts.TarSpool(stage.shard_path(0, "tar")) as spool:
            spool.write({"__key__": "k", "txt": b"A"})
        assert artifacts.tmp_owner(spool.path.name) == a.token

        # B takes the lock over (a fresh lock file with B's token) and is half way through its commit: payloads
        # renamed into place, its done.json temporary listing them, its tar still a temporary
        b_token = "b" * 16
        stage.lock_path(0).write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": b_token, "since": 0}))
        b_done = stage.tmp_path / f".tmp-shard-000000.done.json.{b_token}-4242-0badcafe"
        b_done.write_text(json.dumps({"files": [{"name": "shard-000000.parquet"}, {"name": "shard-000000.tar"}]}))
        b_tar = stage.tmp_path / f".tmp-shard-000000.tar.{b_token}-4242-12345678"
        b_tar.write_bytes(b"B's tar")
        stage.shard_path(0, "parquet").write_bytes(b"B's rows")
        assert stage.lost_lock(0) == a.token

        stage.clear_unfinished(0)  # what A's failed attempt would do on its way out
        assert not own.exists(), "A's own temporary is gone"
        assert b_done.exists() and b_tar.exists() and stage.shard_path(0, "parquet").read_bytes() == b"B's rows"

        with caplog.at_level("WARNING", logger="luigi-interface.pseudoseg"):
            again = artifacts._write_temporary(stage.shard_path(0, "parquet"), b"A's rows", stage.tmp_path)
            assert commit_shard(stage, 0, ShardOutput(files={"parquet": b"A's rows", "tar": again}, in_count=1,
                                                      ok_count=1), seconds=0.1) is None
        (record,) = caplog.records
        assert record.getMessage().startswith("pseudoseg: st shard 0: not committed: this process's lock on it "
                                              "was taken over while it worked")
        assert "held by pid 1 on elsewhere" in record.getMessage()
        assert not stage.done_path(0).exists() and not again.exists()
        assert b_done.exists() and b_tar.exists() and stage.shard_path(0, "parquet").read_bytes() == b"B's rows"
        assert not (stage.path / "_rejects").exists(), "nothing of A's was renamed into place"
    finally:
        a.release()
    assert stage.lock_path(0).exists(), "A's release leaves B's lock alone"
    assert artifacts.tmp_owner(artifacts.temporary_path(stage.shard_path(0, "tar")).name) is None, "no lock: no token"
