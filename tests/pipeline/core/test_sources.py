"""Sources and planning: folder / list / Parquet list / WebDataset tars, deterministic ids and shards."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pseudoseg.pipeline.core.artifacts import sha256_hex, webdataset_tar_bytes
from pseudoseg.pipeline.core.sources import (
    ID_LENGTH,
    EntryReader,
    NotARegularFile,
    SourceError,
    list_source,
    num_shards,
    plan_entries,
    plan_reject,
    read_regular_file,
    source_path,
    source_text,
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


@settings(max_examples=200, deadline=None)
@given(name=st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b))
def test_source_text_is_printable_and_lossless(name):
    path = os.fsdecode(b"/data/" + name)  # how os.scandir hands out a name that is not UTF-8 (PEP 383)
    text = source_text(path)
    text.encode("utf-8")  # any Parquet / JSON writer takes it
    assert source_path(text) == path and os.fsencode(source_path(text)) == b"/data/" + name


def test_source_text_keeps_usual_names_and_escapes_the_rest():
    assert source_text("/d/ünïcode photo.jpg") == "/d/ünïcode photo.jpg"
    assert source_text(os.fsdecode(b"/d/caf\xe9.jpg")) == "/d/caf\\xe9.jpg"
    assert source_text("/d/a\\xe9.jpg") == "/d/a\\\\xe9.jpg"  # a real backslash cannot pass for an escape
    assert source_path("/d/a\\\\xe9.jpg") == "/d/a\\xe9.jpg"


def test_folder_listing_takes_extensionless_files_and_marks_what_cannot_be_read(tmp_path):
    write_good_images(tmp_path, 1)
    (tmp_path / "no_extension").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")  # another extension: not listed
    (tmp_path / "sub").mkdir()  # extensionless folders are folders, not entries
    (tmp_path / "x.jpg").mkdir()  # a folder named like an image: listed, unreadable later
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/null", tmp_path / "device")
    (tmp_path / "caf\udce9.png").write_bytes(b"x")  # a Latin-1 name, as os.listdir gives it
    listing = list_source(tmp_path)
    names = [e.removeprefix(f"{tmp_path}/") for e in listing.entries]
    assert names == ["caf\\xe9.png", "device", "good_000.jpg", "no_extension", "pipe.jpg", "x.jpg"]
    assert {k.removeprefix(f"{tmp_path}/"): v for k, v in listing.problems.items()} == {
        "device": "not_a_regular_file: a character device, not opened",
        "pipe.jpg": "not_a_regular_file: a FIFO (named pipe), not opened"}
    plan = {p.source.removeprefix(f"{tmp_path}/"): p for p in
            plan_entries(listing.entries, shard_size=10, problems=listing.problems)}
    assert plan_reject(plan["pipe.jpg"].read_error) == ("not_a_regular_file", "a FIFO (named pipe), not opened")
    assert plan_reject(plan["x.jpg"].read_error)[0] == "unreadable"
    assert plan["caf\\xe9.png"].read_error is None and plan["caf\\xe9.png"].num_bytes == 1


def test_reading_never_opens_a_fifo_or_device(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(NotARegularFile, match="FIFO"):
        read_regular_file(str(tmp_path / "pipe.jpg"))
    with pytest.raises(NotARegularFile, match="character device"), EntryReader() as reader:
        reader.read("/dev/zero")  # from a list file: not listed by us, still never read
    (missing,) = plan_entries([str(tmp_path / "gone.jpg")], shard_size=1)
    assert plan_reject(missing.read_error)[0] == "unreadable"
    assert plan_reject("PermissionError: [Errno 13] from an older plan") == (
        "unreadable", "PermissionError: [Errno 13] from an older plan")


def test_lists_with_names_that_are_not_utf8(tmp_path):
    (a,) = write_good_images(tmp_path / "imgs", 1)
    latin1 = os.path.join(os.fsencode(tmp_path / "imgs"), b"caf\xe9.jpg")
    os.rename(a, latin1)
    (tmp_path / "list.txt").write_bytes(b"imgs/caf\xe9.jpg\n")
    (entry,) = list_source(tmp_path / "list.txt").entries
    assert entry == f"{tmp_path}/imgs/caf\\xe9.jpg"
    with EntryReader() as reader:
        assert reader.read(entry) == Path(os.fsdecode(latin1)).read_bytes()
    # a manifest's or plan's 'source' column (source text) works as a list too
    pq.write_table(pa.table({"source": [entry]}), tmp_path / "manifest.parquet")
    assert list_source(tmp_path / "manifest.parquet").entries == (entry,)


def test_an_unlistable_folder_is_one_entry_with_its_problem(tmp_path, monkeypatch):
    write_good_images(tmp_path, 1)
    write_good_images(tmp_path / "locked", 1)
    write_good_images(tmp_path / "album.jpg", 1)  # a folder named like an image
    healthy = list_source(tmp_path)
    scandir = os.scandir

    def failing_scandir(path):  # root ignores chmod 000: the fault is injected
        if os.path.basename(path) in ("locked", "album.jpg"):
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", failing_scandir)
    listing = list_source(tmp_path)
    assert [e.removeprefix(f"{tmp_path}/") for e in listing.entries] == ["album.jpg", "good_000.jpg", "locked"]
    assert listing.problems == {
        f"{tmp_path}/{name}": f"unreadable_folder: cannot list folder {tmp_path}/{name}: PermissionError: "
                              "Permission denied" for name in ("album.jpg", "locked")}
    assert listing.fingerprint != healthy.fingerprint  # readable again → a new plan with its images
    assert f"{tmp_path}/locked/good_000.jpg" in healthy.entries
