"""Contracts of the FMbSeg Stage-1 branch (fmbseg-paper §3.2):

dense CLIP features → detections → Stage 1.1 / Stage 1.2 masks → merged pseudo-label maps.

Frames: ``height``/``width`` are the ingested (original) image's; ``resized_*`` the working image the crops were
cut from; ``grid_*`` its patch grid (rows, cols). Crop boxes are xyxy int working pixels (end-exclusive); points
are (x, y) float original pixels (x = column); mask bboxes are COCO xywh. Masks are pycocotools compressed RLE
(``rle_counts`` str + ``height``/``width``). Class indices are label values of the configured vocabulary
(``pipeline/core/vocabularies.py``); 255 means unlabelled in label maps.

WebDataset payloads (per image key ``<image_id>``):
- fmbseg_dense tar: ``<id>.dense.npy`` float16 ``[grid_height, grid_width, embed_dim]`` (L2-normalised before the
  cast), ``<id>.cls.npy`` float16 ``[num_crops, embed_dim]``, ``<id>.json`` = one DENSE_FEATURES record;
- fmbseg_labels tar: ``<id>.png`` uint8 label map (original size, 255 = unlabelled), ``<id>.json`` = one
  LABEL_MAP_META record; the shard's ``classes.json`` holds the full label value → class name table.
"""

from __future__ import annotations

import pyarrow as pa

from pseudoseg.schemas.contract import CLASS_COLUMNS, IMAGE_COLUMNS, MASK_COLUMNS, Contract, column, schema

BOX_INT = pa.list_(pa.int32(), 4)
POINT = pa.list_(pa.float32(), 2)

# One row per image with features (= the sample's JSON record).
DENSE_FEATURES = Contract("fmbseg_dense", 1, schema(
    *IMAGE_COLUMNS,
    column("resized_height", pa.int32()),
    column("resized_width", pa.int32()),
    column("grid_height", pa.int32()),
    column("grid_width", pa.int32()),
    column("embed_dim", pa.int32()),
    column("patch_size", pa.int32()),
    column("crop_size", pa.int32()),  # = the CLIP encoder's image_size
    column("stride", pa.int32()),
    column("num_crops", pa.int32()),
    column("crop_boxes_xyxy", pa.list_(BOX_INT)),  # working pixels, crop order = order of cls.npy rows
    column("dtype", pa.string()),  # of the stored .npy arrays ("float16")
    column("dense_shape", pa.list_(pa.int32())),
    column("cls_shape", pa.list_(pa.int32())),
))

# One row per (image, present class). source: "clip" (crop CLS detection) or "image_labels".
DETECTIONS = Contract("fmbseg_detections", 1, schema(
    column("image_id", pa.string()),
    *CLASS_COLUMNS,
    column("source", pa.string()),
    column("crop_count", pa.int32()),  # crops whose CLS argmax is this class (0 for image labels)
    column("crop_indices", pa.list_(pa.int32())),
    column("score", pa.float32()),  # best CLS·text cosine over those crops (1.0 for image labels)
))

# One row per class-labelled mask; stage "1.1" (query points) or "1.2" (automatic masks).
PSEUDO_MASKS = Contract("fmbseg_masks", 1, schema(
    column("image_id", pa.string()),
    column("mask_index", pa.int32()),  # per image and stage
    column("stage", pa.string()),
    *CLASS_COLUMNS,
    *MASK_COLUMNS,
    column("score", pa.float32()),  # SAM predicted IoU
    column("similarity", pa.float32()),  # class text · evidence cosine (1.1: query cells; 1.2: mask mean)
    column("points_xy", pa.list_(POINT)),  # 1.1: the SAM prompt points, most similar first; 1.2: grid point
    column("multimask_index", pa.int8()),  # 1.1: which of SAM's 3 masks was kept; 1.2: -1
    column("stability", pa.float32()),  # 1.2: SAM stability score; 1.1: -1
))

# One row per (image, class) region of the merged label map: the Parquet view of the PNG.
LABEL_REGIONS = Contract("fmbseg_label_regions", 1, schema(
    column("image_id", pa.string()),
    *CLASS_COLUMNS,
    *MASK_COLUMNS,
    column("pixels_stage11", pa.int64()),  # pixels of the region painted by Stage 1.1 / 1.2 masks
    column("pixels_stage12", pa.int64()),
))

# The JSON record beside each label-map PNG.
LABEL_MAP_META = Contract("fmbseg_label_map", 1, schema(
    *IMAGE_COLUMNS,
    column("vocabulary", pa.string()),
    column("vocabulary_digest", pa.string()),
    column("unlabelled", pa.int32()),  # 255
    column("class_indices", pa.list_(pa.int32())),  # classes present in the map, ascending
    column("class_names", pa.list_(pa.string())),
    column("labelled_pixels", pa.int64()),
    column("precedence", pa.string()),
))

__all__ = ["DENSE_FEATURES", "DETECTIONS", "PSEUDO_MASKS", "LABEL_REGIONS", "LABEL_MAP_META"]
