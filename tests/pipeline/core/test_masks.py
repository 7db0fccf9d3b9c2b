"""Masks (pipeline/core/masks.py): RLE against pycocotools, NMS against a brute-force reference, stability score
and small-region cleanup against segment_anything's own helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as coco
from segment_anything.utils import amg

from pseudoseg.pipeline.core.masks import (
    box_covers_image,
    clean_mask,
    decode_rle,
    encode_rle,
    full_image_mask,
    mask_iou_matrix,
    mask_nms,
    remove_small_regions,
    rle_area,
    rle_bbox,
    stability_score,
)


@st.composite
def _masks(draw, max_side: int = 23):
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    kind = draw(st.sampled_from(["random", "empty", "full", "blobs"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    if kind == "empty":
        return np.zeros((h, w), bool)
    if kind == "full":
        return np.ones((h, w), bool)
    if kind == "random":
        return rng.random((h, w)) < draw(st.floats(0.05, 0.95))
    mask = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 4))):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        mask[y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] = True
    return mask


@settings(max_examples=150, deadline=None)
@given(_masks())
def test_rle_round_trip_and_pycocotools_agreement(mask):
    rle = encode_rle(mask)
    assert rle["size"] == list(mask.shape)
    assert isinstance(rle["counts"], str)
    json.dumps(rle)  # storable as is

    back = decode_rle(rle)
    assert back.dtype == bool and back.shape == mask.shape and back.flags.c_contiguous
    assert np.array_equal(back, mask)
    assert np.array_equal(decode_rle(encode_rle(mask.astype(np.uint8))), mask)

    ref = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert rle["counts"].encode("ascii") == ref["counts"]
    assert rle_area(rle) == int(coco.area(ref)) == int(mask.sum())
    assert rle_bbox(rle) == [float(v) for v in coco.toBbox(ref)]
    if mask.any():
        ys, xs = np.nonzero(mask)
        assert rle_bbox(rle) == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    else:
        assert rle_bbox(rle) == [0.0, 0.0, 0.0, 0.0]


def test_rle_accepts_bytes_and_uncompressed_counts():
    mask = np.zeros((4, 5), bool)
    mask[1:3, 2:5] = True
    rle = encode_rle(mask)
    assert np.array_equal(decode_rle({"size": rle["size"], "counts": rle["counts"].encode()}), mask)
    # Uncompressed: column-major run lengths starting with zeros.
    runs, flat, current, n = [], mask.flatten(order="F"), False, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    runs.append(n)
    assert np.array_equal(decode_rle({"size": [4, 5], "counts": runs}), mask)


def _np_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def test_iou_matrix_shapes_and_values():
    a = np.zeros((6, 7), bool)
    a[:3] = True
    b = np.zeros((6, 7), bool)
    b[1:4] = True
    rles = [encode_rle(a), encode_rle(b), encode_rle(np.zeros((6, 7), bool))]
    m = mask_iou_matrix(rles, rles)
    assert m.shape == (3, 3) and m.dtype == np.float64
    assert np.allclose(m, [[_np_iou(x, y) for y in (a, b, 0 * a)] for x in (a, b, 0 * a)])
    assert mask_iou_matrix([], rles).shape == (0, 3)
    assert mask_iou_matrix(rles, []).shape == (3, 0)
    with pytest.raises(ValueError):
        mask_iou_matrix(rles, [encode_rle(np.zeros((7, 6), bool))])


def _reference_nms(masks: list[np.ndarray], scores: list[float], thr: float) -> list[list[int]]:
    """Written from the spec, not from the implementation: quadratic, numpy IoU."""
    n = len(masks)
    order = sorted(range(n), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    owner: dict[int, int] = {}
    for i in order:
        hits = [k for k in kept if _np_iou(masks[i], masks[k]) > thr]
        if hits:
            owner[i] = hits[0]
        else:
            kept.append(i)
    return [[k] + sorted(i for i, o in owner.items() if o == k) for k in kept]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(0, 14),
    st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.99]),
)
def test_mask_nms_matches_brute_force(seed, n, thr):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    base = [rng.random((h, w)) < 0.5 for _ in range(max(1, n // 3))]
    masks = []
    for _ in range(n):  # near-duplicates of a few bases so that suppression actually happens
        m = base[int(rng.integers(len(base)))].copy()
        m ^= rng.random((h, w)) < rng.choice([0.0, 0.05, 0.3])
        masks.append(m)
    scores = rng.integers(0, 4, n).astype(float).tolist()  # many ties
    got = mask_nms([encode_rle(m) for m in masks], scores, thr)
    assert got == _reference_nms(masks, scores, thr)
    assert sorted(i for g in got for i in g) == list(range(n))


def test_mask_nms_small_example():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = a.copy()
    b[2, 0] = True  # IoU(a, b) = 8/9
    c = ~a
    groups = mask_nms([encode_rle(m) for m in (a, b, c, a)], [0.5, 0.9, 0.1, 0.5], 0.7)
    assert groups == [[1, 0, 3], [2]]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.5, -1.0]), st.sampled_from([1.0, 0.5, 2.0]))
def test_stability_score_matches_sam(seed, threshold, offset):
    rng = np.random.default_rng(seed)
    shape = (
        int(rng.integers(1, 4)),
        int(rng.integers(1, 3)),
        int(rng.integers(1, 40)),
        int(rng.integers(1, 40)),
    )
    logits = (rng.normal(size=shape) * 3 + rng.normal()).astype(np.float32)
    ours = stability_score(logits, threshold, offset)
    sam = amg.calculate_stability_score(torch.from_numpy(logits), threshold, offset).numpy()
    assert ours.shape == shape[:2] and ours.dtype == np.float32
    defined = ~np.isnan(sam)  # SAM gives NaN (0/0) where the low mask is empty; we give 0
    assert np.array_equal(ours[defined], sam[defined])
    assert np.all(ours[~defined] == 0)


def test_stability_score_empty_and_single():
    logits = np.full((2, 5, 5), -10.0, np.float32)
    logits[1, :2] = 10.0
    assert stability_score(logits).tolist() == [0.0, 1.0]
    assert stability_score(logits[1]).shape == ()


@settings(max_examples=120, deadline=None)
@given(_masks(max_side=40), st.sampled_from([0, 1, 2, 5, 20, 100]), st.sampled_from(["holes", "islands"]))
def test_remove_small_regions_matches_sam(mask, area, mode):
    ours, changed = remove_small_regions(mask, area, mode)
    sam, sam_changed = amg.remove_small_regions(mask, area, mode)
    assert ours.dtype == bool and ours.shape == mask.shape
    assert changed == sam_changed
    assert np.array_equal(ours, sam)


@settings(max_examples=60, deadline=None)
@given(_masks(max_side=40), st.sampled_from([1, 4, 30]))
def test_clean_mask_matches_sam_postprocess(mask, area):
    # SAM's SamAutomaticMaskGenerator.postprocess_small_regions does exactly this per mask.
    ref, _ = amg.remove_small_regions(mask, area, "holes")
    ref, _ = amg.remove_small_regions(ref, area, "islands")
    assert np.array_equal(clean_mask(mask, area), ref)


def test_remove_small_regions_semantics():
    mask = np.zeros((10, 10), bool)
    mask[1:8, 1:8] = True
    mask[4, 4] = False  # 1-pixel hole
    mask[9, 9] = True  # 1-pixel island (diagonal to nothing)
    filled, changed = remove_small_regions(mask, 2, "holes")
    assert changed and filled[4, 4] and filled[9, 9]
    cleaned, changed = remove_small_regions(mask, 2, "islands")
    assert changed and not cleaned[9, 9] and not cleaned[4, 4] and cleaned[1, 1]
    same, changed = remove_small_regions(mask, 1, "islands")
    assert not changed and np.array_equal(same, mask)
    only_small = np.zeros((5, 5), bool)
    only_small[0, 0] = only_small[3, 3] = only_small[3, 4] = True
    kept, _ = remove_small_regions(only_small, 10, "islands")  # all small: the largest survives
    assert kept.sum() == 2 and kept[3, 3] and kept[3, 4]
    with pytest.raises(ValueError):
        remove_small_regions(mask, 2, "both")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((0, 0, 100, 50), True),  # the whole image
        ((-20, -20, 200, 200), True),  # larger than the image: clipped
        ((0, 0, 90, 50), False),  # exactly 90 %: not more than
        ((0, 0, 91, 50), True),
        ((5, 0, 100, 50), True),  # 95 %
        ((50, 0, 150, 50), False),  # half outside
        ((10, 10, 5, 5), False),  # inverted: empty
        ((0.0, 0.0, 99.9, 49.9), True),
    ],
)
def test_box_covers_image(box, expected):
    assert box_covers_image(box, 50, 100) is expected


def test_box_covers_image_fraction_and_full_mask():
    assert box_covers_image((0, 0, 60, 50), 50, 100, fraction=0.5)
    assert not box_covers_image((0, 0, 50, 50), 50, 100, fraction=0.5)
    assert not box_covers_image((0, 0, 10, 10), 0, 0)
    full = full_image_mask(3, 5)
    assert full.shape == (3, 5) and full.dtype == bool and full.all()
    assert rle_area(encode_rle(full)) == 15
