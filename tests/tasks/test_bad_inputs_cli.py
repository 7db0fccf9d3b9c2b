"""Bad inputs through the real `pseudoseg` command: one image never sinks its shard, in any stage, and no file or
folder in the input tree aborts, hangs or silently shrinks the run. Faults are injected through a sitecustomize module
(tests/helpers.py `cli_env`), so no test hook lives in product code."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds

from pseudoseg.pipeline.core.artifacts import LATEST_FILE, record_unit_file, sha256_hex
from pseudoseg.pipeline.core.sources import source_path
from pseudoseg.schemas import MANIFEST, REJECTS, SHARD_STATS
from pseudoseg.schemas.features import SAM_EMBEDDINGS
from pseudoseg.tasks.report.status import hash_folders
from tests.helpers import cli, cli_env, tree_bytes, write_good_images

pytestmark = pytest.mark.slow

VICTIM_HW = (40, 56)  # the one image whose processing the fault below makes raise

# SAM's encoder runs on batches of images (embed is a batch of one): a batch holding the victim fails, and the stage
# redoes its images one by one to find it.
FAIL_ONE_IMAGE = f"""
import pseudoseg.models.adapters.segmenter as segmenter
_embed_batch = segmenter.SamSegmenter.embed_batch
def embed_batch_or_fail(self, images, prepared=None):
    if any(tuple(image.shape[:2]) == {VICTIM_HW!r} for image in images):
        raise RuntimeError("injected: this image breaks SAM's image encoder")
    return _embed_batch(self, images, prepared)
segmenter.SamSegmenter.embed_batch = embed_batch_or_fail
"""


def run(stage: str, images: Path, out: Path, env: dict[str, str], *extra: str) -> str:
    proc = cli(["run", stage, "--images", str(images), "--dataset", "ds", "--out", str(out), *extra], env)
    try:
        text, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # e.g. blocked opening a FIFO
        proc.kill()
        raise AssertionError(f"pseudoseg run {stage} hangs:\n{proc.communicate()[0]}") from None
    assert proc.returncode == 0, text
    return text


def stage_files(out: Path, stage: str) -> tuple[dict, list[dict], str]:
    """(done.json stats, reject rows, shard base path) of the single shard of ``stage``."""
    (done,) = (out / "ds" / stage).glob("latest/_meta/shard-000000.done.json")
    stats = SHARD_STATS.read_json(done)
    assert stats["in_count"] == stats["ok_count"] + stats["rejected_count"], (stage, stats)
    base = str(record_unit_file(done, "parquet")).removesuffix(".parquet")  # data files: shard-N.<suffix>
    return stats, REJECTS.read_parquet(record_unit_file(done, "rejects.parquet")).to_pylist(), base


def tar_samples(path: str) -> dict[str, dict]:
    return {s["__key__"]: s for s in wds.WebDataset(path, shardshuffle=False, empty_check=False)}


def test_thin_giant_is_rejected_at_ingest_and_a_failing_image_is_one_reject_row_later(tmp_path, tiny_cache):
    images = tmp_path / "images"
    write_good_images(images, 4)
    cv2.imwrite(str(images / "victim.png"), np.full((*VICTIM_HW, 3), 77, np.uint8))
    cv2.imwrite(str(images / "thin.png"), np.full((2, 20000, 3), 128, np.uint8))
    models = ["--set", f"models.cache_dir={tiny_cache}"]
    out, reference = tmp_path / "out", tmp_path / "reference"
    faulty = cli_env(tmp_path, FAIL_ONE_IMAGE)

    run("SamEmbeddings", images, out, faulty, *models)

    stats, rejects, _ = stage_files(out, "ingest")
    assert (stats["in_count"], stats["ok_count"]) == (6, 5)
    assert [(Path(r["source"]).name, r["reason"], r["detail"]) for r in rejects] == [
        ("thin.png", "too_small", "20000x2 is stored as 2048x1 (long side fit to max_side 2048): shorter side < 2")]

    stats, rejects, base = stage_files(out, "sam_embeddings")
    assert (stats["in_count"], stats["ok_count"], stats["rejected_count"]) == (5, 4, 1)
    (row,) = rejects
    assert (Path(row["source"]).name, row["reason"], row["stage"]) == ("victim.png", "image_error", "sam_embeddings")
    assert row["detail"] == "RuntimeError: injected: this image breaks SAM's image encoder"

    # the shard-mates are intact: the same records and payloads as a run without the fault
    run("SamEmbeddings", images, reference, cli_env(tmp_path / "ref"), *models)
    _, _, ref_base = stage_files(reference, "sam_embeddings")
    ref_rows = {r["image_id"]: r for r in SAM_EMBEDDINGS.read_parquet(ref_base + ".parquet").to_pylist()}
    rows = {r["image_id"]: r for r in SAM_EMBEDDINGS.read_parquet(base + ".parquet").to_pylist()}
    assert set(ref_rows) - set(rows) == {row["image_id"]} and all(rows[k] == ref_rows[k] for k in rows)
    samples, ref_samples = tar_samples(base + ".tar"), tar_samples(ref_base + ".tar")
    assert set(samples) == set(rows)
    for key, sample in samples.items():
        assert json.loads(sample["json"]) == json.loads(ref_samples[key]["json"])
        assert sample["sam.npy"] == ref_samples[key]["sam.npy"]

    # a rerun is a no-op: nothing is rewritten (done.json keeps even its seconds)
    before = tree_bytes(out)
    run("SamEmbeddings", images, out, faulty, *models)
    assert tree_bytes(out) == before


LOCKED = "locked"
LOCK_FOLDER = f"""
import os
_scandir = os.scandir
def scandir(path="."):
    # root does not feel chmod 000: the folder is made unlistable here instead
    if os.path.basename(os.fsdecode(path)) == {LOCKED!r}:
        raise PermissionError(13, "Permission denied", path)
    return _scandir(path)
os.scandir = scandir
"""


def awkward_folder(folder: Path) -> tuple[dict[str, str], dict[str, Path]]:
    """Good images under awkward names next to entries that cannot be images. Returns ({source name: expected reject
    reason}, {source name as stored: path of a good image})."""
    good = dict(zip(["good_000.jpg", "good_001.png"], write_good_images(folder, 2), strict=True))
    (locked,) = write_good_images(folder / LOCKED, 1, seed=1)
    renamed = write_good_images(folder / "tmp", 3, seed=2)
    latin1 = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")  # not UTF-8: 'café' from a Latin-1 archive
    os.rename(renamed[0], latin1)
    good["caf\\xe9.jpg"] = Path(os.fsdecode(latin1))
    good["no_extension"] = renamed[1].rename(folder / "no_extension")  # a PNG by content
    good["back\\\\slash.png"] = renamed[2].rename(folder / "back\\slash.png")  # a JPEG named .png
    (folder / "tmp").rmdir()
    (folder / "README").write_text("extensionless, listed, and not an image")
    os.mkfifo(folder / "pipe.jpg")  # opening it for reading would wait for a writer forever
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.png"))
    sock.close()
    os.symlink("/dev/zero", folder / "device.jpg")  # reading it would never end
    expected = {"README": "not_an_image", "pipe.jpg": "not_a_regular_file", "sock.png": "not_a_regular_file",
                "device.jpg": "not_a_regular_file", LOCKED: "unreadable_folder"}
    return expected, {**good, f"{LOCKED}/good_000.jpg": locked}


def ingest_rows(out: Path, plan_hash: str | None = None) -> tuple[list[dict], list[dict]]:
    """(manifest rows, reject rows) over all shards of the one ingest folder (of the plan whose content digest is
    ``plan_hash``)."""
    manifest, rejects = [], []
    folders = [f for f in (out / "ds" / "ingest").iterdir() if f.is_dir() and not f.is_symlink()
               and (plan_hash is None or json.loads((f / "_meta" / "params.json").read_text())["upstream"]["plan"] == plan_hash)]
    (folder,) = folders
    for done in sorted(folder.glob("_meta/*.done.json")):
        stats = SHARD_STATS.read_json(done)
        shard_manifest = MANIFEST.read_parquet(record_unit_file(done, "parquet")).to_pylist()
        shard_rejects = REJECTS.read_parquet(record_unit_file(done, "rejects.parquet")).to_pylist()
        assert stats["in_count"] == stats["ok_count"] + stats["rejected_count"]
        assert (stats["ok_count"], stats["rejected_count"]) == (len(shard_manifest), len(shard_rejects))
        manifest += shard_manifest
        rejects += shard_rejects
    return manifest, rejects


def same_artifacts(tree: dict[str, bytes], reference: dict[str, bytes]) -> None:
    """Every file of ``reference`` is in ``tree`` with the same bytes (done.json: all but ``seconds``)."""
    for rel, data in reference.items():
        assert rel in tree, rel
        if rel.endswith(".done.json"):
            a, b = json.loads(tree[rel]), json.loads(data)
            a.pop("seconds"), b.pop("seconds")
            assert a == b, rel
        else:
            assert tree[rel] == data, rel


def test_awkward_folder_entries_become_reject_rows_and_a_rerun_heals(tmp_path):
    images = tmp_path / "images"
    expected, good = awkward_folder(images)
    out, clean = tmp_path / "out", tmp_path / "clean"
    shards = ["--set", "ingest.shard_size=4"]
    locked_env = cli_env(tmp_path, LOCK_FOLDER)

    run("Ingest", images, out, locked_env, *shards)  # no abort (non-UTF-8 name), no hang (FIFO, device)
    manifest, rejects = ingest_rows(out)
    prefix = str(images) + "/"
    assert {r["source"].removeprefix(prefix): r["reason"] for r in rejects} == expected
    (folder_row,) = [r for r in rejects if r["reason"] == "unreadable_folder"]
    assert folder_row["detail"] == f"cannot list folder {images / LOCKED}: PermissionError: Permission denied"
    stored = {r["source"].removeprefix(prefix): r for r in manifest}
    assert set(stored) == set(good) - {f"{LOCKED}/good_000.jpg"}, "no good image lost"
    for name, row in stored.items():  # the stored text maps back to the file, whose bytes were ingested
        assert Path(source_path(row["source"])) == good[name]
        assert row["sha256"] == sha256_hex(good[name].read_bytes())
    assert (stored["no_extension"]["orig_format"], stored["no_extension"]["stored_ext"]) == ("PNG", "png")

    before = tree_bytes(out)
    run("Ingest", images, out, locked_env, *shards)  # same inputs: a no-op
    assert tree_bytes(out) == before

    # the folder readable again: a new listing, so a new plan, holding its image too; byte-identical to a run
    # that never saw the fault (the first run's folders stay beside it, untouched)
    run("Ingest", images, out, cli_env(tmp_path), *shards)
    run("Ingest", images, clean, cli_env(tmp_path), *shards)
    healed = tree_bytes(out)
    same_artifacts(healed, tree_bytes(clean))
    assert all(healed[k] == v for k, v in before.items() if Path(k).name != LATEST_FILE)  # the pointer moved on
    (plan,) = hash_folders(clean / "ds" / "plan")
    (record,) = json.loads((plan / "_meta" / "plan.done.json").read_text())["files"]
    manifest, rejects = ingest_rows(out, record["sha256"][:16])  # ingest folders name their plan by its content
    assert {r["source"].removeprefix(prefix) for r in manifest} == set(good)
    assert {r["source"].removeprefix(prefix): r["reason"] for r in rejects} == {
        k: v for k, v in expected.items() if k != LOCKED}
