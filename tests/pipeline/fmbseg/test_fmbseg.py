"""FMbSeg Stage 1 pure logic (pipeline/fmbseg/pseudo_labels.py, pipeline/core/vocabularies.py) on hand-made inputs, and the Luigi
stages with `tiny` random-init real architectures (transformers CLIP, segment-anything SAM) writing valid artifacts.

The MaskCLIP dense path of one crop equals a hand computation in tests/models/test_models.py
(test_dense_clip_equals_hand_maskclip); here the sliding window around it is checked: with a fake encoder whose
patch features depend only on each patch's pixels, the stitched grid equals the same function applied to the
working image directly (crops aligned to the grid, overlaps averaged).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pseudoseg.models.roles import ClipImageFeatures, MaskPrediction, SamImageEmbedding
from pseudoseg.pipeline.core.transforms import Resize, SlidingWindows
from pseudoseg.pipeline.core.vocabularies import (
    BUILTIN_VOCABULARIES,
    IMAGENET_TEMPLATES,
    VocabularyError,
    load_templates,
    load_vocabulary,
    parse_vocabulary,
)
from pseudoseg.pipeline.fmbseg import pseudo_labels as F
from pseudoseg.pipeline.fmbseg.params import (
    FmbsegAutoMasksParams,
    FmbsegDenseParams,
    FmbsegDetectParams,
    FmbsegLabelsParams,
    FmbsegQueryMasksParams,
)

D = 8


class PatchMeanClip:
    """ClipEncoder double: patch feature = unit vector of the patch's mean RGB (+1 constant axis); CLS = mean of
    the crop's patch features. Deterministic in the pixels, so stitching can be checked against the full image."""

    image_size, patch_size, embed_dim = 32, 8, D

    def __init__(self) -> None:
        self.calls = 0

    @staticmethod
    def cells(image: np.ndarray, p: int) -> np.ndarray:
        h, w = image.shape[:2]
        m = image.reshape(h // p, p, w // p, p, 3).mean(axis=(1, 3)) / 255.0
        f = np.zeros((h // p, w // p, D), np.float32)
        f[..., :3], f[..., 3] = m, 1.0
        return f / np.linalg.norm(f, axis=-1, keepdims=True)

    def encode_image(self, images: np.ndarray) -> ClipImageFeatures:
        self.calls += 1
        assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
        patch = np.stack([self.cells(im, 8) for im in images])
        cls = patch.mean(axis=(1, 2))
        return ClipImageFeatures(cls=cls / np.linalg.norm(cls, axis=-1, keepdims=True), patch=patch)

    def encode_text(self, texts):
        return np.stack([np.eye(D, dtype=np.float32)[len(t) % D] for t in texts])


def test_dense_features_stitch_to_the_full_image_function():
    rgb = np.random.default_rng(0).integers(0, 256, (45, 77, 3), dtype=np.uint8)  # odd sizes
    clip = PatchMeanClip()
    dense = F.clip_dense_features(
        clip, rgb, dataclasses.replace(FmbsegDenseParams(), short_side=40, stride=8, clip_batch_size=4))
    assert dense.resize.new_hw == (40, 72) and dense.windows.grid_hw == (5, 9)
    assert len(dense.windows) == 2 * 6 and clip.calls == 3 and dense.cls.shape == (12, D)
    expected = PatchMeanClip.cells(dense.resize.apply_image(rgb), 8)
    np.testing.assert_allclose(dense.dense, expected, atol=1e-5)
    # Storage round trip: float16 payloads + JSON metadata rebuild the same frames.
    sample, meta = F.dense_sample("img", dense)
    assert json.loads(sample["json"]) == meta and meta["crop_boxes_xyxy"][-1] == [40, 8, 72, 40]
    rebuilt = F.DenseClip.from_meta(meta, dense.dense.astype(np.float16), dense.cls.astype(np.float16))
    assert rebuilt.windows == dense.windows and rebuilt.resize == dense.resize
    np.testing.assert_allclose(rebuilt.dense, dense.dense, atol=1e-3)


def test_auto_stride_is_half_a_crop_on_the_grid():
    assert F.auto_stride(224, 16, 0) == 112 and F.auto_stride(336, 14, 0) == 168 and F.auto_stride(14, 14, 0) == 14
    assert F.auto_stride(224, 16, 64) == 64


def test_detect_counts_crops_and_needs_more_than_min_crops():
    text = np.eye(4, dtype=np.float32)
    cls = np.eye(4, dtype=np.float32)[[0, 0, 0, 2, 2, 1]] + 0.01
    det = F.detect_classes(cls, text, dataclasses.replace(FmbsegDetectParams(), min_crops=1))
    assert det.counts.tolist() == [3, 1, 2, 0] and det.present == (0, 2)
    assert F.detect_classes(cls, text, dataclasses.replace(FmbsegDetectParams(), min_crops=0)).present == (0, 1, 2)
    assert F.detect_classes(cls, text, dataclasses.replace(FmbsegDetectParams(), min_crops=3)).present == ()
    vocab = parse_vocabulary("a\nb\nc\nd\n", "t")
    rows = F.detection_rows("x", vocab, det, det.present, "clip")
    assert [(r["class_name"], r["crop_count"], r["crop_indices"]) for r in rows] == [("a", 3, [0, 1, 2]),
                                                                                   ("c", 2, [3, 4])]


def synthetic_dense(hw=(60, 80), work=(120, 160), patch=20) -> F.DenseClip:
    """Grid 6 × 8 on a 120 × 160 working image of a 60 × 80 original: left half class 0, right half class 1."""
    resize = Resize(hw, work)
    windows = SlidingWindows(work, 40, 20, patch)
    gh, gw = windows.grid_hw
    dense = np.zeros((gh, gw, D), np.float32)
    dense[:, : gw // 2, 0] = 1.0
    dense[:, gw // 2 :, 1] = 1.0
    return F.DenseClip(dense=dense, cls=np.zeros((len(windows), D), np.float32), resize=resize, windows=windows)


def test_query_points_are_the_top_cells_in_original_pixels():
    feats = synthetic_dense()
    feats.dense[4, 6] = np.eye(D)[2]  # two cells of class 2; (4, 6) is the more similar one
    feats.dense[2, 5] = F._unit(np.eye(D)[2] + 0.5 * np.eye(D)[1])
    text = np.eye(D, dtype=np.float32)
    pts, sims = F.query_points(feats, text[2], top_k=2)
    # Cell (row 4, col 6): working centre (x, y) = (130, 90) → original (65, 45). Cell (2, 5) → (55, 25).
    np.testing.assert_allclose(pts, [[65.0, 45.0], [55.0, 25.0]])
    assert sims[0] > sims[1]


class RecordingSam:
    """Segmenter double: records prompts; mask m of prompt n is a square at its first point, iou [0.5, 0.9, 0.7]."""

    def __init__(self) -> None:
        self.prompts = []

    def embed(self, image):
        return SamImageEmbedding(features=None, original_size=image.shape[:2], input_size=image.shape[:2])

    def predict(self, embedding, *, points_xy=None, point_labels=None, multimask=True, boxes_xyxy=None):
        self.prompts.append((np.array(points_xy), np.array(point_labels), multimask))
        h, w = embedding.original_size
        logits = np.full((len(points_xy), 3, h, w), -1.0, np.float32)
        for n, pts in enumerate(points_xy):
            x, y = (int(v) for v in pts[0])
            for m in range(3):
                logits[n, m, max(0, y - m - 1) : y + m + 2, max(0, x - m - 1) : x + m + 2] = 1.0
        iou = np.tile(np.array([0.5, 0.9, 0.7], np.float32), (len(points_xy), 1))
        return MaskPrediction(logits=logits, iou_pred=iou, low_res_logits=np.zeros((len(points_xy), 3, 1, 1)))


def test_query_point_masks_one_prompt_of_k_points_per_class():
    feats = synthetic_dense()
    sam = RecordingSam()
    text = np.eye(D, dtype=np.float32)
    masks = F.query_point_masks(sam, sam.embed(np.zeros((60, 80, 3), np.uint8)), feats, text, [0, 1],
                                dataclasses.replace(FmbsegQueryMasksParams(), top_k=5), chunk=8)
    (points, labels, multimask), = sam.prompts  # one batched decoder call
    assert points.shape == (2, 5, 2) and (labels == 1).all() and multimask
    assert (points[0, :, 0] < 40).all() and (points[1, :, 0] >= 40).all()  # class 0 left, class 1 right
    assert [m.class_index for m in masks] == [0, 1] and all(m.multimask_index == 1 for m in masks)
    assert all(m.score == pytest.approx(0.9) and m.stage == F.STAGE_11 for m in masks)
    x, y = (int(v) for v in points[0, 0])
    assert masks[0].mask[y, x] and masks[0].area == 25  # the 5 × 5 square of mask 1


def test_label_auto_masks_by_mean_feature_over_detected_classes_only():
    feats = synthetic_dense()
    left = np.zeros((60, 80), bool)
    left[10:50, 5:35] = True
    right = np.zeros((60, 80), bool)
    right[10:50, 45:75] = True
    straddle = np.zeros((60, 80), bool)
    straddle[:, 30:60] = True
    straddle[:, 30:37] = False  # more of it on the right
    tiny = np.zeros((60, 80), bool)
    tiny[0, 0] = True
    auto = [{"segmentation": m, "predicted_iou": 0.9, "stability_score": 0.95, "point_coords": [[1.0, 2.0]]}
            for m in (left, right, straddle, tiny, np.ones((60, 80), bool))]
    text = np.eye(D, dtype=np.float32)
    sizes = dataclasses.replace(FmbsegAutoMasksParams(), min_area_fraction=0.01, max_area_fraction=0.9)
    out = F.label_auto_masks(auto, feats, text, [0, 1], sizes)
    assert [m.class_index for m in out] == [0, 1, 1]  # tiny and whole-image masks dropped by size
    assert out[0].similarity == pytest.approx(1.0) and out[0].stage == F.STAGE_12
    only_zero = F.label_auto_masks(auto, feats, text, [0, 5], sizes)
    assert {m.class_index for m in only_zero} == {0}  # right-half masks still get a DETECTED class


def pm(stage, cls, box, score):
    m = np.zeros((10, 10), bool)
    m[box[0] : box[1], box[2] : box[3]] = True
    return F.PseudoMask(stage=stage, class_index=cls, mask=m, score=score, similarity=0.0,
                        points_xy=np.zeros((0, 2)))


def merge(precedence: str) -> FmbsegLabelsParams:
    return dataclasses.replace(FmbsegLabelsParams(), precedence=precedence)


def test_merge_precedences():
    a = pm(F.STAGE_11, 1, (0, 6, 0, 6), 0.80)  # Stage 1.1, lower confidence
    b = pm(F.STAGE_12, 2, (3, 10, 3, 10), 0.95)  # Stage 1.2, overlapping a on [3:6, 3:6]
    c = pm(F.STAGE_12, 3, (4, 5, 4, 5), 0.95)  # small 1.2 mask inside b (same score): smaller wins
    label, source = F.merge_label_map((10, 10), [a, b, c], merge("stage11_first"))
    assert label[4, 4] == 1 and label[8, 8] == 2 and label[0, 9] == 255 and source[4, 4] == 11
    label, _ = F.merge_label_map((10, 10), [a, b, c], merge("stage12_first"))
    assert label[4, 4] == 3 and label[3, 3] == 2 and label[0, 0] == 1
    label, _ = F.merge_label_map((10, 10), [a, b, c], merge("confidence"))
    assert label[3, 3] == 2 and label[4, 4] == 3 and label[0, 0] == 1
    with pytest.raises(ValueError):
        F.merge_label_map((10, 10), [a], merge("nope"))
    vocab = parse_vocabulary("\n".join("abcd"), "t")
    label, source = F.merge_label_map((10, 10), [a, b, c], merge("stage11_first"))
    rows = F.label_region_rows("x", vocab, label, source)
    assert [r["class_index"] for r in rows] == [1, 2] and sum(r["area"] for r in rows) == (label != 255).sum()
    assert rows[0]["pixels_stage11"] == 36 and rows[1]["pixels_stage12"] == rows[1]["area"]


def test_builtin_vocabularies_and_templates(voc_data):
    counts = {"voc20": 20, "voc21": 21, "context59": 59, "coco_stuff171": 171, "coco_object80": 80, "ade150": 150,
              "cityscapes19": 19}
    assert set(counts) == set(BUILTIN_VOCABULARIES)
    for name, n in counts.items():
        v = load_vocabulary(name)
        assert len(v) == n and len(set(v.classes)) == n, name
    assert load_vocabulary("voc21").classes == tuple(voc_data["class_names"])
    voc = load_vocabulary("voc20")
    assert voc.prompts[voc.index("diningtable")] == ("dining table",) and voc.index("TV monitor") == 19
    assert load_vocabulary("coco_stuff171").classes[:3] == ("person", "bicycle", "car")
    assert load_vocabulary("cityscapes19").classes[-1] == "bicycle"
    assert len(IMAGENET_TEMPLATES) == len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert load_templates("single") == ("a photo of a {}.",)
    texts, owner = voc.texts(load_templates("single"))
    assert texts[10] == "a photo of a dining table." and owner[10] == 10


def test_custom_vocabulary_file_and_errors(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# comment\nsky\n\nroad | street | road\n")
    v = load_vocabulary(str(f))
    assert v.name == "mine" and v.classes == ("sky", "road") and v.prompts[1] == ("street", "road")
    assert v.digest != load_vocabulary("voc20").digest
    with pytest.raises(VocabularyError):
        parse_vocabulary("a\na\n", "dup")
    with pytest.raises(VocabularyError):
        parse_vocabulary("\n".join(f"c{i}" for i in range(256)), "big")
    with pytest.raises(VocabularyError):
        load_vocabulary(str(tmp_path / "missing.txt"))
    with pytest.raises(VocabularyError):
        load_templates("fancy")


def test_class_text_embeddings_average_templates():
    class Text:
        def encode_text(self, texts):
            return np.stack([np.eye(3, dtype=np.float32)[0 if "dog" in t else 1 if "bad" in t else 2] for t in texts])

    vocab = parse_vocabulary("dog\ncat\n", "t")
    emb = F.class_text_embeddings(Text(), vocab, ("a {}.", "a bad {}."), batch_size=1)
    np.testing.assert_allclose(emb[0], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(emb[1], [0, 1 / np.sqrt(2), 1 / np.sqrt(2)], atol=1e-6)


def test_image_labels_lookup(tmp_path):
    p = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"file_name": ["a/b/x.jpg", "x.jpg", "y.png"], "class_name": ["dog", "cat", "dog"]}), p)
    labels = F.load_image_labels(str(p))
    assert labels.lookup("id1", "/data/x.jpg") == ["dog", "cat"]
    assert labels.lookup("id2", "/t.tar::y.png") == ["dog"] and labels.lookup("id3", "/z.jpg") is None
    pq.write_table(pa.table({"image_id": ["id9"], "class_names": [["person", "chair"]]}), p)
    assert F.load_image_labels(str(p)).lookup("id9", "whatever") == ["person", "chair"]
    pq.write_table(pa.table({"name": ["x"]}), p)
    with pytest.raises(ValueError):
        F.load_image_labels(str(p))


# ----------------------------------------------------------------------------------------------------- tiny models
@pytest.mark.slow  # FMbSeg Stage 1 end to end on tiny CLIP / DINOv2 / SAM
def test_tiny_real_models_write_valid_artifacts(tmp_path, tiny_cache):
    from pseudoseg.schemas import REJECTS, SHARD_STATS
    from pseudoseg.schemas.fmbseg import DENSE_FEATURES, DETECTIONS, LABEL_REGIONS, PSEUDO_MASKS
    from pseudoseg.tasks.engine.base import build_tasks
    from pseudoseg.tasks.stages.fmbseg import FmbsegLabels, FmbsegLabelsShard
    from tests.helpers import luigi_settings, write_good_images

    images = tmp_path / "images"
    write_good_images(images, 3, size=(48, 70))
    models = {"preset": "tiny", "cache_dir": str(tiny_cache), "device": "cpu"}
    cfg = {"vocabulary": "voc21", "short_side": 112, "min_crops": 0, "points_per_side": 4, "pred_iou_thresh": 0.0,
           "stability_score_thresh": 0.0, "min_mask_region_area": 0, "min_area_fraction": 0.0,
           "max_area_fraction": 1.0}
    with luigi_settings(models=models, fmbseg=cfg):
        result = build_tasks([FmbsegLabels(images=str(images), dataset="tiny", out=str(tmp_path / "out"))],
                             local_scheduler=True, workers=1, log_level="WARNING")
        assert result.scheduling_succeeded, result.summary_text
        task = FmbsegLabelsShard(shard=0, images=str(images), dataset="tiny", out=str(tmp_path / "out"))
        dirs = {"labels": task.stage_dir.path}
        dirs.update({k: t.stage_dir.path for k, t in task.requires().items()})
        dirs["dense"] = task.requires()["detect"].requires()["dense"].stage_dir.path
    shard = "shard-000000"
    dense = DENSE_FEATURES.read_parquet(dirs["dense"] / f"{shard}.parquet").to_pylist()
    assert len(dense) == 3 and all(r["crop_size"] == 56 and r["patch_size"] == 14 for r in dense)
    assert all(r["dense_shape"] == [r["grid_height"], r["grid_width"], 16] for r in dense)
    det = DETECTIONS.read_parquet(dirs["detect"] / f"{shard}.parquet").to_pylist()
    assert {r["image_id"] for r in det} == {r["image_id"] for r in dense}
    assert np.load(dirs["detect"] / f"{shard}.text.npy").shape == (21, 16)
    for name in ("query", "auto"):
        rows = PSEUDO_MASKS.read_parquet(dirs[name] / f"{shard}.parquet").to_pylist()
        assert all(r["stage"] == ("1.1" if name == "query" else "1.2") for r in rows)
        REJECTS.read_parquet(dirs[name] / "_rejects" / f"{shard}.parquet")
    assert len(PSEUDO_MASKS.read_parquet(dirs["query"] / f"{shard}.parquet")) == len(det) - len(
        REJECTS.read_parquet(dirs["query"] / "_rejects" / f"{shard}.parquet"))
    LABEL_REGIONS.read_parquet(dirs["labels"] / f"{shard}.parquet")
    assert json.loads((dirs["labels"] / f"{shard}.classes.json").read_text())["classes"][0]["name"] == "background"
    for d in dirs.values():
        stats = SHARD_STATS.read_json(d / "_meta" / f"{shard}.done.json")
        assert stats["in_count"] == stats["ok_count"] + stats["rejected_count"]
    assert SHARD_STATS.read_json(dirs["labels"] / "_meta" / f"{shard}.done.json")["ok_count"] >= 1
    assert Path(dirs["labels"] / f"{shard}.tar").stat().st_size > 0
