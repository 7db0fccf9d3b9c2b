"""Shared SAM image embeddings: stored once per image, read by USE box masks and FMbSeg Stage 1.1/1.2."""

from __future__ import annotations

import dataclasses
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pseudoseg.models.registry import ModelSettings, load_role, register_preset
from pseudoseg.models.roles import SamImageEmbedding
from pseudoseg.pipeline.core.artifacts import unit_file, webdataset_tar_bytes
from pseudoseg.pipeline.features.params import SamEmbeddingsParams
from pseudoseg.pipeline.features.sam_embeddings import ForwardLookup, embedding_sample, iter_sam_embeddings
from pseudoseg.schemas import REJECTS, SHARD_STATS
from pseudoseg.schemas.features import SAM_EMBEDDINGS
from pseudoseg.tasks.engine.base import build_tasks
from pseudoseg.tasks.stages.fmbseg import FmbsegAutoMasksShard, FmbsegLabels, FmbsegQueryMasksShard
from pseudoseg.tasks.stages.sam import SamEmbeddingsShard
from pseudoseg.tasks.stages.use import UseBoxMasksShard
from tests.helpers import luigi_settings
from tests.oracles import OracleClipEncoder, OracleGT, OracleSegmenter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ storage
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_embedding_sample_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(1, 256, 64, 64)).astype(np.float32)
    sample, record = embedding_sample("img", features, (375, 500), (768, 1024), "tiny:x",
                                      dataclasses.replace(SamEmbeddingsParams(), dtype=dtype))
    SAM_EMBEDDINGS.table([record])
    assert record["embedding_bytes"] == len(sample["sam.npy"]) and record["shape"] == [1, 256, 64, 64]
    tar = tmp_path / "s.tar"
    tar.write_bytes(webdataset_tar_bytes([sample]))
    ((image_id, back, rec),) = list(iter_sam_embeddings(str(tar)))
    assert image_id == "img" and rec == record and back.dtype == np.float32
    np.testing.assert_array_equal(back, features.astype(dtype).astype(np.float32))
    with pytest.raises(ValueError, match="dtype"):
        embedding_sample("img", features, (1, 1), (1, 1), "x", dataclasses.replace(SamEmbeddingsParams(), dtype="int8"))


def test_forward_lookup_reads_forward_only():
    lookup = ForwardLookup(iter([("a", 1, "ra"), ("b", 2, "rb"), ("c", 3, "rc")]))
    assert lookup.get("b") == (2, "rb")  # "a" skipped
    assert lookup.get("c") == (3, "rc")
    with pytest.raises(KeyError, match="out of the stored order"):
        lookup.get("a")


# ------------------------------------------------------------------------------------------------ SAM adapter
def test_automatic_masks_with_a_given_embedding_skip_the_encoder_and_agree(tiny_cache, gt):
    seg = load_role("segmenter", ModelSettings(preset="tiny", cache_dir=str(tiny_cache), keep_loaded=0))  # hooked below
    image = np.ascontiguousarray(gt.rgb[:120, :160])
    calls = []
    hook = seg.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    params = {"points_per_side": 4, "pred_iou_thresh": -1.0, "stability_score_thresh": -1.0}
    try:
        plain = seg.automatic_masks(image, **params)
        assert len(calls) == 1
        embedding = seg.embed(image)
        calls.clear()
        shared = seg.automatic_masks(image, embedding=embedding, **params)
        assert calls == []  # the image encoder did not run
    finally:
        hook.remove()
    assert len(plain) == len(shared) > 0
    for a, b in zip(plain, shared, strict=True):
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
        assert a["predicted_iou"] == b["predicted_iou"] and a["bbox"] == b["bbox"]
    other = SamImageEmbedding(embedding.features, (100, 100), embedding.input_size)
    with pytest.raises(ValueError, match="embedding of a"):
        seg.automatic_masks(image, embedding=other, **params)


# ------------------------------------------------------------------------------------------------ Luigi wiring
class CountingSegmenter(OracleSegmenter):
    """The oracle SAM, counting image encodings and recording which embeddings the automatic generator got."""

    embeds: list[tuple[int, int]] = []
    auto_embeddings: list[object] = []

    def __init__(self, gt: OracleGT, *, nan: bool = False) -> None:
        super().__init__(gt)
        self.nan = nan

    def embed(self, image):
        CountingSegmenter.embeds.append(np.asarray(image).shape[:2])
        emb = super().embed(image)
        if self.nan:
            emb = SamImageEmbedding(torch.full_like(emb.features, float("nan")), emb.original_size, emb.input_size)
        return emb

    def automatic_masks(self, image, *, embedding=None, **params):
        CountingSegmenter.auto_embeddings.append(embedding)
        return super().automatic_masks(image, **params)


def run_stage1(images: Path, out: Path, gt: OracleGT, *, share: bool, nan: bool = False) -> dict[str, Path]:
    register_preset("oracle-count", {"fmbseg_clip": lambda s: OracleClipEncoder(gt),
                                     "segmenter": lambda s: CountingSegmenter(gt, nan=nan)})
    CountingSegmenter.embeds, CountingSegmenter.auto_embeddings = [], []
    labels = images.parent / "labels.parquet"
    names = [gt.class_names[c] for c in np.unique(gt.class_label) if c not in (0, 255)]
    pq.write_table(pa.table({"file_name": ["voc.png"], "class_names": [names]}), labels)
    with luigi_settings(models={"preset": "oracle-count"}, sam_embeddings={"share": str(share).lower()},
                        fmbseg={"vocabulary": "voc20", "image_labels": str(labels), "short_side": 448}):
        result = build_tasks([FmbsegLabels(images=str(images), dataset="voc", out=str(out))],
                             local_scheduler=True, workers=1, log_level="WARNING")
        assert result.scheduling_succeeded, result.summary_text
        common = {"shard": 0, "images": str(images), "dataset": "voc", "out": str(out)}
        dirs = {"query": FmbsegQueryMasksShard(**common).stage_dir.path,
                "auto": FmbsegAutoMasksShard(**common).stage_dir.path}
        if share:
            dirs["sam"] = SamEmbeddingsShard(**common).stage_dir.path
            # the USE branch's box masks read the very same embedding shard
            assert UseBoxMasksShard(**common).requires()["sam"] == FmbsegQueryMasksShard(**common).requires()["sam"]
    return dirs


@pytest.fixture(scope="module")
def images(tmp_path_factory, gt) -> Path:
    import cv2

    folder = tmp_path_factory.mktemp("sam_share") / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "voc.png"), cv2.cvtColor(gt.rgb, cv2.COLOR_RGB2BGR))
    return folder


@pytest.mark.slow  # Stage 1 end to end twice (shared and own embeddings)
def test_stage1_encodes_each_image_once_when_shared(images, gt, tmp_path):
    shared = run_stage1(images, tmp_path / "shared", gt, share=True)
    assert CountingSegmenter.embeds == [gt.size]  # SamEmbeddingsShard only
    (embedding,) = CountingSegmenter.auto_embeddings
    assert isinstance(embedding, SamImageEmbedding) and embedding.original_size == gt.size
    rows = SAM_EMBEDDINGS.read_parquet(shared["sam"] / "shard-000000.parquet").to_pylist()
    assert [(r["height"], r["width"], r["dtype"]) for r in rows] == [(375, 500, "float16")]
    with tarfile.open(shared["sam"] / "shard-000000.tar") as tar:
        assert sorted(m.name.split(".", 1)[1] for m in tar.getmembers()) == ["json", "sam.npy"]

    unshared = run_stage1(images, tmp_path / "unshared", gt, share=False)
    assert CountingSegmenter.embeds == [gt.size, gt.size]  # Stage 1.1 and Stage 1.2 each encode the image
    for stage in ("query", "auto"):
        assert shared[stage].name != unshared[stage].name  # sharing is part of the stage hash
        a = pq.read_table(shared[stage] / "shard-000000.parquet").drop_columns(["image_id"])
        b = pq.read_table(unshared[stage] / "shard-000000.parquet").drop_columns(["image_id"])
        assert a.equals(b)


def test_a_rejected_embedding_becomes_rejects_downstream(images, gt, tmp_path):
    dirs = run_stage1(images, tmp_path / "nan", gt, share=True, nan=True)
    (bad,) = REJECTS.read_parquet(unit_file(dirs["sam"], 0, "rejects.parquet")).to_pylist()
    assert bad["reason"] == "nonfinite_embedding"
    query = REJECTS.read_parquet(unit_file(dirs["query"], 0, "rejects.parquet")).to_pylist()
    assert len(query) == 4 and {r["reason"] for r in query} == {"no_sam_embedding"}  # one per detected class
    (auto,) = REJECTS.read_parquet(unit_file(dirs["auto"], 0, "rejects.parquet")).to_pylist()
    assert auto["reason"] == "no_sam_embedding"
    for stage in ("sam", "query", "auto"):
        stats = SHARD_STATS.read_json(unit_file(dirs[stage], 0, "done.json"))
        assert stats["in_count"] == stats["ok_count"] + stats["rejected_count"] and stats["ok_count"] == 0
