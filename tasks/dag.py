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
from tasks.car_labels import CarLabels
from tasks.export import ExportCoco, UsePreview
from tasks.features import FeaturesFmbseg, FeaturesUse, TextClasses, UseText
from tasks.fmbseg import FmbsegLabels
from tasks.ingest import Ingest
from tasks.models import ModelProbe
from tasks.train import TrainAlignment, TrainUse
from tasks.use import UseSegments


class FullDAG(luigi.WrapperTask, DatasetTask):
    def requires(self) -> list[luigi.Task]:
        common = self.common()
        # [train_use] features = online encodes in the training loop: no USE feature cache to build then
        train = TrainUse(**common)
        use_cache = [FeaturesUse(**common)] if train.params.features == "cache" else []
        return [Ingest(**common), ModelProbe(**common), UseSegments(**common), ExportCoco(**common),
                UsePreview(**common), FmbsegLabels(**common), *use_cache, FeaturesFmbseg(**common),
                UseText(**common), TextClasses(**common), train,
                TrainAlignment(**common), CarLabels(**common)]


# (name, what it makes), upstream before downstream; tests/tasks/test_cli_stages.py checks the order against the code.
STAGES: tuple[tuple[str, str], ...] = (
    ("Ingest", "list, hash, decode and shard the images; bad inputs become reject rows"),
    ("ModelProbe", "load every model role once and record its output shapes"),
    ("SamEmbeddings", "SAM image encoding per image, shared by the USE and FMbSeg SAM stages"),
    ("UseCaptions", "USE: ground-truth and MLLM captions"),
    ("UseExpressions", "USE: spaCy noun phrases expanded to referring expressions"),
    ("UseBoxes", "USE: Grounding DINO boxes, each matched to the phrase of its best token"),
    ("UseBoxMasks", "USE: SAM box -> mask, best stability, cleanup, whole-image rule"),
    ("UseSegments", "USE: mask NMS merging texts: the segment-text pairs"),
    ("ExportCoco", "USE segments as COCO JSON + the images at mask size"),
    ("UsePreviewShards", "one HTML gallery of the USE segments per shard"),
    ("UsePreview", "one page linking every shard's gallery"),
    ("FmbsegDense", "FMbSeg: sliding-window MaskCLIP features"),
    ("FmbsegDetect", "FMbSeg: classes present (crop votes) or image-level labels"),
    ("FmbsegQueryMasks", "FMbSeg Stage 1.1: top-5 patches per class -> SAM"),
    ("FmbsegAutoMasks", "FMbSeg Stage 1.2: SAM automatic masks labelled by dense CLIP"),
    ("FmbsegLabels", "FMbSeg: Stage 1.1 + 1.2 merged into one label map per image"),
    ("CarLabels", "CaR: training-free label maps, a third label source"),
    ("FeaturesUse", "frozen CLIP + DINOv2 tokens for the USE head"),
    ("FeaturesFmbseg", "frozen DINOv2 tokens for the alignment block"),
    ("UseText", "CLIP text embeddings of every segment phrase and expression"),
    ("TextClasses", "CLIP text embeddings of the vocabulary's classes"),
    ("TrainUse", "train the USE segment-embedding head"),
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


# Every stage folder, in DAG order (the summary's order); tests/tasks/test_run_summary.py checks it covers FullDAG.
OUTPUTS: tuple[Output, ...] = (
    Output("ingest", "Ingest", "images", "images", MANIFEST),
    Output("model_probe", "ModelProbe", "roles", "roles", MODEL_PROBE),
    Output("sam_embeddings", "SamEmbeddings", "images", "embeddings", SAM_EMBEDDINGS),
    Output("use_captions", "UseCaptions", "images", "captions", CAPTIONS),
    Output("use_expressions", "UseExpressions", "captions", "expressions", EXPRESSIONS),
    Output("use_boxes", "UseBoxes", "captions", "boxes", BOXES),
    Output("use_box_masks", "UseBoxMasks", "boxes", "masks", BOX_MASKS),
    Output("use_segments", "UseSegments", "masks", "segments", SEGMENTS),
    Output("export_coco", "ExportCoco", "segments", "COCO files"),
    Output("use_preview", "UsePreview", "images", "pages"),
    Output("fmbseg_dense", "FmbsegDense", "images", "images", DENSE_FEATURES),
    Output("fmbseg_detect", "FmbsegDetect", "images", "detections", DETECTIONS),
    Output("fmbseg_query_masks", "FmbsegQueryMasks", "detections", "masks", PSEUDO_MASKS),
    Output("fmbseg_auto_masks", "FmbsegAutoMasks", "images", "masks", PSEUDO_MASKS),
    Output("fmbseg_labels", "FmbsegLabels", "images", "regions", LABEL_REGIONS),
    Output("car_labels", "CarLabels", "images", "regions", LABEL_REGIONS),
    Output("features_use", "FeaturesUse", "images", "images", FEATURE_CACHE),
    Output("features_fmbseg", "FeaturesFmbseg", "images", "images", FEATURE_CACHE),
    Output("use_text", "UseText", "texts", "texts", TEXT_EMBEDDINGS),
    Output("text_classes", "TextClasses", "classes", "classes", TEXT_EMBEDDINGS),
    Output("train_use", "TrainUse", "runs", "steps"),
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
