"""Contracts of the ingest stage: the dataset plan, per-shard manifest, rejects, and shard stats (done.json)."""

from __future__ import annotations

import pyarrow as pa

from pseudoseg.schemas.contract import Contract, column, schema

# One row per input entry (file, list line, or tar member), in the deterministic order that assigns shards.
PLAN = Contract("plan", 1, schema(
    column("position", pa.int64()),  # global index in sorted source order
    column("shard", pa.int32()),
    column("source", pa.string()),  # file path, or "<tar path>::<member name>"
    column("image_id", pa.string()),  # sha256 prefix of content; of "unreadable:<source>" when unreadable
    column("sha256", pa.string()),  # full content hash ("" when unreadable)
    column("num_bytes", pa.int64()),
    # "<reason>: <detail>" of an entry rejected while planning: unreadable, not_a_regular_file,
    # unreadable_folder (source = the folder); a bare detail (older plans) means unreadable
    column("read_error", pa.string(), nullable=True),
    column("duplicate_of", pa.string(), nullable=True),  # source of the first entry with the same content
))

# One row per image accepted into a shard; the bytes themselves live in the shard's WebDataset tar.
MANIFEST = Contract("manifest", 1, schema(
    column("image_id", pa.string()),
    column("source", pa.string()),
    column("shard", pa.int32()),
    column("position", pa.int64()),
    column("width", pa.int32()),  # of the stored (possibly downsized) image, after EXIF orientation
    column("height", pa.int32()),
    column("orig_width", pa.int32()),  # after EXIF orientation, before downsizing
    column("orig_height", pa.int32()),
    column("orig_mode", pa.string()),  # PIL mode of the source file (L, P, RGBA, CMYK, I;16, ...)
    column("orig_format", pa.string()),
    column("stored_ext", pa.string()),  # extension of the payload in the tar (original bytes, or png if resized)
    column("stored_bytes", pa.int64()),
    column("sha256", pa.string()),  # of the source bytes
    column("exif_rotated", pa.bool_()),
    column("resized", pa.bool_()),
))

# Bad inputs never stop a shard: each becomes one row here. Later stages reuse this contract.
REJECTS = Contract("rejects", 1, schema(
    column("image_id", pa.string()),
    column("source", pa.string()),
    column("stage", pa.string()),
    column("reason", pa.string()),  # a stable code, e.g. truncated, duplicate, decompression_bomb
    column("detail", pa.string()),  # human-readable specifics
))

def _shard_stats_fields(extra: list[pa.Field]) -> list[pa.Field]:
    return [
        column("stage", pa.string()),
        column("dataset", pa.string()),
        column("shard", pa.int32()),
        column("params_hash", pa.string()),
        column("params", pa.map_(pa.string(), pa.string())),  # values are canonical JSON
        column("in_count", pa.int64()),
        column("ok_count", pa.int64()),
        column("rejected_count", pa.int64()),
        *extra,
        column("seconds", pa.float64()),
        column("versions", pa.map_(pa.string(), pa.string())),
        column(
            "files",
            pa.list_(
                pa.struct(
                    [
                        column("name", pa.string()),
                        column("num_bytes", pa.int64()),
                        column("sha256", pa.string()),
                    ]
                )
            ),
        ),
    ]


# shard-NNNNNN.done.json: written last; its presence is the Luigi target. v2 adds what the end-of-run summary
# reads without opening any Parquet: ``rows`` (rows of the shard's main table, null where it has none) and
# ``reject_reasons`` (reason code -> rejects). v1 records (no such fields) stay valid: readers fill them with null.
SHARD_STATS = Contract(
    "shard_stats",
    2,
    pa.schema(_shard_stats_fields([column("rows", pa.int64(), nullable=True),
                                   column("reject_reasons", pa.map_(pa.string(), pa.int64()), nullable=True)])),
)
SHARD_STATS_V1 = Contract("shard_stats", 1, pa.schema(_shard_stats_fields([])))

# The `.json` member of each WebDataset sample in an ingest tar (key = image_id): these MANIFEST columns. The
# image payload sits beside it as `<image_id>.<stored_ext>`; `tar tf shard-000000.tar` lists both.
IMAGE_META = Contract("image_meta", 1, schema(*(MANIFEST.schema.field(name) for name in (
    "image_id", "source", "width", "height", "orig_width", "orig_height", "orig_mode", "stored_ext"))))
