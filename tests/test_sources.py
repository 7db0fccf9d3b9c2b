"""Sources and planning: folder / list / Parquet list / WebDataset tars, deterministic ids and shards."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.artifacts import sha256_hex, webdataset_tar_bytes
from pipeline.sources import (
    ID_LENGTH,
    EntryReader,
    SourceError,
    list_source,
    num_shards,
    plan_entries,
)
from tests.helpers import write_good_images


def test_folder_listing_is_recursive_sorted_and_filters_non_images(tmp_path):
    write_good_images(tmp_path / "b", 2)
    write_good_images(tmp_path / "a" / "deep", 1)
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "photo.HEIC").write_bytes(b"x")  # listed, so it is rejected with a reason later
    listing = list_source(tmp_path)
    names = [os.path.relpath(e, tmp_path) for e in listing.entries]
    assert names == ["a/deep/good_000.jpg", "b/good_000.jpg", "b/good_001.png", "photo.HEIC"]
    assert list_source(tmp_path) == listing


def test_fingerprint_changes_when_files_change(tmp_path):
    paths = write_good_images(tmp_path, 2)
    before = list_source(tmp_path).fingerprint
    paths[0].write_bytes(paths[1].read_bytes() + b"x")
    assert list_source(tmp_path).fingerprint != before


def test_text_and_parquet_lists(tmp_path):
    paths = write_good_images(tmp_path / "imgs", 3)
    (tmp_path / "list.txt").write_text("# comment\nimgs/good_002.jpg\n\nimgs/good_000.jpg\n")
    listing = list_source(tmp_path / "list.txt")
    assert listing.entries == (str(tmp_path / "imgs/good_000.jpg"), str(tmp_path / "imgs/good_002.jpg"))
    pq.write_table(pa.table({"path": [str(p) for p in paths]}), tmp_path / "list.parquet")
    assert list_source(tmp_path / "list.parquet").entries == tuple(sorted(str(p) for p in paths))


def test_webdataset_tars_as_input(tmp_path):
    paths = write_good_images(tmp_path / "imgs", 3)
    for i in range(2):
        samples = [{"__key__": f"s{i}_{j}", "jpg": p.read_bytes(), "txt": b"caption"} for j, p in enumerate(paths)]
        (tmp_path / f"shard-{i}.tar").write_bytes(webdataset_tar_bytes(samples))
    listing = list_source(str(tmp_path / "shard-{0..1}.tar"))
    assert len(listing.entries) == 6 and all("::" in e and e.endswith(".jpg") for e in listing.entries)
    with EntryReader() as reader:
        assert reader.read(listing.entries[0]) == paths[0].read_bytes()
    assert list_source(str(tmp_path / "shard-*.tar")).entries == listing.entries


def test_unusable_spec_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match="neither a folder"):
        list_source(tmp_path / "missing")
    with pytest.raises(SourceError, match="no tar files match"):
        list_source(str(tmp_path / "none-*.tar"))


def test_plan_ids_duplicates_and_unreadable(tmp_path):
    a, b = write_good_images(tmp_path, 2)
    dup = tmp_path / "z_dup.jpg"
    dup.write_bytes(a.read_bytes())
    missing = str(tmp_path / "gone.jpg")
    plan = list(plan_entries([str(a), str(b), str(dup), missing], shard_size=3))
    assert [p.shard for p in plan] == [0, 0, 0, 1]
    assert plan[0].image_id == sha256_hex(a.read_bytes())[:ID_LENGTH]
    assert plan[2].duplicate_of == str(a) and plan[2].image_id == plan[0].image_id
    assert plan[3].read_error and "FileNotFoundError" in plan[3].read_error
    assert len({p.image_id for p in plan}) == 3


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 5000), size=st.integers(1, 700))
def test_num_shards_covers_every_entry_exactly(n, size):
    shards = num_shards(n, size)
    if n == 0:
        assert shards == 1  # an empty dataset still has one (empty) shard, so every stage has a target
    else:
        assert (shards - 1) * size < n <= shards * size  # no empty shard, none missing
