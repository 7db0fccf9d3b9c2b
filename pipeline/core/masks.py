"""Binary masks: COCO RLE, IoU, mask NMS, SAM-style stability score and small-region cleanup.

Conventions
- A mask is a numpy ``bool`` (or 0/1 ``uint8``) array ``[H, W]``, row-major, ``mask[y, x]`` with
  ``(x, y) = (column, row)``. Functions return ``bool`` ``[H, W]`` C-contiguous arrays.
- An RLE is pycocotools' *compressed* RLE with ``counts`` as an ASCII ``str`` (JSON/Parquet friendly):
  ``{"size": [H, W], "counts": "..."}``. Decoders also accept ``bytes`` counts and uncompressed (list) counts.
- Boxes: ``xyxy`` float pixels for inputs; :func:`rle_bbox` returns COCO ``xywh``.
- IoU of two empty masks is 0 (pycocotools' convention), so empty masks never suppress each other.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
from pycocotools import mask as mask_utils

RLE = dict  # {"size": [H, W], "counts": str}


def encode_rle(mask: np.ndarray) -> RLE:
    """Compressed COCO RLE of a ``[H, W]`` bool/0-1 mask: ``{"size": [H, W], "counts": str}``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(bool, copy=False), dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_row_fields(rle: RLE) -> dict:
    """The Parquet row fields of an RLE (every mask table stores it this way): ``height``, ``width`` and
    ``rle_counts`` (the compressed ``str`` counts)."""
    return {"height": int(rle["size"][0]), "width": int(rle["size"][1]), "rle_counts": rle["counts"]}


def row_rle(row) -> RLE:
    """RLE of a Parquet row with ``height``, ``width``, ``rle_counts`` (inverse of :func:`rle_row_fields`)."""
    return {"size": [int(row["height"]), int(row["width"])], "counts": row["rle_counts"]}


def _to_coco(rle: RLE) -> dict:
    """pycocotools' own form: compressed, ``bytes`` counts."""
    counts = rle["counts"]
    h, w = (int(v) for v in rle["size"])
    if isinstance(counts, list):  # uncompressed RLE
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [h, w], "counts": counts}


def decode_rle(rle: RLE) -> np.ndarray:
    """The ``bool`` ``[H, W]`` mask (C-contiguous) of an RLE."""
    return np.ascontiguousarray(mask_utils.decode(_to_coco(rle)), dtype=bool)


def rle_area(rle: RLE) -> int:
    """Number of foreground pixels."""
    return int(mask_utils.area(_to_coco(rle)))


def rle_bbox(rle: RLE) -> list[float]:
    """Tight box ``[x, y, w, h]`` (COCO xywh, float pixels) of the foreground; ``[0, 0, 0, 0]`` when empty."""
    return [float(v) for v in mask_utils.toBbox(_to_coco(rle))]


def mask_iou_matrix(rles_a: Sequence[RLE], rles_b: Sequence[RLE]) -> np.ndarray:
    """IoU of every pair: float64 ``[A, B]``. All masks must have the same size."""
    a = [_to_coco(r) for r in rles_a]
    b = [_to_coco(r) for r in rles_b]
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    sizes = {tuple(r["size"]) for r in a + b}
    if len(sizes) != 1:
        raise ValueError(f"masks of different sizes: {sorted(sizes)}")
    # iscrowd=0 everywhere: plain IoU, not COCO's crowd "intersection over detection area".
    return np.asarray(mask_utils.iou(a, b, [0] * len(b)), dtype=np.float64).reshape(len(a), len(b))


def mask_nms(rles: Sequence[RLE], scores: Sequence[float], iou_threshold: float) -> list[list[int]]:
    """Greedy mask NMS that records what each kept mask absorbed (for merging their texts).

    Masks are visited by descending score (equal scores: lower index first). A mask whose IoU with some
    already-kept mask is ``> iou_threshold`` is suppressed and joins the group of the FIRST such kept mask
    in kept order; otherwise it is kept and opens a group. Returns one group per kept mask, in kept order:
    ``[kept_index, *suppressed_indices_ascending]``. Every input index appears exactly once.
    """
    scores_arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(rles) != scores_arr.size:
        raise ValueError(f"{len(rles)} masks but {scores_arr.size} scores")
    order = np.argsort(-scores_arr, kind="stable")
    iou = mask_iou_matrix(rles, rles)
    kept: list[int] = []
    members: dict[int, list[int]] = {}
    for i in order.tolist():
        owner = next((k for k in kept if iou[i, k] > iou_threshold), None)
        if owner is None:
            kept.append(i)
            members[i] = []
        else:
            members[owner].append(i)
    return [[k, *sorted(members[k])] for k in kept]


def is_tensor(x: object) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch when the caller never did)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def stability_score(logits, mask_threshold: float = 0.0, offset: float = 1.0):
    """SAM's stability score of mask logits ``[..., H, W]``: float32 ``[...]``.

    IoU of the masks ``logits > mask_threshold + offset`` and ``logits > mask_threshold - offset`` (the first
    lies inside the second, so IoU = count_high / count_low). Same numbers as
    ``segment_anything.utils.amg.calculate_stability_score`` (float32 division), except that where the low
    mask is empty this returns 0 instead of SAM's NaN (0/0), so an empty mask never wins an argmax.

    ``logits`` may be a numpy array or a torch tensor (on any device): the result is of the same kind, and the
    two agree bit for bit (integer counts, one float32 division).
    """
    if is_tensor(logits):
        import torch

        high = (logits > (mask_threshold + offset)).sum(dim=(-2, -1), dtype=torch.int64).to(torch.float32)
        low = (logits > (mask_threshold - offset)).sum(dim=(-2, -1), dtype=torch.int64).to(torch.float32)
        return torch.where(low > 0, high / torch.where(low > 0, low, torch.ones_like(low)), torch.zeros_like(low))
    logits = np.asarray(logits)
    high = np.count_nonzero(logits > (mask_threshold + offset), axis=(-2, -1))
    low = np.count_nonzero(logits > (mask_threshold - offset), axis=(-2, -1))
    high = np.asarray(high, dtype=np.float32)
    low = np.asarray(low, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(low > 0, high / np.where(low > 0, low, 1), np.float32(0))
    return score.astype(np.float32)


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: Literal["holes", "islands"]
) -> tuple[np.ndarray, bool]:
    """Fill small holes or drop small islands of a ``[H, W]`` mask; same result as SAM's
    ``segment_anything.utils.amg.remove_small_regions``.

    Components are 8-connected (cv2). ``"holes"``: every background component with fewer than ``area_thresh``
    pixels becomes foreground — including background touching the image border, as in SAM.
    ``"islands"``: every foreground component with fewer than ``area_thresh`` pixels is dropped, except that
    when all are small the largest is kept (ties: lowest cv2 label, i.e. first in raster order).
    Returns ``(bool [H, W], changed)``; ``changed`` is False when no component was small.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    mask = np.asarray(mask).astype(bool)
    holes = mode == "holes"
    working = (mask ^ holes).astype(np.uint8)  # components of the pixels that may change
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]  # label 0 is working's zero set
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if holes:
        # Label 0 is the foreground itself; small background components join it.
        keep = np.concatenate([[True], small])
    else:
        keep = np.concatenate([[False], ~small])
        if not keep.any():
            keep[int(np.argmax(sizes)) + 1] = True
    return keep[labels], True


def clean_mask(mask: np.ndarray, area_thresh: float) -> np.ndarray:
    """SAM's post-processing of a ``[H, W]`` mask: fill holes, then drop islands, both below ``area_thresh``
    pixels (see :func:`remove_small_regions`). Returns ``bool`` ``[H, W]``."""
    mask, _ = remove_small_regions(mask, area_thresh, "holes")
    mask, _ = remove_small_regions(mask, area_thresh, "islands")
    return mask


def box_covers_image(box_xyxy: Sequence[float], height: int, width: int, fraction: float = 0.9) -> bool:
    """Whether the part of ``box_xyxy`` (x0, y0, x1, y1 float pixels) inside the ``height`` x ``width`` image
    covers more than ``fraction`` of the image area (strictly greater). Such boxes take
    :func:`full_image_mask` instead of SAM (use-paper §3.1: vague texts like "the atmosphere")."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    w = max(0.0, min(x1, width) - max(x0, 0.0))
    h = max(0.0, min(y1, height) - max(y0, 0.0))
    area = float(height) * float(width)
    return area > 0 and (w * h) / area > fraction


def full_image_mask(height: int, width: int) -> np.ndarray:
    """All-True ``bool`` ``[height, width]`` mask."""
    return np.ones((height, width), dtype=bool)
