"""SAM image embeddings stored once per image and read by every SAM stage (USE box masks, FMbSeg Stage 1.1 and
1.2), so the image encoder — the most expensive model call of both branches — runs once per image instead of three
times. Arrays only (numpy); the task layer wraps them into the segmenter role's ``SamImageEmbedding``.
Contract: ``schemas.features.SAM_EMBEDDINGS``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import webdataset as wds

from pseudoseg.pipeline.core.npy import npy_array, npy_bytes
from pseudoseg.pipeline.features.params import DTYPES, SamEmbeddingsParams


def embedding_sample(image_id: str, features: np.ndarray, original_hw: tuple[int, int], input_hw: tuple[int, int],
                     segmenter: str, cfg: SamEmbeddingsParams) -> tuple[dict[str, Any], dict[str, Any]]:
    """(WebDataset sample ``{__key__, sam.npy, json}``, SAM_EMBEDDINGS record) of one image's encoder output
    ``features`` float ``[1, 256, 64, 64]``, stored as ``cfg.dtype``."""
    dtype = cfg.dtype
    if dtype not in DTYPES:
        raise ValueError(f"SAM embedding dtype must be one of {DTYPES}, got {dtype!r}")
    array = np.ascontiguousarray(np.asarray(features, np.float32).astype(dtype))
    payload = npy_bytes(array)
    record = {
        "image_id": image_id, "segmenter": segmenter, "height": int(original_hw[0]), "width": int(original_hw[1]),
        "input_height": int(input_hw[0]), "input_width": int(input_hw[1]), "dtype": dtype,
        "shape": [int(v) for v in array.shape], "embedding_bytes": len(payload),
    }
    sample = {"__key__": image_id, "sam.npy": payload,
              "json": json.dumps(record, sort_keys=True, separators=(",", ":")).encode()}
    return sample, record


def iter_sam_embeddings(tar_path: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """(image_id, features float32 ``[1, 256, 64, 64]``, record) per stored image, in stored (manifest) order."""
    for sample in wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False):
        record = json.loads(sample["json"])
        array = npy_array(sample["sam.npy"]).astype(np.float32)
        if list(array.shape) != record["shape"]:
            raise ValueError(f"{tar_path}: SAM embedding of {record['image_id']} has shape {list(array.shape)}, "
                             f"its record says {record['shape']}")
        yield sample["__key__"], array, record


class ForwardLookup:
    """Look-ups by key in a stream read once, in its order: ``get(key)`` skips forward to ``key``. Callers ask in
    the same (manifest) order the stream was written in, so a shard's embeddings are never all in memory."""

    def __init__(self, stream: Iterator[tuple[str, Any, Any]]) -> None:
        self._stream = stream

    def get(self, key: str) -> tuple[Any, Any]:
        for found, *value in self._stream:
            if found == key:
                return tuple(value)
        raise KeyError(f"{key}: not in the stream (missing, or asked out of the stored order)")
