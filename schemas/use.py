"""Contracts of the USE branch (use-paper §3.1): captions → expressions → grounded boxes → box masks → segments.

Row keys: ``image_id`` (ingest id), ``caption_index`` (per image, in caption order: ground-truth captions first,
then generated ones), ``phrase_index`` (per caption, noun-chunk order), ``box_index`` (per image, over all its
captions). Boxes are xyxy float32 pixels of the ingested image (x = column); bboxes of masks are COCO xywh.
Masks are COCO compressed RLE from pycocotools: ``rle_counts`` (str) with ``height``/``width``.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.contract import Contract


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


BOX = pa.list_(pa.float32(), 4)
BBOX = pa.list_(pa.float64(), 4)

CAPTIONS = Contract(
    "captions",
    1,
    pa.schema(
        [
            _f("image_id", pa.string()),
            _f("caption_index", pa.int32()),
            _f("source", pa.string()),  # "gt" or "mllm:<model id or folder>"
            _f("caption", pa.string()),
        ]
    ),
)

EXPRESSIONS = Contract(
    "expressions",
    1,
    pa.schema(
        [
            _f("image_id", pa.string()),
            _f("caption_index", pa.int32()),
            _f("source", pa.string()),
            _f("phrase_index", pa.int32()),
            _f("phrase", pa.string()),
            _f("expression", pa.string()),
            _f("phrase_start", pa.int32()),  # character offsets of the phrase in the caption, end exclusive
            _f("phrase_end", pa.int32()),
        ]
    ),
)

# One row per (box, phrase) pair; the expression of the phrase travels with it (box–expression pair).
BOXES = Contract(
    "boxes",
    1,
    pa.schema(
        [
            _f("image_id", pa.string()),
            _f("box_index", pa.int32()),
            _f("caption_index", pa.int32()),
            _f("source", pa.string()),
            _f("phrase_index", pa.int32()),
            _f("phrase", pa.string()),
            _f("expression", pa.string()),
            _f("box_xyxy", BOX),
            _f("score", pa.float32()),  # grounder's box score (max token probability)
        ]
    ),
)

TEXT = pa.struct(
    [
        pa.field("phrase", pa.string(), nullable=False),
        pa.field("expression", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("caption_index", pa.int32(), nullable=False),
    ]
)

# One row per kept box mask (SAM, best-stability multimask output, cleaned) with the texts of its box.
BOX_MASKS = Contract(
    "box_masks",
    1,
    pa.schema(
        [
            _f("image_id", pa.string()),
            _f("box_index", pa.int32()),
            _f("height", pa.int32()),
            _f("width", pa.int32()),
            _f("rle_counts", pa.string()),
            _f("area", pa.int64()),
            _f("bbox", BBOX),  # COCO xywh of the mask
            _f("box_xyxy", BOX),  # the prompt box
            _f("predicted_iou", pa.float32()),
            _f("stability", pa.float32()),
            _f("multimask_index", pa.int8()),  # which of SAM's 3 outputs was kept (-1: whole-image box)
            _f("whole_image", pa.bool_()),
            _f("texts", pa.list_(TEXT)),
        ]
    ),
)

# Segment–text pairs after mask NMS: every suppressed mask's texts merged into the kept one's list.
SEGMENTS = Contract(
    "segments",
    1,
    pa.schema(
        [
            _f("image_id", pa.string()),
            _f("segment_id", pa.int32()),  # per image, in NMS rank order
            _f("height", pa.int32()),
            _f("width", pa.int32()),
            _f("rle_counts", pa.string()),
            _f("area", pa.int64()),
            _f("bbox", BBOX),
            _f("score", pa.float32()),  # predicted IoU of the kept mask (the NMS ranking score)
            _f("box_indices", pa.list_(pa.int32())),  # kept box first, then the boxes it absorbed
            _f("texts", pa.list_(TEXT)),  # deduplicated, in box order
        ]
    ),
)
