"""Object-storage inputs against a real S3-compatible server on 127.0.0.1 (tests/s3server.py): a prefix is listed as
its folder is, tars and lists of s3:// URLs are read as local ones, an object gone between listing and reading is one
reject row naming its URL, and a store that cannot be reached fails the read (no reject row) after bounded retries."""

from __future__ import annotations

import tarfile
import time

import pytest

from pseudoseg.pipeline.core.ingest import ingest_entries
from pseudoseg.pipeline.core.params import DecodeLimits, StorageParams
from pseudoseg.pipeline.core.sources import (
    EntryReader,
    list_source,
    plan_entries,
    relative_name,
    source_problem,
)
from pseudoseg.pipeline.core.storage import StorageUnavailable
from tests.helpers import write_good_images


def settings(server) -> StorageParams:
    return StorageParams(endpoint_url=server.endpoint, retries=1, retry_seconds=0.05, timeout_seconds=5)


def test_a_prefix_is_listed_as_its_folder_is_and_reads_the_same_bytes(s3, tmp_path):
    folder = tmp_path / "photos"
    write_good_images(folder, 3)
    write_good_images(folder / "sub", 2, seed=1)
    (folder / ".hidden.jpg").write_bytes(b"x")
    (folder / "notes.txt").write_text("not listed")
    (folder / "README").write_text("no extension: listed, rejected when decoded")
    s3.upload(folder, "s3://pics/photos")
    local, bucket = list_source(folder), list_source("s3://pics/photos/", storage=settings(s3))
    assert [relative_name(folder, e) for e in local.entries] == [
        relative_name("s3://pics/photos/", e) for e in bucket.entries]
    assert bucket.entries[0].startswith("s3://pics/photos/") and len(bucket.entries) == 6
    assert list_source("s3://pics/photos", storage=settings(s3)).entries == bucket.entries, "the / is optional"
    with EntryReader(settings(s3)) as remote, EntryReader() as disk:
        assert [remote.read(e) for e in bucket.entries] == [disk.read(e) for e in local.entries]
    again = list_source("s3://pics/photos/", storage=settings(s3))
    assert again.fingerprint == bucket.fingerprint, "same objects, same listing"
    s3.fs().pipe("pics/photos/good_000.jpg", b"changed")
    assert list_source("s3://pics/photos/", storage=settings(s3)).fingerprint != bucket.fingerprint


def test_tars_and_lists_of_s3_urls_read_as_local_ones(s3, tmp_path):
    images = write_good_images(tmp_path / "img", 4)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        with tarfile.open(shards / f"shards-{i:03d}.tar", "w") as tar:
            for image in images[2 * i:2 * i + 2]:
                tar.add(image, arcname=image.name)
    s3.upload(shards, "s3://pics/wds")
    s3.upload(tmp_path / "img", "s3://pics/img")
    local = list_source(str(shards / "shards-{000..001}.tar"))
    bucket = list_source("s3://pics/wds/shards-{000..001}.tar", storage=settings(s3))
    assert [e.split("::", 1)[1] for e in bucket.entries] == [e.split("::", 1)[1] for e in local.entries]
    assert list_source("s3://pics/wds/shards-*.tar", storage=settings(s3)).entries == bucket.entries
    with EntryReader(settings(s3)) as remote, EntryReader() as disk:
        assert [remote.read(e) for e in bucket.entries] == [disk.read(e) for e in local.entries]

    lines = ["good_000.jpg", "s3://pics/img/good_001.png", "http://127.0.0.1:1/x.jpg", "s3://pics/img/missing.jpg"]
    s3.fs().pipe("pics/img/list.txt", "\n".join(lines).encode())
    listed = list_source("s3://pics/img/list.txt", storage=settings(s3))
    assert listed.entries == ("http://127.0.0.1:1/x.jpg", "s3://pics/img/good_000.jpg", "s3://pics/img/good_001.png",
                              "s3://pics/img/missing.jpg")
    assert list(listed.problems) == ["http://127.0.0.1:1/x.jpg"], "http(s) only where allow_urls says so"
    assert listed.problems["http://127.0.0.1:1/x.jpg"].startswith("unsupported_url: http:// is read only where")
    planned = list(plan_entries(listed.entries, 10, problems=listed.problems, storage=settings(s3)))
    errors = {p.source: p.read_error for p in planned if p.read_error}
    assert errors.keys() == {"http://127.0.0.1:1/x.jpg", "s3://pics/img/missing.jpg"}
    assert errors["s3://pics/img/missing.jpg"].startswith("unreadable: ") and "s3://pics/img/missing.jpg" in errors[
        "s3://pics/img/missing.jpg"]


def test_an_object_deleted_between_listing_and_reading_is_one_reject_row_naming_it(s3, tmp_path):
    write_good_images(tmp_path / "photos", 4)
    s3.upload(tmp_path / "photos", "s3://pics/photos")
    storage = settings(s3)
    listing = list_source("s3://pics/photos/", storage=storage)
    planned = list(plan_entries(listing.entries, 10, problems=listing.problems, storage=storage))
    assert all(p.read_error is None for p in planned)
    gone = "s3://pics/photos/good_002.jpg"
    s3.fs().rm(gone.removeprefix("s3://"))
    with EntryReader(storage) as reader:
        result = ingest_entries(planned, reader.read, DecodeLimits())
    assert len(result.manifest) == 3
    (row,) = result.rejects
    assert (row["source"], row["reason"]) == (gone, "unreadable") and gone in row["detail"], row


def test_a_store_that_cannot_be_reached_fails_the_read_after_bounded_retries(s3, tmp_path):
    write_good_images(tmp_path / "photos", 1)
    s3.upload(tmp_path / "photos", "s3://pics/photos")
    storage = settings(s3)
    (entry,) = list_source("s3://pics/photos/", storage=storage).entries
    s3.stop()
    started = time.monotonic()
    with EntryReader(storage) as reader, pytest.raises(StorageUnavailable, match="after 2 attempt") as raised:
        reader.read(entry)
    assert not isinstance(raised.value, OSError), "the store's fault: no reject row, the shard fails"
    assert time.monotonic() - started < 20
    with pytest.raises(StorageUnavailable):
        list(plan_entries([entry], 10, storage=storage))


def test_a_source_of_another_scheme_is_refused_in_words():
    assert "gs:// is not a source" in source_problem("gs://bucket/photos/")
    assert source_problem("s3://bucket/photos/") is None, "checked when listed (that needs the store)"
