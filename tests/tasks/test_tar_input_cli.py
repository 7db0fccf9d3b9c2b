"""WebDataset tars as `--images`, through the real `pseudoseg` command: the images ingested are exactly the samples the
`webdataset` library yields (by key and by bytes), every other member is a reject row with its reason, in = ok +
rejected counts every member, and a tar that cannot be read is one row while the others are ingested — until it can
be read, when a rerun picks it up."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from pseudoseg.pipeline.core.artifacts import sha256_hex
from pseudoseg.pipeline.core.sources import ID_LENGTH, IMAGE_EXTENSIONS, tar_member_key
from tests.helpers import cli_env, write_good_images
from tests.tasks.test_bad_inputs_cli import ingest_rows, run

pytestmark = pytest.mark.slow


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def webdataset_images(tars: list[Path]) -> dict[str, set[str]]:
    """key ('./' dropped) → ids of the image payloads of every sample the webdataset library yields. Two members of
    one name in a row are webdataset's own error (``duplicate file name``): its ``warn_and_continue`` keeps the
    first, as the ingest does."""
    found: dict[str, set[str]] = {}
    for tar in tars:
        dataset = wds.WebDataset(str(tar), shardshuffle=False, empty_check=False, handler=wds.warn_and_continue)
        for sample in dataset:
            ids = {sha256_hex(v)[:ID_LENGTH] for k, v in sample.items()
                   if not k.startswith("__") and k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS}
            if ids:
                found.setdefault(sample["__key__"].removeprefix("./"), set()).update(ids)
    return found


@pytest.mark.filterwarnings("ignore::UserWarning")  # webdataset's warn_and_continue on the duplicate name
def test_tars_are_ingested_as_webdataset_reads_them_and_every_member_is_counted(tmp_path):
    folder, tars = tmp_path / "folder", tmp_path / "tars"
    tars.mkdir()
    good = write_good_images(folder, 4)
    (folder / "v1.0").mkdir()
    good[3].rename(folder / "v1.0" / "chelsea.jpg")  # a dotted folder: the old key was 'v1'
    (folder / "sub").mkdir()
    good[2].rename(folder / "sub" / "good_000.png")  # a basename shared with another folder: another key
    (folder / "good_000.json").write_text("{}")  # the sample's metadata: a member, not an image
    (folder / "link.jpg").symlink_to("good_000.jpg")
    subprocess.run(["tar", "-C", str(folder), "-cf", str(tars / "a.tar"), "."], check=True)  # ./good_000.jpg, ...
    extra = write_good_images(tmp_path / "extra", 3, seed=7)
    with tarfile.open(tars / "b.tar", "w") as tar:
        add(tar, "dup.jpg", extra[0].read_bytes())
        add(tar, "dup.jpg", extra[1].read_bytes())  # the same name again: the first is the sample
        add(tar, "other.png", extra[2].read_bytes())
        add(tar, "other.jpg", extra[0].read_bytes()[::-1])  # the same key, another image: duplicate_member
    members = sum(1 for t in ("a", "b") for m in tarfile.open(tars / f"{t}.tar").getmembers() if not m.isdir())
    assert members == 10

    out, spec = tmp_path / "out", str(tars / "{a,b,c}.tar")  # c.tar does not exist (yet)
    run("Ingest", Path(spec), out, cli_env(tmp_path), "--set", "ingest.shard_size=4")
    manifest, rejects = ingest_rows(out)  # in = ok + rejected, shard by shard
    assert len(manifest) + len(rejects) == members + 1, "every member is counted, and the missing tar once"

    ours = {tar_member_key(r["source"]): r["image_id"] for r in manifest}
    theirs = webdataset_images([tars / "a.tar", tars / "b.tar"])
    assert ours.keys() == theirs.keys() == {"good_000", "good_001", "sub/good_000", "v1.0/chelsea", "dup", "other"}
    assert all(ours[k] in theirs[k] for k in ours), "each key's image is one of webdataset's payloads for it"
    assert ours["dup"] == sha256_hex(extra[0].read_bytes())[:ID_LENGTH], "the first member of a repeated name"
    assert ours["other"] == sha256_hex(extra[2].read_bytes())[:ID_LENGTH], "the first member of a key"

    reasons = {r["source"].removeprefix(f"{tars}/"): r["reason"] for r in rejects}
    assert reasons == {"a.tar::./good_000.json": "non_image_member", "a.tar::./link.jpg": "not_a_regular_file",
                       "b.tar::dup.jpg#2": "duplicate_member", "b.tar::other.jpg": "duplicate_member",
                       "c.tar": "unreadable_tar"}
    (row,) = [r for r in rejects if r["reason"] == "unreadable_tar"]
    assert row["detail"].startswith("cannot read it: FileNotFoundError")

    # the missing tar appears: a new listing, so a new plan, holding its images too
    with tarfile.open(tars / "c.tar", "w") as tar:
        add(tar, "late.jpg", write_good_images(tmp_path / "late", 1, seed=9)[0].read_bytes())
    run("Ingest", Path(spec), out, cli_env(tmp_path), "--set", "ingest.shard_size=4")
    latest = out / "ds" / "ingest" / (out / "ds" / "ingest" / "LATEST").read_text().strip()
    manifest, rejects = ingest_rows(out, json.loads((latest / "_meta" / "params.json").read_text())["upstream"]["plan"])
    assert {tar_member_key(r["source"]) for r in manifest} == set(ours) | {"late"}
    assert "unreadable_tar" not in {r["reason"] for r in rejects}
    assert len(manifest) + len(rejects) == members + 1
