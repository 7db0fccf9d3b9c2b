"""Ingest one shard: read each planned entry, decode/normalise it, and sort it into accepted samples or
reject rows. Pure apart from reading the entries' bytes through the given reader."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pseudoseg.pipeline.core.artifacts import sha256_hex
from pseudoseg.pipeline.core.images import (
    DecodedImage,
    ImageRejected,
    decode_image,
    encode_png,
    sniff_extension,
)
from pseudoseg.pipeline.core.params import DecodeLimits
from pseudoseg.pipeline.core.sources import PlannedEntry, plan_reject, read_error_text
from pseudoseg.schemas import IMAGE_META

STAGE = "ingest"


@dataclass
class IngestResult:
    manifest: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # WebDataset samples, in manifest order

    @property
    def in_count(self) -> int:
        return len(self.manifest) + len(self.rejects)


def reject_row(entry: PlannedEntry, reason: str, detail: str) -> dict[str, str]:
    return {"image_id": entry.image_id, "source": entry.source, "stage": STAGE, "reason": reason, "detail": detail}


def ingest_entries(
    entries: Iterable[PlannedEntry],
    read: Callable[[str], bytes],
    limits: DecodeLimits,
    *,
    on_entry: Callable[[int], None] | None = None,
    sink: Callable[[dict[str, Any]], None] | None = None,
) -> IngestResult:
    """Entries must be one shard's, in plan order. ``read(source)`` returns bytes or raises OSError.
    ``sink``: receives each accepted WebDataset sample (e.g. a TarSpool's ``write``) instead of
    ``result.samples``, so a shard's image bytes are never all in memory."""
    result = IngestResult()
    for i, entry in enumerate(entries):
        if on_entry is not None:
            on_entry(i)
        if entry.read_error is not None:
            result.rejects.append(reject_row(entry, *plan_reject(entry.read_error)))
            continue
        if entry.duplicate_of is not None:
            result.rejects.append(reject_row(entry, "duplicate", f"same content as {entry.duplicate_of}"))
            continue
        try:
            data = read(entry.source)
        except OSError as exc:  # read after planning: the entry changed in between
            result.rejects.append(reject_row(entry, *plan_reject(read_error_text(exc))))
            continue
        if sha256_hex(data) != entry.sha256:
            # The file changed after planning; its id would lie about its content.
            result.rejects.append(reject_row(entry, "changed_since_plan", "content hash differs from the plan"))
            continue
        try:
            decoded = decode_image(
                data, max_side=limits.max_side, min_side=limits.min_side, max_pixels=limits.max_pixels
            )
        except ImageRejected as exc:
            result.rejects.append(reject_row(entry, exc.code, exc.detail))
            continue
        _accept(result, entry, data, decoded, sink)
    return result


def _accept(result: IngestResult, entry: PlannedEntry, data: bytes, decoded: DecodedImage,
            sink: Callable[[dict[str, Any]], None] | None) -> None:
    # Keep the original bytes (EXIF, CMYK, 16-bit are re-normalised identically on every decode), except for
    # giants, which are stored downsized as PNG so no later stage pays for the original again.
    if decoded.resized:
        payload, ext = encode_png(decoded.rgb), "png"
    else:
        payload, ext = data, sniff_extension(decoded.format)
    meta = {
        "image_id": entry.image_id,
        "source": entry.source,
        "width": decoded.width,
        "height": decoded.height,
        "orig_width": decoded.orig_width,
        "orig_height": decoded.orig_height,
        "orig_mode": decoded.orig_mode,
        "stored_ext": ext,
    }
    result.manifest.append(
        {
            **{k: meta[k] for k in ("image_id", "source", "width", "height", "orig_width", "orig_height")},
            "shard": entry.shard,
            "position": entry.position,
            "orig_mode": decoded.orig_mode,
            "orig_format": decoded.format,
            "stored_ext": ext,
            "stored_bytes": len(payload),
            "sha256": entry.sha256,
            "exif_rotated": decoded.exif_rotated,
            "resized": decoded.resized,
        }
    )
    sample = {"__key__": entry.image_id, ext: payload, "json": _json_bytes(meta)}
    if sink is None:
        result.samples.append(sample)
    else:
        sink(sample)


def _json_bytes(meta: Mapping[str, Any]) -> bytes:
    IMAGE_META.table([meta])  # validate against the contract before it is written
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def iter_ingested_samples(tar_path: str) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(image_id, stored payload bytes, meta) for every sample of an ingest shard tar, in manifest order; nothing
    decoded, so a caller can decode each image under its own error handling (``decode_stored``)."""
    import webdataset as wds  # here: it imports torch (see artifacts.webdataset_tar_bytes)

    dataset = wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False)
    for sample in dataset:
        meta = json.loads(sample["json"])
        yield sample["__key__"], sample[meta["stored_ext"]], meta


def decode_stored(data: bytes) -> np.ndarray:
    """rgb uint8 [H, W, 3] of an ingested payload. No size limits: ingest already applied its own (giants were
    downsized, too-small images rejected), and a reader must not judge an accepted image by other limits."""
    return decode_image(data, max_side=1 << 30, min_side=1, max_pixels=1 << 62).rgb


def iter_ingested_images(tar_path: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """(image_id, rgb uint8 [H, W, 3], meta) for every sample of an ingest shard tar, in manifest order."""
    for image_id, data, meta in iter_ingested_samples(tar_path):
        yield image_id, decode_stored(data), meta


def read_ingested_image(store: Any, image_id: str) -> np.ndarray:
    """rgb uint8 [H, W, 3] of one ingested image, by random access: ``store`` is a
    ``pipeline.features.cache.TarStore`` over ingest shard tars (its ``read(key, ext)``)."""
    meta = json.loads(store.read(image_id, "json"))
    return decode_stored(store.read(image_id, meta["stored_ext"]))
