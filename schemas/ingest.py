"""Contracts of the ingest stage: the dataset plan, per-shard manifest, rejects, and shard stats (done.json)."""

from __future__ import annotations

import pyarrow as pa

from schemas.contract import Contract


def _f(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


# One row per input entry (file, list line, or tar member), in the deterministic order that assigns shards.
PLAN = Contract(
    "plan",
    1,
    pa.schema(
        [
            _f("position", pa.int64()),  # global index in sorted source order
            _f("shard", pa.int32()),
            _f("source", pa.string()),  # file path, or "<tar path>::<member name>"
            _f("image_id", pa.string()),  # sha256 prefix of content; of "unreadable:<source>" when unreadable
            _f("sha256", pa.string()),  # full content hash ("" when unreadable)
            _f("num_bytes", pa.int64()),
            # "<reason>: <detail>" of an entry rejected while planning: unreadable, not_a_regular_file,
            # unreadable_folder (source = the folder); a bare detail (older plans) means unreadable
            _f("read_error", pa.string(), nullable=True),
            _f("duplicate_of", pa.string(), nullable=True),  # source of the first entry with the same content
        ]
    ),
)

# One row per image accepted into a shard; the bytes themselves live in the shard's WebDataset tar.
MANIFEST = Contract(
    "manifest",
    1,
    pa.schema(
        [
            _f("image_id", pa.string()),
            _f("source", pa.string()),
            _f("shard", pa.int32()),
            _f("position", pa.int64()),
            _f("width", pa.int32()),  # of the stored (possibly downsized) image, after EXIF orientation
            _f("height", pa.int32()),
            _f("orig_width", pa.int32()),  # after EXIF orientation, before downsizing
            _f("orig_height", pa.int32()),
            _f("orig_mode", pa.string()),  # PIL mode of the source file (L, P, RGBA, CMYK, I;16, ...)
            _f("orig_format", pa.string()),
            _f("stored_ext", pa.string()),  # extension of the payload in the tar (original bytes, or png if resized)
            _f("stored_bytes", pa.int64()),
            _f("sha256", pa.string()),  # of the source bytes
            _f("exif_rotated", pa.bool_()),
            _f("resized", pa.bool_()),
        ]
    ),
)

# Bad inputs never stop a shard: each becomes one row here. Later stages reuse this contract.
REJECTS = Contract(
    "rejects",
    1,
    pa.schema(
        [
            _f("image_id", pa.string()),
            _f("source", pa.string()),
            _f("stage", pa.string()),
            _f("reason", pa.string()),  # a stable code, e.g. truncated, duplicate, decompression_bomb
            _f("detail", pa.string()),  # human-readable specifics
        ]
    ),
)

def _shard_stats_fields(extra: list[pa.Field]) -> list[pa.Field]:
    return [
        _f("stage", pa.string()),
        _f("dataset", pa.string()),
        _f("shard", pa.int32()),
        _f("params_hash", pa.string()),
        _f("params", pa.map_(pa.string(), pa.string())),  # values are canonical JSON
        _f("in_count", pa.int64()),
        _f("ok_count", pa.int64()),
        _f("rejected_count", pa.int64()),
        *extra,
        _f("seconds", pa.float64()),
        _f("versions", pa.map_(pa.string(), pa.string())),
        _f(
            "files",
            pa.list_(
                pa.struct(
                    [
                        pa.field("name", pa.string(), nullable=False),
                        pa.field("num_bytes", pa.int64(), nullable=False),
                        pa.field("sha256", pa.string(), nullable=False),
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
    pa.schema(_shard_stats_fields([_f("rows", pa.int64(), nullable=True),
                                   _f("reject_reasons", pa.map_(pa.string(), pa.int64()), nullable=True)])),
)
SHARD_STATS_V1 = Contract("shard_stats", 1, pa.schema(_shard_stats_fields([])))

# The `.json` member of each WebDataset sample in an ingest tar (key = image_id). The image payload sits
# beside it as `<image_id>.<stored_ext>`; `tar tf shard-000000.tar` lists both.
IMAGE_META = Contract(
    "image_meta",
    1,
    pa.schema(
        [
            _f("image_id", pa.string()),
            _f("source", pa.string()),
            _f("width", pa.int32()),
            _f("height", pa.int32()),
            _f("orig_width", pa.int32()),
            _f("orig_height", pa.int32()),
            _f("orig_mode", pa.string()),
            _f("stored_ext", pa.string()),
        ]
    ),
)
