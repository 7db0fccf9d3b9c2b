"""FullDAG (the leaves of every branch) and STAGES: every task `pseudoseg run NAME` accepts, in DAG order, each with
one line saying what it makes (`pseudoseg stages` prints them)."""

from __future__ import annotations

from dataclasses import dataclass

import luigi

from schemas import (
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
from schemas.features import SAM_EMBEDDINGS
from tasks.base import DatasetTask
from tasks.car_labels import CaRLabels
from tasks.export import ExportCoco, Preview
from tasks.features import ClassTextEmbeddings, FmbsegFeatures, UseFeatures, UseTextEmbeddings
from tasks.fmbseg import PseudoLabels
from tasks.ingest import Ingest
from tasks.models import ModelProbe
from tasks.train import TrainAlignment, TrainUSEHead
from tasks.use import UseSegments


class FullDAG(luigi.WrapperTask, DatasetTask):
    def requires(self) -> list[luigi.Task]:
        common = self.common()
        # [train_use] features = online encodes in the training loop: no USE feature cache to build then
        train = TrainUSEHead(**common)
        use_cache = [UseFeatures(**common)] if train.params.features == "cache" else []
        return [Ingest(**common), ModelProbe(**common), UseSegments(**common), ExportCoco(**common),
                Preview(**common), PseudoLabels(**common), *use_cache, FmbsegFeatures(**common),
                UseTextEmbeddings(**common), ClassTextEmbeddings(**common), train,
                TrainAlignment(**common), CaRLabels(**common)]


# (name, what it makes), upstream before downstream; tests/test_cli_stages.py checks the order against the code.
STAGES: tuple[tuple[str, str], ...] = (
    ("Ingest", "list, hash, decode and shard the images; bad inputs become reject rows"),
    ("ModelProbe", "load every model role once and record its output shapes"),
    ("SamEmbeddings", "SAM image encoding per image, shared by the USE and FMbSeg SAM stages"),
    ("Captions", "USE: ground-truth and MLLM captions"),
    ("Expressions", "USE: spaCy noun phrases expanded to referring expressions"),
    ("Boxes", "USE: Grounding DINO boxes, each matched to the phrase of its best token"),
    ("BoxMasks", "USE: SAM box -> mask, best stability, cleanup, whole-image rule"),
    ("UseSegments", "USE: mask NMS merging texts: the segment-text pairs"),
    ("ExportCoco", "USE segments as COCO JSON + the images at mask size"),
    ("PreviewShards", "one HTML gallery of the USE segments per shard"),
    ("Preview", "one page linking every shard's gallery"),
    ("ClipDense", "FMbSeg: sliding-window MaskCLIP features"),
    ("Detections", "FMbSeg: classes present (crop votes) or image-level labels"),
    ("QueryPointMasks", "FMbSeg Stage 1.1: top-5 patches per class -> SAM"),
    ("AutoMaskLabels", "FMbSeg Stage 1.2: SAM automatic masks labelled by dense CLIP"),
    ("PseudoLabels", "FMbSeg: Stage 1.1 + 1.2 merged into one label map per image"),
    ("CaRLabels", "CaR: training-free label maps, a third label source"),
    ("UseFeatures", "frozen CLIP + DINOv2 tokens for the USE head"),
    ("FmbsegFeatures", "frozen DINOv2 tokens for the alignment block"),
    ("UseTextEmbeddings", "CLIP text embeddings of every segment phrase and expression"),
    ("ClassTextEmbeddings", "CLIP text embeddings of the vocabulary's classes"),
    ("TrainUSEHead", "train the USE segment-embedding head"),
    ("TrainAlignment", "train the FMbSeg alignment block"),
    ("Evaluate", "mIoU of a method on a benchmark (--set Evaluate.benchmark=... Evaluate.data_root=...)"),
    ("FullDAG", "every branch above except Evaluate"),
)


@dataclass(frozen=True)
class Output:
    """One stage folder (``<out>/<dataset>/<folder>/<hash>/``) as the end-of-run summary, run.json and the dataset
    card describe it: the STAGES name that makes it, what its in/ok/rejected counts count (``unit``), what its rows
    are (``rows``), and the contract of its main table (None: not a table)."""

    folder: str
    stage: str
    unit: str
    rows: str
    contract: Contract | None = None


# Every stage folder, in DAG order (the summary's order); tests/test_run_summary.py checks it covers FullDAG.
OUTPUTS: tuple[Output, ...] = (
    Output("ingest", "Ingest", "images", "images", MANIFEST),
    Output("model_probe", "ModelProbe", "roles", "roles", MODEL_PROBE),
    Output("sam_embeddings", "SamEmbeddings", "images", "embeddings", SAM_EMBEDDINGS),
    Output("use_captions", "Captions", "images", "captions", CAPTIONS),
    Output("use_expressions", "Expressions", "captions", "expressions", EXPRESSIONS),
    Output("use_boxes", "Boxes", "captions", "boxes", BOXES),
    Output("use_box_masks", "BoxMasks", "boxes", "masks", BOX_MASKS),
    Output("use_segments", "UseSegments", "masks", "segments", SEGMENTS),
    Output("export_coco", "ExportCoco", "segments", "COCO files"),
    Output("use_preview", "Preview", "images", "pages"),
    Output("fmbseg_dense", "ClipDense", "images", "images", DENSE_FEATURES),
    Output("fmbseg_detect", "Detections", "images", "detections", DETECTIONS),
    Output("fmbseg_query_masks", "QueryPointMasks", "detections", "masks", PSEUDO_MASKS),
    Output("fmbseg_auto_masks", "AutoMaskLabels", "images", "masks", PSEUDO_MASKS),
    Output("fmbseg_labels", "PseudoLabels", "images", "regions", LABEL_REGIONS),
    Output("car_labels", "CaRLabels", "images", "regions", LABEL_REGIONS),
    Output("features_use", "UseFeatures", "images", "images", FEATURE_CACHE),
    Output("features_fmbseg", "FmbsegFeatures", "images", "images", FEATURE_CACHE),
    Output("use_text", "UseTextEmbeddings", "texts", "texts", TEXT_EMBEDDINGS),
    Output("text_classes", "ClassTextEmbeddings", "classes", "classes", TEXT_EMBEDDINGS),
    Output("train_use", "TrainUSEHead", "runs", "steps"),
    Output("train_alignment", "TrainAlignment", "runs", "steps"),
    Output("evaluate", "Evaluate", "runs", "classes"),
)
OUTPUT_OF: dict[str, Output] = {o.folder: o for o in OUTPUTS}


def stage_classes() -> dict[str, type[luigi.Task]]:
    """The task class of every STAGES name, in DAG order."""
    from tasks import car_labels, evaluate, export, features, fmbseg, ingest, models, sam, train, use

    modules = (ingest, models, sam, use, export, fmbseg, car_labels, features, train, evaluate)
    found = {name: cls for m in modules for name, cls in vars(m).items() if isinstance(cls, type)}
    found["FullDAG"] = FullDAG
    return {name: found[name] for name, _ in STAGES}
