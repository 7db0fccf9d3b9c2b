"""CaR (car-paper) as a third pseudo-label source: IngestShard → CarLabelsShard.

One label map per image from ``pipeline.car.recurrent.CaRMethod`` over the preset's ``cam_clip`` role (``clip_cam``, the
proposal generator f) and ``classifier_clip`` role (``clip_classifier``, the mask classifier g), written in exactly
FmbsegLabelsShard's layout so the trainers can read either:

- ``shard-N.tar``: WebDataset samples ``<image_id>.png`` (uint8 label map, 255 = unlabelled) + ``<image_id>.json``
  (schemas.fmbseg.LABEL_MAP_META, ``precedence = "car"``);
- ``shard-N.classes.json``: the label value → class name table (``pipeline.fmbseg.pseudo_labels.class_table``);
- ``shard-N.parquet``: LABEL_REGIONS rows, one per (image, class) region (``pixels_stage11/12`` are 0: no Stage-1
  masks are involved);
- ``_rejects/shard-N.parquet``: ``no_confident_query`` when no query passed θ (the recurrence then keeps only its
  best query, as the official code; a label source should not train on it), ``no_pseudo_label`` when the kept
  queries label no pixel with a foreground class.

Vocabulary: ``[car_labels] vocabulary`` (empty = ``[fmbseg] vocabulary``). A vocabulary whose class 0 is
``background`` (voc21) labels the pixels the background wins 0; without one they stay 255 (unlabelled). Settings:
``[car_labels]`` and ``[car]`` (``crf_image``); background queries equal to a query are left out (see
``pipeline.car.params.car_label_params``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from pseudoseg.models.registry import load_role
from pseudoseg.pipeline.car.params import CaRLabelsParams, CarSettings, car_label_family, car_label_params
from pseudoseg.pipeline.car.recurrent import (
    CaRMethod,
    CarParams,
    clip_cam,
    clip_classifier,
    official_query_name,
)
from pseudoseg.pipeline.core.artifacts import ShardOutput
from pseudoseg.pipeline.core.vocabularies import Vocabulary, load_vocabulary
from pseudoseg.pipeline.eval.metrics import IGNORE
from pseudoseg.pipeline.eval.report import ShortSide
from pseudoseg.pipeline.fmbseg.pseudo_labels import label_map_meta
from pseudoseg.schemas.fmbseg import LABEL_REGIONS
from pseudoseg.tasks.engine.base import (
    ProgressReporter,
    model_settings,
    reject,
    stage_params,
    stage_wrapper,
)
from pseudoseg.tasks.engine.image_errors import ImageErrors
from pseudoseg.tasks.stages.catalog import declare
from pseudoseg.tasks.stages.fmbseg import add_label_map, detect_params, label_maps_output
from pseudoseg.tasks.stages.loop import BatchedImageStage, LoopImage, LoopState

PRECEDENCE = "car"  # LABEL_MAP_META.precedence of CaR maps (FMbSeg's are stage11_first / stage12_first)




@dataclass(kw_only=True)
class CarState(LoopState):
    vocab: Vocabulary
    params: CarParams
    names: list[str]  # the vocabulary's classes, the queries
    first: int  # the first foreground class (1 when class 0 is the background)
    seg: Any  # CaRMethod, or ShortSide around it
    samples: list[dict] = field(default_factory=list)  # the label maps' tar samples


class CarLabelsShard(BatchedImageStage[CarState]):
    """CaR label maps of one ingest shard, byte-format compatible with FmbsegLabelsShard's artifact. One image per
    CaR call, decoded in the loop."""

    stage = "car_labels"
    contract = LABEL_REGIONS
    params_type = CaRLabelsParams

    def model_roles(self) -> tuple[str, ...]:
        return ("cam_clip", "classifier_clip", *(("segmenter",) if self.params.sam else ()))

    def vocabulary(self) -> Vocabulary:
        """``[car_labels] vocabulary``, empty = ``[fmbseg] vocabulary`` (the detection stage's)."""
        return load_vocabulary(self.params.vocabulary or detect_params().vocabulary)

    def car_params(self, vocab: Vocabulary) -> CarParams:
        return car_label_params(self.params, vocab.name, stage_params(CarSettings))

    def content_params(self) -> dict[str, Any]:
        """Beside the settings: the vocabulary labelled (``[fmbseg]``'s when ours is empty) and the CaR
        configuration it resolves to (the official preset of pipeline.car.recurrent.CAR_DEFAULTS + settings)."""
        vocab = self.vocabulary()
        return {**super().content_params(), "vocabulary": {"name": vocab.name, "digest": vocab.digest},
                "car": dataclasses.asdict(self.car_params(vocab))}

    def segmenter(self, vocab: Vocabulary):
        cfg, settings = self.params, model_settings()
        sam = load_role("segmenter", settings) if cfg.sam else None
        family = car_label_family(cfg, vocab.name)
        # the official code's query text where it has one, else the vocabulary's (first) prompt name
        query_of = {c: official_query_name(family, c, p[0] if p else c)
                    for c, p in zip(vocab.classes, vocab.prompts, strict=True)}
        params = self.car_params(vocab)
        classifier = load_role("classifier_clip", settings)
        seg = CaRMethod(clip_cam(load_role("cam_clip", settings), method=params.cam, lam=params.lam),
                           clip_classifier(classifier, params.classifier_templates,
                                           skip_last_block=params.classifier_skip_last_block),
                           params, sam=sam, query_names=partial(_query_name, query_of))
        return ShortSide(seg, cfg.short_side) if cfg.short_side > 0 else seg

    def prepare(self) -> CarState:
        vocab = self.vocabulary()
        names = list(vocab.classes)
        has_bg = bool(names) and names[0].lower() == "background"
        seg, sources = self.segmenter(vocab), self.sources()
        return CarState(sources=sources, in_count=len(sources), total=len(sources), vocab=vocab,
                        params=self.car_params(vocab), names=names, first=1 if has_bg else 0, seg=seg)

    def loop_images(self, state: CarState, errors: ImageErrors, progress: ProgressReporter) -> Iterator[LoopImage]:
        """The shard's images, decoded in the loop."""
        for i, (image_id, rgb, _meta) in enumerate(self.ingested(errors)):
            progress.step(i)
            yield LoopImage(image_id, rgb)

    def run_batch(self, state: CarState, images: list[LoopImage]) -> list[tuple[Any, Any]]:
        return [state.seg.segment(image.rgb, state.names, image_id=image.image_id) for image in images]

    def finish_image(self, state: CarState, image: LoopImage, segmented: tuple[Any, Any]) -> None:
        image_id, source, (label, scores), first = image.image_id, state.sources[image.image_id], segmented, state.first
        # CaR never empties its query set (the best one stays); as a label source, an image where no query
        # ever passed θ is not trusted.
        if not (np.asarray(scores)[first:] > state.params.theta).any():
            state.rejects.append(reject(image_id, source, self.stage, "no_confident_query",
                                        f"no query of {len(state.names) - first} passed θ = {state.params.theta}"))
            return
        label = np.asarray(label, np.uint8)
        fg = (label != IGNORE) & (label >= first)
        if not fg.any():
            state.rejects.append(reject(image_id, source, self.stage, "no_pseudo_label",
                                        "the kept queries label no pixel"))
            return
        add_label_map(state.samples, state.rows, image_id, state.vocab, label,
                      label_map_meta(image_id, state.vocab, label, PRECEDENCE), np.zeros(label.shape, np.uint8))

    def shard_output(self, state: CarState) -> ShardOutput:
        return label_maps_output(self, state.vocab, state.rows, state.rejects, state.in_count, state.samples)


def _query_name(query_of: dict[str, str], name: str) -> str:
    return query_of.get(name, name)


CarLabels = declare(stage_wrapper(CarLabelsShard, "All shards of the CaR pseudo-label artifact (same layout as "
                                  "FmbsegLabels)."), makes="CaR: training-free label maps, a third label source",
                    counts="images", rows_are="regions", contract=LABEL_REGIONS, full_dag=True)
