"""Artifact contracts (pyarrow only): one schema + version per artifact, validated on write and on read."""

from schemas.contract import Contract, SchemaError
from schemas.ingest import IMAGE_META, MANIFEST, PLAN, REJECTS, SHARD_STATS
from schemas.models import MODEL_PROBE
from schemas.use import BOX_MASKS, BOXES, CAPTIONS, EXPRESSIONS, SEGMENTS

__all__ = [
    "Contract", "SchemaError", "IMAGE_META", "MANIFEST", "PLAN", "REJECTS", "SHARD_STATS", "MODEL_PROBE",
    "CAPTIONS", "EXPRESSIONS", "BOXES", "BOX_MASKS", "SEGMENTS",
]
