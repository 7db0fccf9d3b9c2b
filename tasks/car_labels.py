"""CaR (car-paper) as a third pseudo-label source: IngestShard → CaRLabelShard.

One label map per image from ``pipeline.car.CaRSegmenter`` over the preset's ``clip`` role (``clip_cam`` as the
proposal generator, ``clip_classifier`` as the mask classifier), written in exactly PseudoLabelShard's layout so
the trainers can read either:

- ``shard-N.tar``: WebDataset samples ``<image_id>.png`` (uint8 label map, 255 = unlabelled) + ``<image_id>.json``
  (schemas.fmbseg.LABEL_MAP_META, ``precedence = "car"``);
- ``shard-N.classes.json``: the label value → class name table (``pipeline.fmbseg.class_table``);
- ``shard-N.parquet``: LABEL_REGIONS rows, one per (image, class) region (``pixels_stage11/12`` are 0: no Stage-1
  masks are involved);
- ``shard-N.rejects.parquet``: ``no_query_left`` when the recurrence drops every query, ``no_pseudo_label`` when
  the kept queries label no pixel with a foreground class.

Vocabulary: ``[car_labels] vocabulary`` (empty = ``[fmbseg] vocabulary``). A vocabulary whose class 0 is
``background`` (voc21) labels the pixels the background wins 0; without one, every pixel gets the best kept query.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import luigi
import numpy as np

from models.registry import load_role
from pipeline.artifacts import ShardOutput, webdataset_tar_bytes
from pipeline.car import (
    CAR_DEFAULTS,
    IGNORE,
    VISUAL_PROMPTS,
    CarParams,
    CaRSegmenter,
    clip_cam,
    clip_classifier,
)
from pipeline.fmbseg import class_table, label_map_meta, label_region_rows
from pipeline.images import encode_png
from pipeline.report import ShortSide
from pipeline.vocabularies import Vocabulary, load_vocabulary
from schemas.fmbseg import LABEL_MAP_META, LABEL_REGIONS
from tasks.base import (
    ChainedShardTask,
    ProgressReporter,
    StageWrapper,
    model_identity,
    model_settings,
    reject,
)
from tasks.fmbseg import fmbseg

PRECEDENCE = "car"  # LABEL_MAP_META.precedence of CaR maps (FMbSeg's are stage11_first / stage12_first)


class car_labels(luigi.Config):  # noqa: N801 — section [car_labels] of luigi.cfg
    vocabulary = luigi.Parameter(default="", description="vocabulary name or .txt path; empty = [fmbseg]'s")
    params = luigi.Parameter(default="", description="η/θ/λ of car-paper §4: voc | coco | context; empty = by "
                                                     "vocabulary name (coco_* → coco, context* → context, else voc)")
    prompts = luigi.Parameter(default="circle,blur", description="visual prompts (car-paper App. F)")
    crf = luigi.BoolParameter(default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                              description="dense-CRF post-processing (needs pydensecrf2)")
    sam = luigi.BoolParameter(default=False, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                              description="CaR+SAM ensemble with the segmenter role (car-paper §3.4)")
    cam = luigi.ChoiceParameter(choices=("clip_es", "gradcam"), default="clip_es",
                                description="mask proposals: Grad-CAM + CLIP-ES affinity (λ), or Grad-CAM")
    template = luigi.Parameter(default="a photo of a {}.", description="CLIP text template for the queries")
    short_side = luigi.IntParameter(default=336, description="CaR runs at this short side, labels are resized "
                                                              "back (nearest); 0 = original size")


def car_vocabulary() -> Vocabulary:
    return load_vocabulary(car_labels().vocabulary or fmbseg().vocabulary)


def car_label_params() -> CarParams:
    """The paper's per-dataset η/θ/λ (``[car_labels] params``) with the configured prompts and CRF switch."""
    from pipeline.car import car_params

    cfg = car_labels()
    family = cfg.params.strip()
    if family and family not in CAR_DEFAULTS:
        raise ValueError(f"[car_labels] params must be one of {sorted(CAR_DEFAULTS)} or empty, got {family!r}")
    prompts = tuple(p.strip() for p in cfg.prompts.split(",") if p.strip())
    unknown = set(prompts) - set(VISUAL_PROMPTS)
    if unknown or not prompts:
        raise ValueError(f"[car_labels] prompts {cfg.prompts!r}: use a comma list of {VISUAL_PROMPTS}")
    name = car_vocabulary().name
    base = car_params(family) if family else car_params(_family_of(name))
    return dataclasses.replace(base, prompts=prompts, crf=cfg.crf, cam=cfg.cam)


def _family_of(vocabulary_name: str) -> str:
    low = vocabulary_name.lower()
    if low.startswith("coco"):
        return "coco"
    if low.startswith("context"):
        return "context"
    return "voc"


class CaRLabelShard(ChainedShardTask):
    """CaR label maps of one ingest shard, byte-format compatible with PseudoLabelShard's artifact."""

    stage = "car_labels"

    def content_params(self) -> dict[str, Any]:
        cfg, settings = car_labels(), model_settings()
        vocab = car_vocabulary()
        params = {**self.upstream_params(), "clip": model_identity("clip", settings),
                  "vocabulary": vocab.name, "vocabulary_digest": vocab.digest,
                  "car": dataclasses.asdict(car_label_params()), "sam": cfg.sam, "template": cfg.template,
                  "short_side": cfg.short_side}
        if cfg.sam:
            params["segmenter"] = model_identity("segmenter", settings)
        return params

    def segmenter(self, vocab: Vocabulary):
        cfg, settings = car_labels(), model_settings()
        clip = load_role("clip", settings)
        sam = load_role("segmenter", settings) if cfg.sam else None
        prompt_of = {c: (p[0] if p else c) for c, p in zip(vocab.classes, vocab.prompts, strict=True)}
        params = car_label_params()
        seg = CaRSegmenter(clip_cam(clip, cfg.template, method=params.cam, lam=params.lam),
                           clip_classifier(clip, cfg.template), params, sam=sam,
                           prompt_names=lambda n: prompt_of.get(n, n))
        return ShortSide(seg, cfg.short_side) if cfg.short_side > 0 else seg

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        vocab = car_vocabulary()
        params = car_label_params()
        names = list(vocab.classes)
        has_bg = bool(names) and names[0].lower() == "background"
        first = 1 if has_bg else 0
        seg = self.segmenter(vocab)
        sources = self.sources()
        progress.start(len(sources))
        samples, rows, rejects = [], [], []
        for i, (image_id, rgb, _meta) in enumerate(self.ingested()):
            progress.step(i)
            label, scores = seg.segment(rgb, names, image_id=image_id)
            # A query is kept iff its last diagonal score passed θ (dropped ones end below, unqueried stay 0).
            if not (np.asarray(scores)[first:] >= params.theta).any():
                rejects.append(reject(image_id, sources[image_id], self.stage, "no_query_left",
                                      f"CaR dropped all {len(names) - first} queries (θ = {params.theta})"))
                continue
            label = np.asarray(label, np.uint8)
            fg = (label != IGNORE) & (label >= first)
            if not fg.any():
                rejects.append(reject(image_id, sources[image_id], self.stage, "no_pseudo_label",
                                      "the kept queries label no pixel"))
                continue
            meta = label_map_meta(image_id, vocab, label, PRECEDENCE)
            LABEL_MAP_META.table([meta])
            samples.append({"__key__": image_id, "png": encode_png(label),
                            "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()})
            rows.extend(label_region_rows(image_id, vocab, label, np.zeros(label.shape, np.uint8)))
        table = (json.dumps(class_table(vocab), sort_keys=True, indent=1) + "\n").encode()
        return self.finish(LABEL_REGIONS, rows, rejects, len(sources), tar=webdataset_tar_bytes(samples),
                           classes_json=table)


class CaRLabels(StageWrapper):
    """All shards of the CaR pseudo-label artifact (same layout as PseudoLabels)."""

    shard_task = CaRLabelShard
