"""Artifact contracts (pyarrow only): one schema + version per artifact, validated on write and on read."""

from pseudoseg.schemas.contract import Contract, SchemaError
from pseudoseg.schemas.evaluation import CLASS_IOU
from pseudoseg.schemas.features import FEATURE_CACHE, TEXT_EMBEDDINGS
from pseudoseg.schemas.fmbseg import DENSE_FEATURES, DETECTIONS, LABEL_MAP_META, LABEL_REGIONS, PSEUDO_MASKS
from pseudoseg.schemas.ingest import IMAGE_META, MANIFEST, PLAN, REJECTS, SHARD_STATS, SHARD_STATS_V1
from pseudoseg.schemas.models import MODEL_PROBE
from pseudoseg.schemas.use import BOX_MASKS, BOXES, CAPTIONS, EXPRESSIONS, SEGMENTS

__all__ = [
    "Contract", "SchemaError", "IMAGE_META", "MANIFEST", "PLAN", "REJECTS", "SHARD_STATS", "SHARD_STATS_V1",
    "MODEL_PROBE",
    "CAPTIONS", "EXPRESSIONS", "BOXES", "BOX_MASKS", "SEGMENTS",
    "DENSE_FEATURES", "DETECTIONS", "PSEUDO_MASKS", "LABEL_REGIONS", "LABEL_MAP_META", "CLASS_IOU",
    "FEATURE_CACHE", "TEXT_EMBEDDINGS",
]
