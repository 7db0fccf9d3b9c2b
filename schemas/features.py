"""Contracts of the feature caches (frozen-encoder tokens) and the text embeddings the two trainable heads use.

Feature cache shard (stage ``features_use`` or ``features_fmbseg``), WebDataset tar, one sample per image with
key ``<image_id>``; every array is float16 ``.npy`` (cast from float32 after encoding):

- ``<id>.clip_patches.npy`` ``[Lc, gh, gw, Cc]``  CLIP vision blocks ``clip_layers`` (raw block outputs)
- ``<id>.clip_cls.npy``     ``[Lc, Cc]``          their CLS tokens
- ``<id>.dino_patches.npy`` ``[Ld, gh, gw, Cd]``  DINOv2 blocks ``dino_layers`` (the last block layer-normed)
- ``<id>.dino_cls.npy``     ``[Ld, Cd]``          their CLS tokens
- ``<id>.json``             one FEATURE_CACHE record (below)

A backbone with no stored block has no members (``clip_layers = []`` and empty shapes). Both backbones share the
patch grid ``(grid_height, grid_width)`` (rows, cols); it spans the WHOLE original image: cell (i, j) covers
original rows ``i·H/gh .. (i+1)·H/gh`` and columns ``j·W/gw .. (j+1)·W/gw``. ``resize`` names how the encoder
input was made: ``squash`` (USE: a fixed square, aspect not kept) or ``short_side`` (FMbSeg: aspect kept, sides
rounded to patch multiples). The shard's Parquet holds the same record, one row per image (``feature_bytes`` =
bytes of that image's ``.npy`` members: the disk cost per image).

SAM image embeddings (stage ``sam_embeddings``), WebDataset tar, one sample per ingested image: ``<id>.sam.npy``
``[1, 256, 64, 64]`` (the image encoder's output, ``dtype``) + ``<id>.json`` = its SAM_EMBEDDINGS record: the
original size and SAM's resized input size (longest side 1024, before padding), which prompts are mapped with.

Text embeddings (Parquet): one row per distinct text — the texts of USE segments, noun phrases and referring
expressions alike (``kind = "segment_text"``, ``class_index = -1``; ``as_phrase`` / ``as_expression`` say whether
the text occurs as a phrase / an expression of some segment, both for an unexpanded phrase) or vocabulary classes
(``kind = "class"``, text = class name, ``class_index`` = label value, both flags false); ``embedding`` is the
L2-normalised mean over the template set's prompts (and, for classes, over prompt names).
v2 (the phrases joined the pool, use-paper §3.1): ``as_phrase`` / ``as_expression`` added, ``kind = "expression"``
became ``"segment_text"``; a v1 file fails to read with a schema version mismatch (rerun the stage).
"""

from __future__ import annotations

import pyarrow as pa

from pseudoseg.schemas.contract import Contract, column, schema

INTS = pa.list_(pa.int32())


def _backbone(prefix: str) -> list[pa.Field]:
    return [
        column(f"{prefix}_model", pa.string()),  # model identity (preset:id), "" if not stored
        column(f"{prefix}_patch_size", pa.int32()),  # 0 if not stored
        column(f"{prefix}_input_hw", INTS),  # [h, w] pixels fed to the encoder, [] if not stored
        column(f"{prefix}_layers", INTS),  # 0-based block indices, order of axis 0 of the arrays
        column(f"{prefix}_patches_shape", INTS),
        column(f"{prefix}_cls_shape", INTS),
    ]


FEATURE_CACHE = Contract("feature_cache", 1, schema(
    column("image_id", pa.string()),
    column("purpose", pa.string()),  # "use" | "fmbseg"
    column("height", pa.int32()),  # original (ingested) image
    column("width", pa.int32()),
    column("resize", pa.string()),  # "squash" | "short_side"
    column("grid_height", pa.int32()),
    column("grid_width", pa.int32()),
    column("dtype", pa.string()),  # of every stored array: "float16"
    *_backbone("clip"),
    *_backbone("dino"),
    column("members", pa.list_(pa.string())),  # array member suffixes, e.g. "clip_patches.npy"
    column("feature_bytes", pa.int64()),
))

SAM_EMBEDDINGS = Contract("sam_embeddings", 1, schema(
    column("image_id", pa.string()),
    column("segmenter", pa.string()),  # model identity (preset:arch:checkpoint)
    column("height", pa.int32()),  # original (ingested) image
    column("width", pa.int32()),
    column("input_height", pa.int32()),  # after SAM's ResizeLongestSide, before padding
    column("input_width", pa.int32()),
    column("dtype", pa.string()),  # "float16" | "float32"
    column("shape", INTS),
    column("embedding_bytes", pa.int64()),
))

TEXT_EMBEDDINGS = Contract("text_embeddings", 2, schema(
    column("text", pa.string()),
    column("kind", pa.string()),  # "segment_text" | "class"
    column("as_phrase", pa.bool_()),  # a noun phrase of some USE segment
    column("as_expression", pa.bool_()),  # a referring expression of some USE segment
    column("class_index", pa.int32()),  # label value for classes, -1 for segment texts
    column("template_set", pa.string()),  # e.g. "use4", "single"
    column("embedding", pa.list_(pa.float32())),
    column("dim", pa.int32()),
))

__all__ = ["FEATURE_CACHE", "SAM_EMBEDDINGS", "TEXT_EMBEDDINGS"]
