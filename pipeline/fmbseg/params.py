"""Settings of the FMbSeg Stage-1 stages (section ``[fmbseg]`` of luigi.cfg; fmbseg-paper §3.2): one frozen params
object per stage, hashed whole into its folder name and passed whole to the functions of
``pipeline.fmbseg.pseudo_labels``. Defaults are written here only; luigi.cfg repeats them for the reader (a test
keeps the two equal). A setting several stages read (``vocabulary``) is declared identically in each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pseudoseg.pipeline.core.params import StageParams, setting
from pseudoseg.pipeline.core.vocabularies import TEMPLATE_SETS, vocabulary_digest

PRECEDENCES = ("stage11_first", "stage12_first", "confidence")


def _vocabulary() -> Any:
    return setting("coco_stuff171", digest=vocabulary_digest, help="built-in vocabulary name or a .txt path")


@dataclass(frozen=True)
class FmbsegDenseParams(StageParams):
    section = "fmbseg"  # its luigi.cfg section

    # Working-image short side for the sliding window. The paper's "high resolution": a crop must show a small object
    # whole to name it; at 448 a 224 crop spans half a VOC photo and small objects never win a crop (see
    # tests/pipeline/fmbseg/test_fmbseg_oracle.py), at 672 they do. Cost grows with the crop count (15 → 35 on a 375×500 photo).
    short_side: int = setting(672, ge=1, help="working image short side (pixels) for CLIP crops")
    max_long_side: int = setting(1792, ge=0, help="cap on the working long side; 0 = none")
    stride: int = setting(0, ge=0, help="sliding-window stride, patch multiple; 0 = half a crop")
    clip_batch_size: int = setting(16, ge=1, help="CLIP crops per forward, packed across images (float rounding "
                                   "may differ with the batch)")


@dataclass(frozen=True)
class FmbsegDetectParams(StageParams):
    section = "fmbseg"  # its luigi.cfg section

    vocabulary: str = _vocabulary()
    templates: str = setting("single", choices=tuple(sorted(TEMPLATE_SETS)),
                             help="'single' (a photo of a {}.) or 'imagenet80'")
    image_labels: str = setting("", file=True, help="Parquet of image-level labels replacing detection")
    min_crops: int = setting(1, ge=0, help="a class is present if assigned to MORE crops")


@dataclass(frozen=True)
class FmbsegQueryMasksParams(StageParams):
    section = "fmbseg"  # its luigi.cfg section

    vocabulary: str = _vocabulary()
    top_k: int = setting(5, ge=1, help="Stage 1.1 query points per class (one SAM prompt)")
    multimask: bool = setting(True, help="SAM's three outputs per prompt, the best predicted IoU kept")


@dataclass(frozen=True)
class FmbsegAutoMasksParams(StageParams):
    section = "fmbseg"  # its luigi.cfg section

    vocabulary: str = _vocabulary()
    points_per_side: int = setting(32, ge=1)
    points_per_batch: int = setting(64, ge=1)
    pred_iou_thresh: float = setting(0.88, ge=-1, le=1)
    stability_score_thresh: float = setting(0.95, ge=-1, le=1)
    box_nms_thresh: float = setting(0.7, ge=0, le=1)
    min_mask_region_area: int = setting(100, ge=0)
    min_area_fraction: float = setting(0.0005, ge=0, le=1)
    max_area_fraction: float = setting(0.9, ge=0, le=1)

    def amg(self) -> dict[str, Any]:
        """Keyword arguments of segment-anything's SamAutomaticMaskGenerator (single full-image crop)."""
        return {"points_per_side": self.points_per_side, "points_per_batch": self.points_per_batch,
                "pred_iou_thresh": self.pred_iou_thresh, "stability_score_thresh": self.stability_score_thresh,
                "box_nms_thresh": self.box_nms_thresh, "min_mask_region_area": self.min_mask_region_area}


@dataclass(frozen=True)
class FmbsegLabelsParams(StageParams):
    section = "fmbseg"  # its luigi.cfg section

    vocabulary: str = _vocabulary()
    stage11: bool = setting(True, help="merge Stage 1.1 (query-point) masks")
    stage12: bool = setting(True, help="merge Stage 1.2 (automatic) masks")
    precedence: str = setting("stage11_first", choices=PRECEDENCES, help="which Stage wins where both label a pixel")
