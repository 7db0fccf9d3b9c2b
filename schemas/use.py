"""Contracts of the USE branch (use-paper §3.1): captions → expressions → grounded boxes → box masks → segments.

Row keys: ``image_id`` (ingest id), ``caption_index`` (per image, in caption order: ground-truth captions first,
then generated ones), ``phrase_index`` (per caption, noun-chunk order), ``box_index`` (per image, over all its
captions). Boxes are xyxy float32 pixels of the ingested image (x = column); bboxes of masks are COCO xywh.
Masks are COCO compressed RLE from pycocotools: ``rle_counts`` (str) with ``height``/``width``.
"""

from __future__ import annotations

import pyarrow as pa

from pseudoseg.schemas.contract import MASK_COLUMNS, Contract, column, columns, schema

BOX = pa.list_(pa.float32(), 4)
# The phrase a row comes from: its caption (index, source) and the phrase with its referring expression.
PHRASE_COLUMNS = columns(caption_index=pa.int32(), source=pa.string(), phrase_index=pa.int32(), phrase=pa.string(),
                         expression=pa.string())

CAPTIONS = Contract("captions", 1, schema(
    column("image_id", pa.string()),
    column("caption_index", pa.int32()),
    column("source", pa.string()),  # "gt" or "mllm:<model id or folder>"
    column("caption", pa.string()),
))

EXPRESSIONS = Contract("expressions", 1, schema(
    column("image_id", pa.string()),
    *PHRASE_COLUMNS,
    column("phrase_start", pa.int32()),  # character offsets of the phrase in the caption, end exclusive
    column("phrase_end", pa.int32()),
))

# One row per (box, phrase) pair; the expression of the phrase travels with it (box–expression pair).
BOXES = Contract("boxes", 1, schema(
    column("image_id", pa.string()),
    column("box_index", pa.int32()),
    *PHRASE_COLUMNS,
    column("box_xyxy", BOX),
    column("score", pa.float32()),  # grounder's box score (max token probability)
))

# One text of a mask: the PHRASE_COLUMNS that say which phrase of which caption it is.
TEXT = pa.struct([field for name in ("phrase", "expression", "source", "caption_index")
                  for field in PHRASE_COLUMNS if field.name == name])

# One row per kept box mask (SAM, best-stability multimask output, cleaned) with the texts of its box.
BOX_MASKS = Contract("box_masks", 1, schema(
    column("image_id", pa.string()),
    column("box_index", pa.int32()),
    *MASK_COLUMNS,
    column("box_xyxy", BOX),  # the prompt box
    column("predicted_iou", pa.float32()),
    column("stability", pa.float32()),
    column("multimask_index", pa.int8()),  # which of SAM's 3 outputs was kept (-1: whole-image box)
    column("whole_image", pa.bool_()),
    column("texts", pa.list_(TEXT)),
))

# Segment–text pairs after mask NMS: every suppressed mask's texts merged into the kept one's list.
SEGMENTS = Contract("segments", 1, schema(
    column("image_id", pa.string()),
    column("segment_id", pa.int32()),  # per image, in NMS rank order
    *MASK_COLUMNS,
    column("score", pa.float32()),  # predicted IoU of the kept mask (the NMS ranking score)
    column("box_indices", pa.list_(pa.int32())),  # kept box first, then the boxes it absorbed
    column("texts", pa.list_(TEXT)),  # deduplicated, in box order
))
