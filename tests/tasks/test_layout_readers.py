"""Standard readers on the artifact layout: one glob (or one folder) is one table — duckdb, pyarrow.dataset and HF
datasets (parquet and webdataset builders) read the rows, the rejects and the payloads of a tiny Ingest run without
mixing them, and ``<stage>/latest/`` names only the last run's hash folder after a parameter change."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pyarrow.dataset as pads
import pytest

from pseudoseg.pipeline.core.artifacts import LATEST_FILE, StageDir
from pseudoseg.schemas import MANIFEST, REJECTS
from pseudoseg.tasks.report.cli import build
from pseudoseg.tasks.stages.ingest import Ingest
from tests.helpers import luigi_settings, write_good_images

GOOD = 5


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path]:
    """5 good images + 2 bad ones, 2 shards, built twice: the second run with another max_side (every image
    downsized: stored as PNG, one WebDataset column), so the stage folder holds two hash folders.
    Returns (images, out)."""
    tmp = tmp_path_factory.mktemp("readers")
    images = tmp / "images"
    write_good_images(images, GOOD)
    (images / "zz_bad.jpg").write_bytes(b"not an image")
    (images / "zz_empty.jpg").write_bytes(b"")
    out = tmp / "out"
    with luigi_settings(ingest={"shard_size": 4}):
        assert build("Ingest", str(images), "ds", str(out), summary=False)[0]
    with luigi_settings(ingest={"shard_size": 4, "max_side": 32}):
        assert build("Ingest", str(images), "ds", str(out), summary=False)[0]
    return images, out


def stage_dir(images: Path, out: Path, **ingest: int) -> StageDir:
    with luigi_settings(ingest={"shard_size": 4, **ingest}):
        return Ingest(images=str(images), dataset="ds", out=str(out)).requires()[0].stage_dir


def test_latest_names_the_last_runs_hash_folder(tree):
    images, out = tree
    old, new = stage_dir(images, out), stage_dir(images, out, max_side=32)
    assert old.hash != new.hash and old.path.is_dir() and new.path.is_dir()
    link = new.stage_path / "latest"
    assert link.is_symlink() and os.readlink(link) == new.hash, "a relative link to the hash folder"
    assert (new.stage_path / LATEST_FILE).read_text() == new.hash + "\n"
    params = json.loads((new.meta_path / "params.json").read_text())
    assert params["params"]["max_side"] == 32


def test_duckdb_glob_over_latest_is_exactly_the_new_rows(tree):
    images, out = tree
    latest = out / "ds" / "ingest" / "latest"
    rows = duckdb.sql(f"SELECT width, height, image_id FROM '{latest}/shard-*.parquet'").fetchall()
    assert len(rows) == GOOD, "rows only: no rejects, no second hash folder"
    assert all(max(w, h) == 32 for w, h, _ in rows), "the new parameters' rows"
    expected = MANIFEST.read_parquet(stage_dir(images, out, max_side=32).shard_path(0, "parquet")).num_rows
    assert duckdb.sql(f"SELECT count(*) FROM '{latest}/shard-000000.parquet'").fetchall() == [(expected,)]
    rejects = duckdb.sql(f"SELECT reason, count(*) FROM '{latest}/_rejects/shard-*.parquet' GROUP BY reason "
                         "ORDER BY reason").fetchall()
    assert rejects == [("empty_file", 1), ("not_an_image", 1)], rejects
    # every hash folder's own glob is one table too (no .rejects.parquet among the shards any more)
    for folder in (stage_dir(images, out).path, stage_dir(images, out, max_side=32).path):
        assert duckdb.sql(f"SELECT count(*) FROM '{folder}/shard-*.parquet'").fetchall() == [(GOOD,)]


def test_pyarrow_dataset_reads_the_folders_as_tables(tree):
    images, out = tree
    latest = out / "ds" / "ingest" / "latest"
    # _meta/ and _rejects/ are skipped by pyarrow's discovery (prefixes '_' and '.'); the .tar payloads are not
    # Parquet and are left out by exclude_invalid_files.
    rows = pads.dataset(latest, format="parquet", exclude_invalid_files=True).to_table()
    assert rows.num_rows == GOOD and set(MANIFEST.schema.names) <= set(rows.column_names)
    rejects = pads.dataset(latest / "_rejects", format="parquet").to_table()
    assert rejects.num_rows == 2 and rejects.schema.names == REJECTS.schema.names


def test_hf_datasets_parquet_and_webdataset_builders(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    images, out = tree
    latest = out / "ds" / "ingest" / "latest"
    cache = str(tmp_path / "hf")
    rows = datasets.load_dataset("parquet", data_files=str(latest / "shard-*.parquet"), split="train",
                                 cache_dir=cache)
    assert rows.num_rows == GOOD and all(max(w, h) == 32 for w, h in zip(rows["width"], rows["height"],
                                                                             strict=True))
    rejects = datasets.load_dataset("parquet", data_dir=str(latest / "_rejects"), split="train", cache_dir=cache)
    assert sorted(rejects["reason"]) == ["empty_file", "not_an_image"]
    payloads = datasets.load_dataset("webdataset", data_files=str(latest / "shard-*.tar"), split="train",
                                     cache_dir=cache)
    assert sorted(payloads["__key__"]) == sorted(rows["image_id"])
    first = payloads[0]
    assert max(first["png"].size) == 32  # the stored (downsized) image, decoded by datasets as a PIL image
    assert first["json"]["image_id"] == first["__key__"]
