"""Through the real `pseudoseg` command: cleanup never deletes live work, list entries are never lost or merged,
`status` counts only records of their own unit, and a run waiting on another's lock says so."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pseudoseg.schemas import MANIFEST, REJECTS, SHARD_STATS
from pseudoseg.tasks.report.status import hash_folders
from tests.helpers import cli, cli_env, in_terminal, write_good_images

pytestmark = pytest.mark.slow

HOLD_LEASE = """
import sys, time
from pathlib import Path
from pseudoseg.tasks.report.status import run_lease
with run_lease(Path(sys.argv[1]), stale_after=600) as lease:
    lease([Path(p) for p in sys.argv[2:]])
    print("holding", flush=True)
    time.sleep(600)
"""


def run(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = cli(args, env)
    text, _ = proc.communicate(timeout=600)
    return proc.returncode, text


def ingest_folders(out: Path) -> list[Path]:
    return hash_folders(out / "ds" / "ingest")


def test_clean_refuses_while_a_run_works_and_keeps_its_folders_when_forced(tmp_path):
    images, out, env = tmp_path / "images", tmp_path / "out", cli_env(tmp_path)
    write_good_images(images, 3)
    ingest = ["run", "Ingest", "--images", str(images), "--dataset", "ds", "--out", str(out)]
    assert run(ingest + ["--set", "ingest.max_side=32"], env)[0] == 0
    (first,) = ingest_folders(out)
    assert run(ingest + ["--fresh-settings"], env)[0] == 0  # the shipped max_side: the latest moves, `first` is stale
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, str(out / "ds"), str(first)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        code, text = run(["clean", str(out), "--stale", "--yes"], env)
        assert code == 2 and text.strip().splitlines()[-1].startswith("pseudoseg: clean: a run is working on ds ("), text
        assert first.is_dir()
        code, text = run(["clean", str(out), "--stale", "--yes", "--force"], env)
        assert code == 0 and first.is_dir(), text  # forced: cleaned around the live run's folders
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lease is dead, so the next clean removes what no run and no latest uses
    code, text = run(["clean", str(out), "--stale", "--yes"], env)
    assert code == 0 and not first.exists() and len(ingest_folders(out)) == 1, text


def test_every_line_of_a_list_is_counted_and_none_shares_an_id(tmp_path):
    images, out, env = tmp_path / "images", tmp_path / "out", cli_env(tmp_path)
    good = write_good_images(images, 2)
    lines = ["images/good_000.jpg", "./images/good_000.jpg", "images/good_001.png", "ftp://bucket/a.jpg",
             "http://example.org/b.png"]
    listing = tmp_path / "list.txt"
    listing.write_bytes(("\n".join(lines) + "\nimages/nul\x00.jpg\n").encode())
    code, text = run(["run", "Ingest", "--images", str(listing), "--dataset", "ds", "--out", str(out)], env)
    assert code == 0, text
    (folder,) = ingest_folders(out)
    stats = SHARD_STATS.read_json(folder / "_meta" / "shard-000000.done.json")
    assert (stats["in_count"], stats["ok_count"], stats["rejected_count"]) == (6, 2, 4)
    manifest = MANIFEST.read_parquet(folder / "shard-000000.parquet").to_pylist()
    assert sorted(Path(r["source"]).name for r in manifest) == sorted(p.name for p in good), "no good image lost"
    reasons = sorted(r["reason"] for r in REJECTS.read_parquet(folder / "_rejects" / "shard-000000.parquet").to_pylist())
    assert reasons == ["invalid_path", "listed_twice", "unsupported_url", "unsupported_url"]
    assert run(["run", "UseCaptions", "--images", str(listing), "--dataset", "ds", "--out", str(out),
                "--set", f"models.cache_dir={tmp_path / 'models'}", "--set", "use.caption_max_new_tokens=2"],
               env)[0] == 0, "a later stage reads the shard: one tar member per id"


def test_linked_folders_are_ingested_once_and_a_loop_is_one_reject_row(tmp_path):
    images, out, env = tmp_path / "images", tmp_path / "out", cli_env(tmp_path)
    write_good_images(images / "real", 2)
    (linked,) = write_good_images(tmp_path / "elsewhere", 1, seed=7)
    (images / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (images / "real" / "up").symlink_to(images, target_is_directory=True)  # a loop
    code, text = run(["run", "Ingest", "--images", str(images), "--dataset", "ds", "--out", str(out)], env)
    assert code == 0, text
    (folder,) = ingest_folders(out)
    stats = SHARD_STATS.read_json(folder / "_meta" / "shard-000000.done.json")
    assert (stats["in_count"], stats["ok_count"], stats["rejected_count"]) == (4, 3, 1)
    manifest = MANIFEST.read_parquet(folder / "shard-000000.parquet").to_pylist()
    assert str(images / "linked" / linked.name) in {r["source"] for r in manifest}
    (row,) = REJECTS.read_parquet(folder / "_rejects" / "shard-000000.parquet").to_pylist()
    assert (row["reason"], row["source"]) == ("linked_folder_seen", str(images / "real" / "up"))


def test_status_counts_a_copied_record_as_nothing_and_exits_1_for_the_missing_shard(tmp_path):
    images, out, env = tmp_path / "images", tmp_path / "out", cli_env(tmp_path)
    write_good_images(images, 4)
    assert run(["run", "Ingest", "--images", str(images), "--dataset", "ds", "--out", str(out),
                "--set", "ingest.shard_size=2"], env)[0] == 0
    (folder,) = ingest_folders(out)
    meta = folder / "_meta"
    (meta / "shard-000001.done.json").unlink()
    (meta / "shard-000001.done.json").write_bytes((meta / "shard-000000.done.json").read_bytes())  # shard 0's
    code, text = run(["status", str(out)], env)
    row = next(line.split() for line in text.splitlines() if line.split()[:2] == ["ingest", folder.name])
    assert row[2:6] == ["*", "2", "1", "1"], text  # latest; shards, done, pending: the copy is not shard 1's record


def test_a_run_waiting_on_another_runs_lock_says_so_on_the_terminal(tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    write_good_images(images, 2)
    slow = """
import time
import pseudoseg.tasks.stages.ingest as ingest
_produce = ingest.IngestShard.produce
def produce(self, progress):
    time.sleep(20)
    return _produce(self, progress)
ingest.IngestShard.produce = produce
"""
    args = ["-m", "pseudoseg.tasks.report.cli", "run", "Ingest", "--images", str(images), "--dataset", "ds", "--out", str(out)]
    (tmp_path / "a").mkdir()
    first = subprocess.Popen([sys.executable, *args], env=cli_env(tmp_path / "a", slow), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("ds/ingest/*/.lock-shard-000000")):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.2)
        code, text = in_terminal([sys.executable, *args], cli_env(tmp_path), tmp_path)
    finally:
        first.wait(timeout=300)
    assert code == 0, text
    assert "pseudoseg: waiting for ingest shard 0: in progress in pid" in text, text
    assert json.loads((out / "ds" / "run.json").read_text())["status"] == "ok"
