"""Export USE segment–text pairs (SEGMENTS rows) as one COCO-format JSON that any COCO tool can read.

Shape of the output (``coco_from_segments``)
- ``info``: description and version only — no dates, so the same rows always give the same bytes.
- ``images``: one per manifest row, sorted by ``image_id`` (the ingest content id); COCO ``id`` = 1-based
  position in that order. ``file_name`` is the image as exported beside the JSON (``file_names``: relative to
  the ``data/`` folder that holds each image at the size its masks were made on, see :func:`export_image`) or,
  without that, the manifest ``source``; ``pseudoseg_source`` keeps the source (file path, or
  ``<tar>::<member>``) and ``pseudoseg_image_id`` the ingest id. ``width``/``height`` are those of the *ingested*
  image (after EXIF orientation and any downsizing), which is the frame every mask lives in.
- ``annotations``: one per segment, sorted by (``image_id``, ``segment_id``); ``id`` = 1-based position.
  ``segmentation`` is the stored compressed RLE, unchanged: ``{"size": [h, w], "counts": str}``
  (pycocotools reads ``str`` counts). ``area`` and ``bbox`` (xywh, x = column) are the SEGMENTS values,
  which equal ``pycocotools.mask.area`` / ``toBbox`` of that RLE. ``iscrowd`` is 0, ``score`` the NMS
  ranking score (so the file also works as a detection *result* list).
  Text fields (extra keys, ignored by pycocotools): ``expressions`` and ``phrases`` (unique, first-seen order
  of ``texts``), ``texts`` (the full list of ``{phrase, expression, source, caption_index}``), plus
  ``segment_id`` and ``box_indices`` for tracing back to the shard.
- ``categories``: one, ``{"id": 1, "name": "segment"}``. USE segments are open-vocabulary: what a segment is
  lives in its texts, not in a fixed class list, so every annotation has ``category_id`` 1.

Deterministic: dict keys are built in a fixed order and :func:`write_coco_json` also sorts them; ids follow
sorted ids, never input order or time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pseudoseg.pipeline.core.artifacts import atomic_write_bytes
from pseudoseg.schemas import SEGMENTS

COCO_EXPORT_VERSION = "2"
IMAGES_DIR = "data"  # beside coco.json: FiftyOne's COCO layout (data/ + labels), pycocotools takes any folder
CATEGORY = {"id": 1, "name": "segment", "supercategory": "segment"}


def _texts(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """SEGMENTS ``texts`` → plain dicts with a fixed key order (rows from pyarrow may carry extra types)."""
    return [
        {
            "phrase": str(t["phrase"]),
            "expression": str(t["expression"]),
            "source": str(t["source"]),
            "caption_index": int(t["caption_index"]),
        }
        for t in (row.get("texts") or [])
    ]


def _unique(values: Iterable[str]) -> list[str]:
    """Unique values in first-seen order."""
    return list(dict.fromkeys(values))


def export_image(payload: bytes, meta: Mapping[str, Any]) -> tuple[bytes, str]:
    """(file bytes, extension) of one ingested image for the COCO export: pixels exactly as the masks saw them.

    The stored payload is written unchanged when every reader decodes it to those pixels (a JPEG or PNG in RGB
    or grey, no EXIF orientation, at the stored size); anything else (EXIF-rotated, CMYK, 16-bit, WEBP/TIFF/GIF,
    …) is re-encoded as PNG from the decoded upright RGB, which is what the masks were made on."""
    import io

    from PIL import Image

    from pseudoseg.pipeline.core.images import encode_png, exif_orientation
    from pseudoseg.pipeline.core.ingest import decode_stored

    with Image.open(io.BytesIO(payload)) as img:  # header only
        plain = (img.format in ("JPEG", "PNG") and img.mode in ("RGB", "L") and exif_orientation(img) == 1
                 and img.size == (int(meta["width"]), int(meta["height"])))
    if plain:
        return payload, str(meta["stored_ext"])
    return encode_png(decode_stored(payload)), "png"


def coco_from_segments(
    manifest_rows: Iterable[Mapping[str, Any]],
    segment_rows: Iterable[Mapping[str, Any]],
    *,
    dataset: str,
    file_names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """COCO dict of SEGMENTS rows over the images of MANIFEST rows (any number of shards, any order).

    Images without segments are listed with no annotations. Raises ``ValueError`` for a duplicate image id, a
    segment whose image is not in the manifest, a segment whose ``height``/``width`` differ from its image's,
    or a duplicate (``image_id``, ``segment_id``) — all signs of mixing artifacts from different runs.
    """
    images_by_id: dict[str, Mapping[str, Any]] = {}
    for row in manifest_rows:
        image_id = str(row["image_id"])
        if image_id in images_by_id:
            raise ValueError(f"duplicate image_id {image_id!r} in the manifest rows")
        images_by_id[image_id] = row

    images = []
    coco_id: dict[str, int] = {}
    for n, image_id in enumerate(sorted(images_by_id), start=1):
        row = images_by_id[image_id]
        coco_id[image_id] = n
        images.append(
            {
                "id": n,
                "file_name": file_names[image_id] if file_names is not None else str(row["source"]),
                "width": int(row["width"]),
                "height": int(row["height"]),
                "pseudoseg_image_id": image_id,
                "pseudoseg_source": str(row["source"]),
            }
        )

    segments = sorted(segment_rows, key=lambda r: (str(r["image_id"]), int(r["segment_id"])))
    annotations = []
    seen: set[tuple[str, int]] = set()
    for n, row in enumerate(segments, start=1):
        image_id, segment_id = str(row["image_id"]), int(row["segment_id"])
        if image_id not in images_by_id:
            raise ValueError(f"segment {segment_id} of image {image_id!r} has no manifest row")
        if (image_id, segment_id) in seen:
            raise ValueError(f"duplicate segment {segment_id} of image {image_id!r}")
        seen.add((image_id, segment_id))
        h, w = int(row["height"]), int(row["width"])
        img = images_by_id[image_id]
        if (h, w) != (int(img["height"]), int(img["width"])):
            raise ValueError(
                f"segment {segment_id} of image {image_id!r} is {h}x{w} (HxW) but the image is "
                f"{int(img['height'])}x{int(img['width'])}"
            )
        texts = _texts(row)
        annotations.append(
            {
                "id": n,
                "image_id": coco_id[image_id],
                "category_id": CATEGORY["id"],
                "segmentation": {"size": [h, w], "counts": str(row["rle_counts"])},
                "area": int(row["area"]),
                "bbox": [float(v) for v in row["bbox"]],
                "iscrowd": 0,
                "score": float(row["score"]),
                "expressions": _unique(t["expression"] for t in texts),
                "phrases": _unique(t["phrase"] for t in texts),
                "texts": texts,
                "segment_id": segment_id,
                "box_indices": [int(v) for v in (row.get("box_indices") or [])],
            }
        )

    return {
        "info": {
            "description": f"pseudoseg USE segment-text pairs of dataset {dataset!r}",
            "version": COCO_EXPORT_VERSION,
            "contributor": "pseudoseg",
            "segments_schema": SEGMENTS.tag,
            **({"images_dir": IMAGES_DIR} if file_names is not None else {}),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(CATEGORY)],
    }


def coco_json_bytes(coco: Mapping[str, Any]) -> bytes:
    """Sorted-key, compact UTF-8 JSON with a trailing newline; NaN/inf are an error (not valid JSON)."""
    text = json.dumps(coco, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def write_coco_json(coco: Mapping[str, Any], path: str | Path) -> Path:
    """Write :func:`coco_json_bytes` atomically (hidden temporary sibling, then rename). Returns the path."""
    path = Path(path)
    atomic_write_bytes(path, coco_json_bytes(coco))
    return path
