"""Bad inputs through the real `pseudoseg` command: one image never sinks its shard, in any stage, and no file or
folder in the input tree aborts, hangs or silently shrinks the run. Faults are injected through a sitecustomize module
(tests/helpers.py `cli_env`), so no test hook lives in product code."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds

from schemas import REJECTS, SHARD_STATS
from schemas.features import SAM_EMBEDDINGS
from tests.helpers import cli, cli_env, tree_bytes, write_good_images

pytestmark = pytest.mark.slow

VICTIM_HW = (40, 56)  # the one image whose processing the fault below makes raise

FAIL_ONE_IMAGE = f"""
import models.segmenter as segmenter
_embed = segmenter.SamSegmenter.embed
def embed_or_fail(self, image):
    if tuple(image.shape[:2]) == {VICTIM_HW!r}:
        raise RuntimeError("injected: this image breaks SAM's image encoder")
    return _embed(self, image)
segmenter.SamSegmenter.embed = embed_or_fail
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
    (done,) = (out / "ds" / stage).glob("*/shard-000000.done.json")
    stats = SHARD_STATS.read_json(done)
    assert stats["in_count"] == stats["ok_count"] + stats["rejected_count"], (stage, stats)
    base = str(done).removesuffix(".done.json")
    return stats, REJECTS.read_parquet(base + ".rejects.parquet").to_pylist(), base


def tar_samples(path: str) -> dict[str, dict]:
    return {s["__key__"]: s for s in wds.WebDataset(path, shardshuffle=False, empty_check=False)}


def test_thin_giant_is_rejected_at_ingest_and_a_failing_image_is_one_reject_row_later(tmp_path):
    images = tmp_path / "images"
    write_good_images(images, 4)
    cv2.imwrite(str(images / "victim.png"), np.full((*VICTIM_HW, 3), 77, np.uint8))
    cv2.imwrite(str(images / "thin.png"), np.full((2, 20000, 3), 128, np.uint8))
    models = ["--set", f"models.cache_dir={tmp_path / 'models'}"]
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

