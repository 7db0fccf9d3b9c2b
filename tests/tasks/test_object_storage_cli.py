"""`pseudoseg run Ingest --images s3://...` against a real S3-compatible server on 127.0.0.1 (tests/s3server.py):
the bucket gives the artifacts its folder gives, and a store that stops mid-run fails a shard (nothing committed,
no reject row) that a rerun finishes."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pseudoseg.pipeline.core.artifacts import LATEST_LINK
from tests.helpers import cli, cli_env, write_good_images
from tests.s3server import CREDENTIALS

pytestmark = [pytest.mark.slow]


def run(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = cli(args, env)
    text, _ = proc.communicate(timeout=600)
    return proc.returncode, text


def s3_env(tmp_path: Path, server, sitecustomize: str | None = None) -> dict[str, str]:
    env = cli_env(tmp_path, sitecustomize)
    env.update(CREDENTIALS)
    env["PSEUDOSEG_TEST_S3_PID"] = str(server.proc.pid)
    return env


def storage_args(server) -> list[str]:
    return ["--set", f"storage.endpoint_url={server.endpoint}", "--set", "storage.retries=1",
            "--set", "storage.retry_seconds=0.1", "--set", "storage.timeout_seconds=5", "--set", "ingest.shard_size=2"]


def artifacts(stage: Path, source_prefix: str) -> dict[str, object]:
    """What a stage folder holds, file by file, each source under ``source_prefix`` written relative to it (where an
    image came from is the one thing a folder and a bucket name differently: a row's ``source``, a duplicate's
    detail): Parquet tables as rows, tars as (member name, bytes), the member JSON's sources made relative too."""
    found: dict[str, object] = {}

    def relative(value: object) -> object:
        return value.replace(source_prefix, "") if isinstance(value, str) else value

    for path in sorted(stage.rglob("*")):
        rel = path.relative_to(stage).as_posix()
        if not path.is_file() or rel.startswith("_meta/") or rel.startswith("."):
            continue
        if path.suffix == ".parquet":
            found[rel] = [{k: relative(v) for k, v in row.items()}
                          for row in pq.read_table(path).to_pylist()]
        elif path.suffix == ".tar":
            members = []
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    data = tar.extractfile(member).read()
                    if member.name.endswith(".json"):
                        meta = json.loads(data)
                        data = json.dumps({k: relative(v) for k, v in meta.items()}, sort_keys=True).encode()
                    members.append((member.name, data))
            found[rel] = members
        else:
            found[rel] = path.read_bytes()
    return found


def test_a_bucket_gives_the_artifacts_its_folder_gives(s3, tmp_path):
    folder = tmp_path / "photos"
    write_good_images(folder, 4)
    (folder / "copy.jpg").write_bytes((folder / "good_000.jpg").read_bytes())  # a duplicate
    (folder / "broken.jpg").write_bytes(b"not an image")
    s3.upload(folder, "s3://pics/photos")
    env = s3_env(tmp_path, s3)
    common = ["--out", str(tmp_path / "out"), *storage_args(s3)]
    assert run(["run", "Ingest", "--images", str(folder), "--dataset", "disk", *common], env)[0] == 0
    code, text = run(["run", "Ingest", "--images", "s3://pics/photos/", "--dataset", "bucket", *common], env)
    assert code == 0, text
    disk = artifacts((tmp_path / "out" / "disk" / "ingest" / LATEST_LINK).resolve(), f"{folder}/")
    bucket = artifacts((tmp_path / "out" / "bucket" / "ingest" / LATEST_LINK).resolve(), "s3://pics/photos/")
    assert disk.keys() == bucket.keys() and len([k for k in disk if k.endswith(".tar")]) == 3
    assert disk == bucket
    rejects = [row["reason"] for rel, rows in bucket.items() if rel.startswith("_rejects/") for row in rows]
    assert sorted(rejects) == ["duplicate", "not_an_image"], rejects


KILL_THE_STORE = """
import os, signal
from pseudoseg.tasks.stages import ingest

produce, calls = ingest.IngestShard.produce, []

def produce_then_stop(self, progress):
    calls.append(self.shard)
    if len(calls) == 2:  # the first shard is committed; the store goes away before the second is read
        os.killpg(int(os.environ["PSEUDOSEG_TEST_S3_PID"]), signal.SIGKILL)
    return produce(self, progress)

ingest.IngestShard.produce = produce_then_stop
"""


def test_a_store_that_stops_mid_run_fails_a_shard_that_a_rerun_finishes(s3, tmp_path):
    folder = tmp_path / "photos"
    write_good_images(folder, 5)
    s3.upload(folder, "s3://pics/photos")
    args = ["run", "Ingest", "--images", "s3://pics/photos/", "--dataset", "ds", "--out", str(tmp_path / "out"),
            *storage_args(s3), "--set", "pseudoseg.shards_per_task=1", "--set", "scheduler.retry_count=1"]
    code, text = run(args, s3_env(tmp_path, s3, KILL_THE_STORE))
    assert code == 1, text
    assert "StorageUnavailable" in text and "cannot read s3://pics/photos/" in text, text
    stage = next((tmp_path / "out" / "ds" / "ingest").glob("[0-9a-f]*"))
    done = sorted(p.name for p in (stage / "_meta").glob("shard-*.done.json"))
    assert len(done) == 1, done
    assert not list((stage / "_rejects").glob("*")) or all(
        not pq.read_table(p).num_rows for p in (stage / "_rejects").glob("*.parquet")), "no reject row: the store's fault"

    s3.stop()
    s3.start()  # an empty store again: the same objects uploaded again (same bytes, same ETags: the same plan)
    s3.upload(folder, "s3://pics/photos")
    code, text = run(args, s3_env(tmp_path, s3))
    assert code == 0, text
    assert "ran 2 unit(s), skipped 1 already done" in text, text
    assert sorted(p.name for p in (stage / "_meta").glob("shard-*.done.json")) == [
        "shard-000000.done.json", "shard-000001.done.json", "shard-000002.done.json"]
    rows = sum(pq.read_table(p).num_rows for p in stage.glob("shard-*.parquet"))
    assert rows == 5 and os.path.realpath(stage.parent / LATEST_LINK) == str(stage)
