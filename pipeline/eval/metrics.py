"""Semantic-segmentation metrics: mean IoU over a dataset (the papers' evaluation).

Intersections and unions are accumulated per class over the WHOLE dataset (one confusion matrix), not averaged per
image. Label maps are integer arrays ``[H, W]`` (rows, columns), prediction and GT of the same shape.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

IGNORE = 255


class ConfusionMatrix:
    """Accumulates ``counts[gt, pred]`` (int64 ``[K, K + 1]``): the extra last column collects predictions outside
    ``[0, K)`` (always wrong). GT pixels equal to ``ignore_index`` are skipped; other GT values outside ``[0, K)``
    raise (a wrong ``num_classes`` should not pass silently)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE) -> None:
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.counts = np.zeros((self.num_classes, self.num_classes + 1), np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
        k = self.num_classes
        valid = gt != self.ignore_index
        g = gt[valid].astype(np.int64)
        if g.size and (g.min() < 0 or g.max() >= k):
            raise ValueError(f"ground truth holds labels outside [0, {k}) other than ignore {self.ignore_index}")
        p = pred[valid].astype(np.int64)
        p = np.where((p < 0) | (p >= k), k, p)  # out-of-range predictions → the "wrong" column
        self.counts += np.bincount(g * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)

    def iou(self) -> np.ndarray:
        """float64 ``[K]``: TP / (TP + FP + FN) per class; nan where the union is empty (class absent in GT and
        never predicted)."""
        k = self.num_classes
        tp = np.diag(self.counts[:, :k]).astype(np.float64)
        gt_total = self.counts.sum(axis=1)
        pred_total = self.counts[:, :k].sum(axis=0)
        union = gt_total + pred_total - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def pixel_accuracy(self) -> float:
        total = self.counts.sum()
        return float(np.trace(self.counts[:, : self.num_classes]) / total) if total else float("nan")


def miou(
    preds: Iterable[np.ndarray], gts: Iterable[np.ndarray], num_classes: int, ignore_index: int = IGNORE
) -> tuple[float, np.ndarray]:
    """Mean IoU over a dataset: (miou, per_class_iou float64 ``[K]``).

    preds, gts: iterables of integer label maps ``[H, W]`` (paired in order, same shape per pair). Pixels where
    ``gt == ignore_index`` are skipped; predictions outside ``[0, num_classes)`` (e.g. 255 "unlabelled") count as
    wrong. Classes with an empty union over the dataset are nan in ``per_class`` and left out of the mean
    (nan if all are).
    """
    cm = ConfusionMatrix(num_classes, ignore_index)
    n_pred = n_gt = 0
    gts = iter(gts)
    for pred in preds:
        n_pred += 1
        try:
            gt = next(gts)
        except StopIteration:
            raise ValueError(f"more predictions than ground-truth maps ({n_pred} > {n_gt})") from None
        n_gt += 1
        cm.update(pred, gt)
    if next(gts, None) is not None:
        raise ValueError(f"more ground-truth maps than predictions ({n_pred})")
    per_class = cm.iou()
    valid = ~np.isnan(per_class)
    return (float(per_class[valid].mean()) if valid.any() else float("nan")), per_class
