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

from schemas.contract import Contract


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


BOX_INT = pa.list_(pa.int32(), 4)
BBOX = pa.list_(pa.float64(), 4)
POINT = pa.list_(pa.float32(), 2)

# One row per image with features (= the sample's JSON record).
DENSE_FEATURES = Contract(
    "fmbseg_dense",
    1,
    pa.schema(
        [
            _f("image_id", pa.string()),
            _f("height", pa.int32()),
            _f("width", pa.int32()),
            _f("resized_height", pa.int32()),
            _f("resized_width", pa.int32()),
            _f("grid_height", pa.int32()),
            _f("grid_width", pa.int32()),
            _f("embed_dim", pa.int32()),
            _f("patch_size", pa.int32()),
            _f("crop_size", pa.int32()),  # = the CLIP encoder's image_size
            _f("stride", pa.int32()),
            _f("num_crops", pa.int32()),
            _f("crop_boxes_xyxy", pa.list_(BOX_INT)),  # working pixels, crop order = order of cls.npy rows
            _f("dtype", pa.string()),  # of the stored .npy arrays ("float16")
            _f("dense_shape", pa.list_(pa.int32())),
            _f("cls_shape", pa.list_(pa.int32())),
        ]
    ),
)

# One row per (image, present class). source: "clip" (crop CLS detection) or "image_labels".
DETECTIONS = Contract(
    "fmbseg_detections",
    1,
    pa.schema(
        [
            _f("image_id", pa.string()),
            _f("class_index", pa.int32()),
            _f("class_name", pa.string()),
            _f("source", pa.string()),
            _f("crop_count", pa.int32()),  # crops whose CLS argmax is this class (0 for image labels)
            _f("crop_indices", pa.list_(pa.int32())),
            _f("score", pa.float32()),  # best CLS·text cosine over those crops (1.0 for image labels)
        ]
    ),
)

# One row per class-labelled mask; stage "1.1" (query points) or "1.2" (automatic masks).
PSEUDO_MASKS = Contract(
    "fmbseg_masks",
    1,
    pa.schema(
        [
            _f("image_id", pa.string()),
            _f("mask_index", pa.int32()),  # per image and stage
            _f("stage", pa.string()),
            _f("class_index", pa.int32()),
            _f("class_name", pa.string()),
            _f("height", pa.int32()),
            _f("width", pa.int32()),
            _f("rle_counts", pa.string()),
            _f("area", pa.int64()),
            _f("bbox", BBOX),
            _f("score", pa.float32()),  # SAM predicted IoU
            _f("similarity", pa.float32()),  # class text · evidence cosine (1.1: query cells; 1.2: mask mean)
            _f("points_xy", pa.list_(POINT)),  # 1.1: the SAM prompt points, most similar first; 1.2: grid point
            _f("multimask_index", pa.int8()),  # 1.1: which of SAM's 3 masks was kept; 1.2: -1
            _f("stability", pa.float32()),  # 1.2: SAM stability score; 1.1: -1
        ]
    ),
)

# One row per (image, class) region of the merged label map: the Parquet view of the PNG.
LABEL_REGIONS = Contract(
    "fmbseg_label_regions",
    1,
    pa.schema(
        [
            _f("image_id", pa.string()),
            _f("class_index", pa.int32()),
            _f("class_name", pa.string()),
            _f("height", pa.int32()),
            _f("width", pa.int32()),
            _f("rle_counts", pa.string()),
            _f("area", pa.int64()),
            _f("bbox", BBOX),
            _f("pixels_stage11", pa.int64()),  # pixels of the region painted by Stage 1.1 / 1.2 masks
            _f("pixels_stage12", pa.int64()),
        ]
    ),
)

# The JSON record beside each label-map PNG.
LABEL_MAP_META = Contract(
    "fmbseg_label_map",
    1,
    pa.schema(
        [
            _f("image_id", pa.string()),
            _f("height", pa.int32()),
            _f("width", pa.int32()),
            _f("vocabulary", pa.string()),
            _f("vocabulary_digest", pa.string()),
            _f("unlabelled", pa.int32()),  # 255
            _f("class_indices", pa.list_(pa.int32())),  # classes present in the map, ascending
            _f("class_names", pa.list_(pa.string())),
            _f("labelled_pixels", pa.int64()),
            _f("precedence", pa.string()),
        ]
    ),
)

__all__ = ["DENSE_FEATURES", "DETECTIONS", "PSEUDO_MASKS", "LABEL_REGIONS", "LABEL_MAP_META"]
