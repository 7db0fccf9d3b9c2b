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
    images = [e for e in listing.entries if e not in listing.problems]
    assert len(images) == 6 and all("::" in e and e.endswith(".jpg") for e in images)
    # every member is an entry: each sample's .txt is a reject row, never read
    assert {e: listing.problems[e] for e in listing.entries if e.endswith(".txt")} == {
        f"{tmp_path}/shard-{i}.tar::s{i}_{j}.txt": f"non_image_member: .txt of sample 's{i}_{j}' is not an image type"
        for i in range(2) for j in range(3)}
    with EntryReader() as reader:
        assert reader.read(images[0]) == paths[0].read_bytes()
    assert list_source(str(tmp_path / "shard-*.tar")).entries == listing.entries


WEBDATASET_NAMES = ["a.jpg", "a.seg.png", "v1.0/chelsea.jpg", "x/y.z/w.tar.gz", "deep/er/n.JPG", "noext", "d/noext",
                    "d.x/noext", ".hidden.jpg", "a.b.c.d", "name with space.png", "caf\xe9.jpg"]


def test_member_keys_are_webdataset_keys():
    """The key and extensions of a member name are what webdataset's own grouping computes (its base_plus_ext),
    for names with and without folders, dots in folders, several extensions, none. Two differences: the './' of
    `tar -C dir .`, which webdataset keeps in every key and we drop, and a hidden name in a folder, which webdataset
    files under the folder's name as a key ('d/' with extensions 'x.jpg') and we give no key (a reject row)."""
    from webdataset.tariterators import base_plus_ext

    from pseudoseg.pipeline.core.sources import webdataset_key

    for name in WEBDATASET_NAMES:
        theirs = base_plus_ext(name)
        assert webdataset_key(name) == (None if theirs == (None, None) else theirs), name
        key = base_plus_ext(f"./{name}")[0]
        assert webdataset_key(f"./{name}") == (None if key is None else (key.removeprefix("./"), theirs[1])), name
    assert base_plus_ext("d/.x.jpg") == ("d/", "x.jpg") and webdataset_key("d/.x.jpg") is None
    assert webdataset_key("v1.0/chelsea.jpg") == ("v1.0/chelsea", "jpg")
    assert webdataset_key("././a.seg.png") == ("a", "seg.png")


def test_tar_members_by_the_webdataset_convention(tmp_path):
    """Every member is an entry with its fate: image members by key (first in tar order), duplicates of a key, a
    sample's other members, links (never followed); a name packed twice is addressed by ``#2``; a missing tar is one
    row and the others are listed; a tar cut short lists what it can plus one row."""
    import io
    import tarfile

    def add(tar, name, data=None, **kw):
        info = tarfile.TarInfo(name)
        for k, v in kw.items():
            setattr(info, k, v)
        info.size = len(data or b"")
        tar.addfile(info, io.BytesIO(data) if data else None)

    a, b, c = (p.read_bytes() for p in write_good_images(tmp_path / "imgs", 3))
    with tarfile.open(tmp_path / "one.tar", "w") as tar:
        add(tar, "./", type=tarfile.DIRTYPE)
        add(tar, "./dup.jpg", a)
        add(tar, "./dup.json", b"{}")
        add(tar, "./v1.0/chelsea.jpg", b)
        add(tar, "./dup.jpg", c)
        add(tar, "./dup.png", c)
        add(tar, "./sym.jpg", type=tarfile.SYMTYPE, linkname="dup.jpg")
        add(tar, "./hard.jpg", type=tarfile.LNKTYPE, linkname="./v1.0/chelsea.jpg")
        add(tar, "./README", b"text")
    data = (tmp_path / "one.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:512 * 3])  # dup.jpg's header and the start of its data
    listing = list_source(f"{tmp_path}/{{one,missing,cut}}.tar")
    one, cut, missing = (f"{tmp_path}/{n}.tar" for n in ("one", "cut", "missing"))
    assert {e: listing.problems.get(e, "").split(":")[0] for e in listing.entries} == {
        f"{one}::./dup.jpg": "", f"{one}::./dup.json": "non_image_member", f"{one}::./v1.0/chelsea.jpg": "",
        f"{one}::./dup.jpg#2": "duplicate_member", f"{one}::./dup.png": "duplicate_member",
        f"{one}::./sym.jpg": "not_a_regular_file", f"{one}::./hard.jpg": "not_a_regular_file",
        f"{one}::./README": "non_image_member", missing: "unreadable_tar", f"{cut}::./dup.jpg": "",
        cut: "unreadable_tar"}
    assert listing.problems[f"{one}::./hard.jpg"] == ("not_a_regular_file: tar member is a hard link to "
                                                      "'./v1.0/chelsea.jpg', not followed")
    assert listing.problems[f"{one}::./dup.png"] == ("duplicate_member: webdataset key 'dup' already taken by member "
                                                     "'./dup.jpg' (the first in tar order is ingested)")
    assert listing.problems[cut].startswith("unreadable_tar: cannot list past member './dup.jpg': ReadError")
    assert listing.problems[missing].startswith("unreadable_tar: cannot read it: FileNotFoundError")
    with EntryReader() as reader:  # the first of two members of one name, not the last (tarfile's getmember)
        assert reader.read(f"{one}::./dup.jpg") == a and reader.read(f"{one}::./dup.jpg#2") == c
        with pytest.raises(NotARegularFile, match="symbolic link"):
            reader.read(f"{one}::./sym.jpg")
    with pytest.raises(SourceError, match="no tar of .* can be read"):
        list_source(f"{tmp_path}/{{missing,gone}}.tar")


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


def test_relative_name_is_the_path_under_the_source_root(tmp_path):
    """What ground truth keyed by path (COCO's file_name) is matched by: under the folder, the member's name, under
    the list's folder."""
    from pseudoseg.pipeline.core.sources import relative_name

    (tmp_path / "imgs" / "dogs").mkdir(parents=True)
    (tmp_path / "list.txt").write_text("imgs/dogs/0001.jpg\n")
    assert relative_name(tmp_path / "imgs", f"{tmp_path}/imgs/dogs/0001.jpg") == "dogs/0001.jpg"
    assert relative_name(f"{tmp_path}/imgs/", f"{tmp_path}/imgs/dogs/0001.jpg") == "dogs/0001.jpg"
    assert relative_name(tmp_path / "list.txt", f"{tmp_path}/imgs/dogs/0001.jpg") == "imgs/dogs/0001.jpg"
    assert relative_name(tmp_path / "list.txt", "/elsewhere/x.jpg") == "/elsewhere/x.jpg"
    assert relative_name(f"{tmp_path}/s-{{0..1}}.tar", f"{tmp_path}/s-0.tar::././v1.0/chelsea.jpg") == "v1.0/chelsea.jpg"


def test_a_gzip_compressed_tar_is_listed_whole(tmp_path):
    """tarfile reads a compressed .tar too; its offsets are the uncompressed stream's, so the end-of-archive check
    (a plain tar's) must not call it truncated."""
    import tarfile

    (image,) = write_good_images(tmp_path / "imgs", 1)
    with tarfile.open(tmp_path / "z.tar", "w:gz") as tar:
        tar.add(image, arcname="a.jpg")
    listing = list_source(str(tmp_path / "z.tar"))
    assert listing.entries == (f"{tmp_path}/z.tar::a.jpg",) and listing.problems == {}
    with EntryReader() as reader:
        assert reader.read(listing.entries[0]) == image.read_bytes()


def test_a_list_keeps_every_line_as_an_entry_and_names_what_it_cannot_read(tmp_path):
    write_good_images(tmp_path / "img", 2)
    lines = ["img/good_000.jpg", "./img/good_000.jpg", "img/sub/../good_000.jpg", str(tmp_path / "img" / "good_001.png"),
             "ftp://bucket/photo.jpg", "https://example.org/p.png", "https://example.org/p.png", "img/bad\x00name.jpg"]
    listing_file = tmp_path / "list.txt"
    listing_file.write_bytes(("\n".join(lines) + "\n").encode())
    listing = list_source(listing_file)
    assert len(listing.entries) == len(lines) == len(set(listing.entries)), "one entry per line"
    reasons = sorted(problem.split(":", 1)[0] for problem in listing.problems.values())
    assert reasons == ["invalid_path", "listed_twice", "listed_twice", "unsupported_url", "unsupported_url",
                       "unsupported_url"]
    assert listing.problems["ftp://bucket/photo.jpg"].startswith("unsupported_url: ftp:// is not read")
    assert listing.problems["https://example.org/p.png"].startswith(
        "unsupported_url: https:// is read only where [ingest] allow_urls = true"), "never by default"
    readable = [e for e in listing.entries if e not in listing.problems]
    assert sorted(os.path.relpath(source_path(e), tmp_path) for e in readable) == ["img/good_000.jpg",
                                                                                  "img/good_001.png"]
    planned = list(plan_entries(listing.entries, 100, problems=listing.problems))
    assert len({p.image_id for p in planned}) == len(planned), "no two entries share an id (one tar member each)"
    assert sum(p.read_error is None for p in planned) == 2


def test_linked_folders_are_entered_once_and_a_loop_is_one_row(tmp_path):
    root = tmp_path / "photos"
    write_good_images(root / "real", 2)
    write_good_images(tmp_path / "elsewhere", 1, seed=3)
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # followed: its image is listed
    (root / "again").symlink_to(root / "real", target_is_directory=True)  # a second way to `real`
    (root / "real" / "up").symlink_to(root, target_is_directory=True)  # a loop back to the root
    listing = list_source(root)
    names = sorted(os.path.relpath(e, root) for e in listing.entries)
    assert names == ["again", "linked/good_000.jpg", "real/good_000.jpg", "real/good_001.png", "real/up"]
    seen = {os.path.relpath(e, root): p.split(":", 1)[0] for e, p in listing.problems.items()}
    assert seen == {"again": "linked_folder_seen", "real/up": "linked_folder_seen"}
    assert "real" in listing.problems[str(root / "again")]
    assert list_source(root) == listing  # deterministic
