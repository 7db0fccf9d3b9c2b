"""STAGES: every task `pseudoseg run NAME` accepts, in DAG order, each with one line saying what it makes
(`pseudoseg stages` prints them) and, for a stage folder, what its counts count. Plain data (no task module is
imported), so a command can list the stages and check its arguments before any model library loads;
``tasks.dag.stage_classes`` gives the task class of each name."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pseudoseg.schemas import (
    BOX_MASKS,
    BOXES,
    CAPTIONS,
    DENSE_FEATURES,
    DETECTIONS,
    EXPRESSIONS,
    FEATURE_CACHE,
    LABEL_REGIONS,
    MANIFEST,
    MODEL_PROBE,
    PSEUDO_MASKS,
    SEGMENTS,
    TEXT_EMBEDDINGS,
    Contract,
)
from pseudoseg.schemas.features import SAM_EMBEDDINGS


@dataclass(frozen=True)
class Stage:
    """One task `pseudoseg run NAME` accepts: what it makes (`pseudoseg stages`) and, for one that writes a stage
    folder (``<out>/<dataset>/<folder>/<hash>/``, the snake_case of its name), what the end-of-run summary, run.json
    and the dataset card say of that folder: what its in/ok/rejected counts count (``unit``), what its rows are
    (``rows``) and the contract of its main table (None: not a table)."""

    name: str
    makes: str
    unit: str | None = None  # None: writes no stage folder of its own (a wrapper of other stages)
    rows: str = "rows"
    contract: Contract | None = None

    @property
    def folder(self) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).lower()


# Upstream before downstream; tests/tasks/test_cli_stages.py checks the order against the code, and
# tests/tasks/test_run_summary.py that every folder FullDAG writes is here.
STAGES: tuple[Stage, ...] = (
    Stage("Ingest", "list, hash, decode and shard the images; bad inputs become reject rows",
          "images", "images", MANIFEST),
    Stage("ModelProbe", "load every model role once and record its output shapes",
          "roles", "roles", MODEL_PROBE),
    Stage("SamEmbeddings", "SAM image encoding per image, shared by the USE and FMbSeg SAM stages",
          "images", "embeddings", SAM_EMBEDDINGS),
    Stage("UseCaptions", "USE: ground-truth and MLLM captions",
          "images", "captions", CAPTIONS),
    Stage("UseExpressions", "USE: spaCy noun phrases expanded to referring expressions",
          "captions", "expressions", EXPRESSIONS),
    Stage("UseBoxes", "USE: Grounding DINO boxes, each matched to the phrase of its best token",
          "captions", "boxes", BOXES),
    Stage("UseGtBoxes", "USE: human box-text pairs ([use] gt_boxes: Visual Genome regions) as boxes for SAM",
          "regions", "boxes", BOXES),
    Stage("UseBoxMasks", "USE: SAM box -> mask, best stability, cleanup, whole-image rule",
          "boxes", "masks", BOX_MASKS),
    Stage("UseSegments", "USE: mask NMS merging texts: the segment-text pairs",
          "masks", "segments", SEGMENTS),
    Stage("ExportCoco", "USE segments as COCO JSON + the images at mask size",
          "segments", "COCO files"),
    Stage("UsePreviewShards", "one HTML gallery of the USE segments per shard"),
    Stage("UsePreview", "one page linking every shard's gallery",
          "images", "pages"),
    Stage("FmbsegDense", "FMbSeg: sliding-window MaskCLIP features",
          "images", "images", DENSE_FEATURES),
    Stage("FmbsegDetect", "FMbSeg: classes present (crop votes) or image-level labels",
          "images", "detections", DETECTIONS),
    Stage("FmbsegQueryMasks", "FMbSeg Stage 1.1: top-5 patches per class -> SAM",
          "detections", "masks", PSEUDO_MASKS),
    Stage("FmbsegAutoMasks", "FMbSeg Stage 1.2: SAM automatic masks labelled by dense CLIP",
          "images", "masks", PSEUDO_MASKS),
    Stage("FmbsegLabels", "FMbSeg: Stage 1.1 + 1.2 merged into one label map per image",
          "images", "regions", LABEL_REGIONS),
    Stage("CarLabels", "CaR: training-free label maps, a third label source",
          "images", "regions", LABEL_REGIONS),
    Stage("FeaturesUse", "frozen CLIP + DINOv2 tokens for the USE head",
          "images", "images", FEATURE_CACHE),
    Stage("FeaturesFmbseg", "frozen DINOv2 tokens for the alignment block",
          "images", "images", FEATURE_CACHE),
    Stage("UseText", "CLIP text embeddings of every segment phrase and expression",
          "texts", "texts", TEXT_EMBEDDINGS),
    Stage("TextClasses", "CLIP text embeddings of the vocabulary's classes",
          "classes", "classes", TEXT_EMBEDDINGS),
    Stage("TrainUse", "train the USE segment-embedding head",
          "runs", "steps"),
    Stage("TrainAlignment", "train the FMbSeg alignment block",
          "runs", "steps"),
    Stage("Evaluate", "mIoU of a method on a benchmark (--set Evaluate.benchmark=... Evaluate.data_root=...)",
          "runs", "classes"),
    Stage("FullDAG", "every branch above except Evaluate"),
)
# The stages that write a folder, in DAG order (the summary's order), by folder.
OUTPUTS: tuple[Stage, ...] = tuple(stage for stage in STAGES if stage.unit is not None)
OUTPUT_OF: dict[str, Stage] = {o.folder: o for o in OUTPUTS}
