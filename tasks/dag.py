"""FullDAG (the leaves of every branch) and STAGES: every task `pseudoseg run NAME` accepts, in DAG order, each with
one line saying what it makes (`pseudoseg stages` prints them)."""

from __future__ import annotations

import luigi

from tasks.base import DatasetTask
from tasks.car_labels import CaRLabels
from tasks.export import ExportCoco, Preview
from tasks.features import ClassTextEmbeddings, FmbsegFeatures, UseFeatures, UseTextEmbeddings
from tasks.fmbseg import PseudoLabels
from tasks.ingest import Ingest
from tasks.models import ModelProbe
from tasks.train import TrainAlignment, TrainUSEHead, train_use
from tasks.use import UseSegments


class FullDAG(luigi.WrapperTask, DatasetTask):
    def requires(self) -> list[luigi.Task]:
        common = self.common()
        # [train_use] features = online encodes in the training loop: no USE feature cache to build then
        use_cache = [UseFeatures(**common)] if train_use().features == "cache" else []
        return [Ingest(**common), ModelProbe(**common), UseSegments(**common), ExportCoco(**common),
                Preview(**common), PseudoLabels(**common), *use_cache, FmbsegFeatures(**common),
                UseTextEmbeddings(**common), ClassTextEmbeddings(**common), TrainUSEHead(**common),
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


def stage_classes() -> dict[str, type[luigi.Task]]:
    """The task class of every STAGES name, in DAG order."""
    from tasks import car_labels, evaluate, export, features, fmbseg, ingest, models, sam, train, use

    modules = (ingest, models, sam, use, export, fmbseg, car_labels, features, train, evaluate)
    found = {name: cls for m in modules for name, cls in vars(m).items() if isinstance(cls, type)}
    found["FullDAG"] = FullDAG
    return {name: found[name] for name, _ in STAGES}
