"""Contracts: writers validate, readers check version and field types with errors naming file/field/types."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pseudoseg.pipeline.core.artifacts import ShardOutput, StageDir, commit_shard, read_shard_stats
from pseudoseg.schemas import MANIFEST, REJECTS, SHARD_STATS, SchemaError

REJECT = {"image_id": "ab", "source": "x.jpg", "stage": "ingest", "reason": "truncated", "detail": "cut"}


def test_writer_rejects_missing_extra_and_mistyped_fields():
    with pytest.raises(SchemaError, match="missing fields \\['detail'\\]"):
        REJECTS.table([{k: v for k, v in REJECT.items() if k != "detail"}])
    with pytest.raises(SchemaError, match="extra fields \\['oops'\\]"):
        REJECTS.table([{**REJECT, "oops": 1}])
    with pytest.raises(SchemaError, match="field 'reason' expected string"):
        REJECTS.table([{**REJECT, "reason": 3.5}])
    with pytest.raises(SchemaError, match="'image_id' holds nulls"):
        REJECTS.table([{**REJECT, "image_id": None}])


def test_roundtrip_and_version_tag(tmp_path):
    path = tmp_path / "r.parquet"
    path.write_bytes(REJECTS.to_parquet_bytes(REJECTS.table([REJECT])))
    assert REJECTS.read_parquet(path).to_pylist() == [REJECT]
    assert pq.read_schema(path).metadata[b"pseudoseg.schema"] == b"rejects/v1"


def test_reader_names_file_and_versions_on_version_mismatch(tmp_path):
    table = REJECTS.table([REJECT])
    path = tmp_path / "old.parquet"
    pq.write_table(table.replace_schema_metadata({b"pseudoseg.schema": b"rejects/v0"}), path)
    with pytest.raises(SchemaError) as err:
        REJECTS.read_parquet(path)
    assert str(path) in str(err.value) and "expected rejects/v1, found rejects/v0" in str(err.value)
    # A foreign artifact of another kind is caught the same way.
    with pytest.raises(SchemaError, match="expected manifest/v1, found rejects/v1"):
        MANIFEST.read_parquet(_write(tmp_path / "r.parquet", REJECTS.to_parquet_bytes(table)))


def test_reader_names_field_and_types_on_type_mismatch(tmp_path):
    table = REJECTS.table([REJECT])
    wrong = table.set_column(table.schema.get_field_index("detail"), "detail", pa.array([7], pa.int64()))
    path = tmp_path / "wrong.parquet"
    pq.write_table(wrong.replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(SchemaError) as err:
        REJECTS.read_parquet(path)
    msg = str(err.value)
    assert str(path) in msg and "'detail'" in msg and "int64" in msg and "expected string" in msg


def test_unreadable_parquet_is_a_schema_error(tmp_path):
    with pytest.raises(SchemaError, match="not a readable Parquet"):
        REJECTS.read_parquet(_write(tmp_path / "junk.parquet", b"not parquet"))


def test_done_json_is_validated_on_read(tmp_path):
    stage = StageDir(tmp_path, "ds", "ingest", {"a": 1})
    stats = commit_shard(stage, 0, ShardOutput(files={"x": b"1"}, in_count=2, ok_count=1, rejected_count=1),
                         seconds=0.5)
    done = stage.done_path(0)
    assert read_shard_stats(done) == stats
    record = json.loads(done.read_text())
    record["ok_count"] = "one"
    done.write_text(json.dumps(record))
    with pytest.raises(SchemaError) as err:
        SHARD_STATS.read_json(done)
    assert str(done) in str(err.value) and "'ok_count' expected int64" in str(err.value)
    record["schema"] = "shard_stats/v9"
    done.write_text(json.dumps(record))
    with pytest.raises(SchemaError, match="expected shard_stats/v2, found shard_stats/v9"):
        SHARD_STATS.read_json(done)


def test_commit_refuses_counts_that_do_not_add_up(tmp_path):
    from pseudoseg.pipeline.core.artifacts import AccountingError

    stage = StageDir(tmp_path, "ds", "ingest", {})
    with pytest.raises(AccountingError):
        commit_shard(stage, 0, ShardOutput(in_count=3, ok_count=1, rejected_count=1), seconds=0)
    assert not stage.done_path(0).exists()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_tar_spool_streams_the_same_bytes_and_commits_by_rename(tmp_path):
    import hashlib

    from pseudoseg.pipeline.core.artifacts import TMP_PREFIX, TarSpool, webdataset_tar_bytes

    samples = [{"__key__": f"k{i}", "x.npy": bytes([i]) * (1000 + i), "json": b"{}"} for i in range(5)]
    stage = StageDir(tmp_path, "ds", "st", {"a": 1})
    target = stage.shard_path(0, "tar")
    with TarSpool(target) as spool:
        for s in samples:
            spool.write(s)
    assert spool.path.name.startswith(TMP_PREFIX) and spool.count == 5 and not target.exists()
    expected = webdataset_tar_bytes(samples)
    assert spool.path.read_bytes() == expected
    stats = commit_shard(stage, 0, ShardOutput(files={"tar": spool.path}, in_count=5, ok_count=5), seconds=0)
    assert target.read_bytes() == expected and not spool.path.exists()
    (entry,) = [f for f in stats["files"] if f["name"] == target.name]
    assert entry == {"name": target.name, "num_bytes": len(expected), "sha256": hashlib.sha256(expected).hexdigest()}


def test_tar_spool_removes_its_temporary_on_error(tmp_path):
    from pseudoseg.pipeline.core.artifacts import TarSpool

    target = tmp_path / "st" / "shard-000000.tar"
    with pytest.raises(RuntimeError, match="encoder died"):
        with TarSpool(target) as spool:
            spool.write({"__key__": "a", "json": b"{}"})
            raise RuntimeError("encoder died")
    assert list(target.parent.iterdir()) == []
