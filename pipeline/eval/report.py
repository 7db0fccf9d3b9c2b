"""Evaluation of a semantic segmenter over a benchmark, and what the run leaves for a reader: the per-class IoU rows,
a Markdown report beside the seed papers' published mIoU, and an image | GT | prediction grid.

Pure logic: the segmenter (``pipeline.eval.methods.SegmentationMethod`` interface) and the dataset
(``pipeline.eval.benchmarks.SegDataset``) come in built; this module loads no model and knows no Luigi.
Label maps are uint8 ``[H, W]`` (rows, columns), 255 = ignore / no prediction.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pseudoseg.pipeline.core.transforms import Resize, resize_label_map, short_side_size
from pseudoseg.pipeline.eval.benchmarks import BENCHMARKS, Protocol
from pseudoseg.pipeline.eval.metrics import IGNORE, ConfusionMatrix

# --------------------------------------------------------------------------------------------- published numbers
# mIoU (%) as printed in the seed papers, keyed by pipeline.eval.benchmarks.BENCHMARKS name. Copied from
# /work/shared/papers/*.txt; each entry names the table, row and column it comes from.


@dataclass(frozen=True)
class Published:
    paper: str  # seed paper
    method: str  # row label in the table
    source: str  # table and column
    miou: float
    note: str = ""  # how the paper's number was obtained, where that differs from a run of ours


def _p(paper: str, table: str, row: str, columns: dict[str, tuple[str, float]],
       notes: dict[str, str] | None = None) -> dict[str, Published]:
    return {bench: Published(paper, row, f"{table}, column {col}", v, (notes or {}).get(bench, ""))
            for bench, (col, v) in columns.items()}


USE_ENSEMBLE_NOTE = ("ensemble: the paper combines this USE model's predictions with those of an extra model "
                     "trained on COCO ground-truth annotations (use-paper §4.3); a pseudoseg run is the USE model "
                     "alone")
PUBLISHED: dict[str, dict[str, Published]] = {
    # fmbseg-paper Table 1 ("FMbSeg (ours) 0.12M" row; columns PV-21 PV-20 PC-59 CO-80 CS-171 City ADE).
    # CO-80 is "object categories only" (§4 Datasets): the benchmark coco_object80 (80 classes, background not
    # scored), not the 81-class coco_object.
    "fmbseg": _p("fmbseg-paper", "Table 1", "FMbSeg (ours)", {
        "voc21": ("PV-21", 67.73), "voc20": ("PV-20", 85.65), "context59": ("PC-59", 42.72),
        "coco_object80": ("CO-80", 57.63), "coco_stuff171": ("CS-171", 29.88), "cityscapes19": ("City", 28.36),
        "ade150": ("ADE", 16.25),
    }, {"voc21": "background predicted by added Stuff categories (fmbseg-paper §4 Datasets)",
        "coco_object80": "the 80 object classes only (fmbseg-paper §4 Datasets)"}),
    # use-paper Table 2 ("USE+SAM (ours) two-stage COCO,VG" row; columns ADE-150 ADE-847 PC-59 PC-459 Average).
    # The COCO† row reads 37.0 / 57.8. No VOC, COCO, Cityscapes or PC-60 numbers in the paper. Both rows are
    # ensembled with a model trained on COCO ground truth (use-paper §4.3).
    "use_sam": _p("use-paper", "Table 2", "USE+SAM (ours), COCO+VG", {
        "ade150": ("ADE-150", 37.1), "context59": ("PC-59", 58.0),
    }, {"ade150": USE_ENSEMBLE_NOTE, "context59": USE_ENSEMBLE_NOTE}),
    # car-paper Table 1 ("CaR (Ours, w/o SAM)" row; columns VOC-20 VOC-21 COCO Object PC-59 PC-60 A-150 A-847
    # PC-459). fmbseg-paper Table 1 cites CaR's PC-60 value (30.5) under PC-59; we keep CaR's own columns.
    # No COCO-Stuff-171 or Cityscapes numbers in the paper.
    "car": _p("car-paper", "Table 1", "CaR (Ours, w/o SAM)", {
        "voc20": ("VOC-20", 91.4), "voc21": ("VOC-21", 67.6), "coco_object": ("COCO Object", 36.6),
        "context59": ("PC-59", 39.5), "context60": ("PC-60", 30.5), "ade150": ("A-150", 17.7),
    }),
}
# Which seed paper is the reference for a method of ours ("pseudo" = FMbSeg Stage-1 labels: no paper number).
METHOD_PAPER = {"fmbseg": "fmbseg", "use_sam": "use_sam", "car": "car", "pseudo": None}


def published_for(benchmark: str) -> list[Published]:
    """Every seed paper's number for `benchmark`, in the order FMbSeg, USE+SAM, CaR."""
    return [table[benchmark] for table in PUBLISHED.values() if benchmark in table]


# --------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalResult:
    """counts: the dataset's confusion matrix; samples: (image_id, rgb, gt, pred) of the first `keep` images."""

    class_names: tuple[str, ...]
    matrix: ConfusionMatrix
    images: int = 0
    samples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def per_class(self) -> np.ndarray:
        return self.matrix.iou()

    @property
    def miou(self) -> float:
        iou = self.per_class
        valid = ~np.isnan(iou)
        return float(iou[valid].mean()) if valid.any() else float("nan")

    def rows(self) -> list[dict]:
        """Rows of schemas.evaluation.CLASS_IOU, in label order."""
        k = self.matrix.num_classes
        tp = np.diag(self.matrix.counts[:, :k])
        union = self.matrix.counts.sum(1) + self.matrix.counts[:, :k].sum(0) - tp
        return [{"class_index": i, "class_name": n, "iou": None if math.isnan(v) else float(v),
                 "intersection": int(tp[i]), "union": int(union[i])}
                for i, (n, v) in enumerate(zip(self.class_names, self.per_class, strict=True))]


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """uint8 [H, W, 3] → [h, w, 3] with min(h, w) = short_side (aspect kept, INTER_AREA down / LINEAR up)."""
    hw = tuple(image.shape[:2])
    new = short_side_size(hw, short_side)
    return image if new == hw else Resize(hw, new).apply_image(image)


class ShortSide:
    """Wraps a segmenter working on whole images (CaR): the image is resized to the protocol's short side, the
    label map is resized back to the original frame with nearest neighbour; short_side 0 = original resolution
    (the segmenter gets the image as is)."""

    def __init__(self, segmenter, short_side: int) -> None:
        self.segmenter, self.short_side = segmenter, short_side

    def segment(self, image, class_names, *, image_id=None):
        image = np.asarray(image, np.uint8)
        if not self.short_side:
            return self.segmenter.segment(image, class_names, image_id=image_id)
        label, scores = self.segmenter.segment(resize_short_side(image, self.short_side), class_names,
                                               image_id=image_id)
        return resize_label_map(label, image.shape[:2]), scores


def run_evaluation(segmenter, samples: Iterable, class_names: Sequence[str], *, keep: int = 4,
                   progress: Callable[[int], None] | None = None, ignore_unlabelled: bool = False) -> EvalResult:
    """Run `segmenter` over `samples` (``pipeline.eval.benchmarks.Sample``: image_id, rgb, gt) in order, accumulating one
    confusion matrix (GT 255 ignored; predictions outside the classes counted wrong, or with `ignore_unlabelled`
    predictions of 255 left out of the score — a protocol's ``unlabelled = "ignored"``)."""
    result = EvalResult(tuple(class_names), ConfusionMatrix(len(class_names), IGNORE))
    for i, s in enumerate(samples):
        pred, _ = segmenter.segment(s.rgb, list(class_names), image_id=s.image_id)
        pred = np.asarray(pred, np.uint8)
        gt = np.where(pred == IGNORE, IGNORE, s.gt).astype(np.uint8) if ignore_unlabelled else s.gt
        result.matrix.update(pred, gt)
        result.images += 1
        if len(result.samples) < keep:
            result.samples.append((s.image_id, s.rgb, s.gt, pred))
        if progress is not None:
            progress(i + 1)
    return result


# --------------------------------------------------------------------------------------------- report
def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


# Benchmarks whose name could be mistaken for a seed paper's column that scores other classes.
BENCHMARK_NOTES = {
    "coco_object": "fmbseg-paper's CO-80 (57.63) scores the 80 object classes without background: benchmark "
                   "coco_object80, not this 81-class set.",
    "coco_object80": "car-paper's COCO Object (36.6) scores 81 classes (80 objects + background): benchmark "
                     "coco_object, not this set.",
}


def report_markdown(result: EvalResult, *, benchmark: str, method: str, params: dict | None = None,
                    protocol: Protocol | None = None) -> str:
    """The run's mIoU beside the seed papers' published numbers for the same benchmark (with how each was
    obtained), which classes are scored, the protocol (``pipeline.eval.benchmarks.Protocol``) and per-class IoU."""
    ours = 100 * result.miou
    lines = [f"# Evaluation: {method} on {benchmark}", "",
             f"{result.images} images; mIoU over {int((~np.isnan(result.per_class)).sum())} of "
             f"{len(result.class_names)} classes with a non-empty union.", ""]
    if benchmark in BENCHMARKS:
        lines += [f"Scored classes: {BENCHMARKS[benchmark].scored}.", ""]
    if protocol is not None:
        lines += [f"Protocol ({protocol.paper}): {protocol.describe()}. Source: {protocol.source}.", ""]
    lines += ["| method | source | mIoU (%) | note |", "|---|---|---:|---|",
              f"| **{method} (this run)** | pseudoseg | **{_fmt(ours)}** | |"]
    for p in published_for(benchmark):
        lines.append(f"| {p.method} | {p.paper} {p.source} | {_fmt(p.miou)} | {p.note} |")
    if not published_for(benchmark):
        lines.append("| (no seed paper reports this benchmark) | | | |")
    ref = METHOD_PAPER.get(method)
    if ref and benchmark not in PUBLISHED[ref]:
        paper = next(iter(PUBLISHED[ref].values())).paper
        lines += ["", f"The {paper} does not report {benchmark}."]
    if benchmark in BENCHMARK_NOTES:
        lines += ["", BENCHMARK_NOTES[benchmark]]
    lines += ["", "## Per-class IoU", "", "| index | class | IoU (%) | intersection | union |",
              "|---:|---|---:|---:|---:|"]
    for r in result.rows():
        iou = None if r["iou"] is None else 100 * r["iou"]
        lines.append(f"| {r['class_index']} | {r['class_name']} | {_fmt(iou)} | {r['intersection']} | "
                     f"{r['union']} |")
    if params:
        lines += ["", "## Parameters", "", "```"]
        lines += [f"{k} = {params[k]}" for k in sorted(params)]
        lines += ["```"]
    return "\n".join(lines) + "\n"


def colourise(label: np.ndarray) -> np.ndarray:
    """uint8 [H, W] labels → uint8 [H, W, 3] with imgviz.label_colormap (255 keeps VOC's void colour)."""
    import imgviz

    return imgviz.label_colormap()[np.asarray(label, np.uint8)]


def grid_png(samples: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], height: int = 160) -> bytes:
    """One row per sample: image | GT | prediction, each scaled to `height` pixels; rows padded (black) to the
    widest. Deterministic PNG bytes (no metadata)."""
    rows = []
    for _, rgb, gt, pred in samples:
        h, w = rgb.shape[:2]
        nw = max(1, round(w * height / h))
        panels = [Resize((h, w), (height, nw)).apply_image(np.asarray(rgb, np.uint8))]
        panels += [colourise(resize_label_map(lab, (height, nw))) for lab in (gt, pred)]
        gap = np.full((height, 4, 3), 255, np.uint8)
        rows.append(np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1))
    if not rows:
        rows = [np.zeros((height, height, 3), np.uint8)]
    width = max(r.shape[1] for r in rows)
    canvas = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows])
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()
