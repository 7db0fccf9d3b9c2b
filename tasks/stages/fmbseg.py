"""FMbSeg Stage 1 pseudo labels (fmbseg-paper §3.2), one Luigi task per shard and stage:

IngestShard → FmbsegDenseShard → FmbsegDetectShard → FmbsegQueryMasksShard (1.1) ┐
                                           └→ FmbsegAutoMasksShard  (1.2) ┴→ FmbsegLabelsShard

What is computed once and shared:
- CLIP runs once per image (FmbsegDenseShard); the stitched dense grid and per-crop CLS tokens are stored (float16)
  and read by detection, Stage 1.1 and Stage 1.2. The vocabulary's text embeddings are computed once per shard by
  FmbsegDetectShard and stored beside its rows (``shard-N.text.npy``), so Stage 1.1/1.2 never load CLIP.
- SAM: the image encoder runs once per image in ``SamEmbeddingsShard`` (tasks/stages/sam.py); Stage 1.1 decodes every detected
  class's prompt from that stored embedding in one batched call, and Stage 1.2 hands it to segment-anything's
  ``SamAutomaticMaskGenerator`` (whose whole-image crop then skips encoding). The USE branch's box masks read the
  same embedding. ``[sam_embeddings] share = false`` makes each stage encode on its own instead.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from pseudoseg.models.registry import load_role
from pseudoseg.models.roles import ClipEncoder, SamImageEmbedding, Segmenter
from pseudoseg.pipeline.core.artifacts import ShardOutput, webdataset_tar_bytes
from pseudoseg.pipeline.core.images import encode_label_png
from pseudoseg.pipeline.core.masks import decode_rle, row_rle
from pseudoseg.pipeline.core.npy import npy_bytes
from pseudoseg.pipeline.core.overlap import Outcome, packed_batches
from pseudoseg.pipeline.core.vocabularies import Vocabulary, load_templates, load_vocabulary
from pseudoseg.pipeline.fmbseg.params import (
    FmbsegAutoMasksParams,
    FmbsegDenseParams,
    FmbsegDetectParams,
    FmbsegLabelsParams,
    FmbsegQueryMasksParams,
)
from pseudoseg.pipeline.fmbseg.pseudo_labels import (
    STAGE_11,
    STAGE_12,
    DecodedQueries,
    DenseCrops,
    PseudoMask,
    class_table,
    class_text_embeddings,
    decode_query_points,
    dense_crops,
    dense_sample,
    detect_classes,
    detection_rows,
    finish_query_points,
    iter_dense_features,
    join_features,
    label_auto_masks,
    label_map_meta,
    label_region_rows,
    load_image_labels,
    mask_rows,
    merge_label_map,
    stitch_dense,
)
from pseudoseg.schemas import MANIFEST
from pseudoseg.schemas.fmbseg import DENSE_FEATURES, DETECTIONS, LABEL_MAP_META, LABEL_REGIONS, PSEUDO_MASKS
from pseudoseg.tasks.engine.base import (
    ProgressReporter,
    ShardTask,
    group_by_image,
    model_settings,
    reject,
    stage_params,
    stage_wrapper,
)
from pseudoseg.tasks.engine.image_errors import REJECTED, ImageErrors, is_per_image_error
from pseudoseg.tasks.engine.throughput import decoded_images, read_ahead
from pseudoseg.tasks.stages.catalog import declare
from pseudoseg.tasks.stages.chained import ChainedShardTask
from pseudoseg.tasks.stages.loop import BatchedImageStage, LoopImage, LoopState
from pseudoseg.tasks.stages.sam import SamEmbedder, UsesSamEmbeddings


def detect_params() -> FmbsegDetectParams:
    """The detection stage's settings (``[fmbseg] vocabulary``, ``templates``, ...) for readers outside this
    branch: the class text embeddings and CaR labels default to the same vocabulary and templates."""
    return stage_params(FmbsegDetectParams)


class FmbsegShardTask(ChainedShardTask):
    """An FMbSeg stage over one shard; adds readers of the dense-feature and detection payloads."""

    def dense(self):
        return iter_dense_features(self.path("dense", "tar"))

    def text(self) -> np.ndarray:
        return np.load(self.path("detect", "text.npy"), allow_pickle=False)


@dataclass(kw_only=True)
class DenseState(LoopState):
    clip: ClipEncoder


class FmbsegDenseShard(FmbsegShardTask, BatchedImageStage[DenseState]):
    """Sliding-window MaskCLIP features per image: stitched dense grid + one CLS per crop (float16 .npy).

    Images decoded, resized and cut into crops ahead (``[throughput]``); the crops of consecutive images packed into
    ``[fmbseg] clip_batch_size`` per CLIP forward (``packed_batches``); stitching and float16 serialisation behind
    the loop. Tar members, rows and rejects in manifest order."""

    stage = "fmbseg_dense"
    contract, writes_tar, works_behind, sort_rejects = DENSE_FEATURES, True, True, True
    params_type, roles = FmbsegDenseParams, ("fmbseg_clip",)

    def prepare(self) -> DenseState:
        cfg, sources = self.params, self.sources()
        clip = load_role("fmbseg_clip", model_settings())
        return DenseState(sources=sources, in_count=len(sources), total=len(sources), batch_size=cfg.clip_batch_size,
                          prepare_image=partial(dense_crops, cfg=cfg, image_size=clip.image_size,
                                                patch_size=clip.patch_size), clip=clip)

    def image_input(self, state: DenseState, image: LoopImage) -> LoopImage:
        return LoopImage(image.image_id, None, image.prepared)  # the crops go on, the image is done with

    def results(self, state: DenseState, errors: ImageErrors,
                progress: ProgressReporter) -> Iterator[tuple[LoopImage, tuple[np.ndarray, np.ndarray]]]:
        """Not image batches: the crops of consecutive images packed into batches of crops (``packed_batches``),
        an image's result as soon as all its crops are encoded; a failed batch is redone image by image."""
        for image, outcome in packed_batches(self.crops(state, errors, progress), partial(self.encode, state),
                                             state.batch_size, retry=is_per_image_error):
            encoded = errors.run(image.image_id, outcome.get)
            if encoded is not REJECTED:
                yield image, encoded

    def crops(self, state: DenseState, errors: ImageErrors,
              progress: ProgressReporter) -> Iterator[tuple[LoopImage, np.ndarray]]:
        for image in self.loop_images(state, errors, progress):
            yield image, image.prepared.crops

    @staticmethod
    def encode(state: DenseState, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = state.clip.encode_image(crops)
        return f.patch, f.cls

    def finish_image(self, state: DenseState, image: LoopImage, encoded: tuple) -> None:
        state.submit(image.image_id, self.serialise, image.image_id, image.prepared, encoded)

    @staticmethod
    def serialise(image_id: str, crops: DenseCrops, encoded: tuple) -> tuple[dict, dict] | None:
        """Behind the loop: the stitched features' tar sample and row (None: non-finite features)."""
        features = stitch_dense(crops, *encoded)
        if not (np.isfinite(features.dense).all() and np.isfinite(features.cls).all()):
            return None
        sample, meta = dense_sample(image_id, features)
        DENSE_FEATURES.table([meta])  # the sample's JSON obeys the contract too
        return sample, meta

    def deliver(self, state: DenseState, errors: ImageErrors, image_id: str, outcome: Outcome) -> None:
        errors.write_sample(image_id, outcome, state.tar, state.rows, "nonfinite_features",
                            "CLIP returned NaN/inf features")


class FmbsegDetectShard(FmbsegShardTask):
    """Classes present per image: crop CLS argmax counts (> min_crops), or the image-level labels if configured.
    Also stores the vocabulary's text embeddings (``text.npy``, float32 [K, D]) for the later stages."""

    stage = "fmbseg_detect"
    upstreams = {"dense": FmbsegDenseShard}
    params_type, roles = FmbsegDetectParams, ("fmbseg_clip",)

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        cfg = self.params
        vocab = load_vocabulary(cfg.vocabulary)
        text = class_text_embeddings(load_role("fmbseg_clip", model_settings()), vocab, load_templates(cfg.templates))
        metas = self.read("dense", DENSE_FEATURES)
        progress.start(len(metas))
        rows, rejects = [], []
        if cfg.image_labels:  # semi-supervised variant: the labels replace detection; features are not read
            self.labelled(progress, vocab, metas, rows, rejects)
        else:
            self.detected_rows(progress, vocab, text, rows, rejects)
        return self.finish(DETECTIONS, rows, rejects, len(metas), text_npy=npy_bytes(text.astype(np.float32)))

    def labelled(self, progress: ProgressReporter, vocab: Vocabulary, metas: list[dict], rows: list[dict],
                 rejects: list[dict]) -> None:
        """The rows of the image-level labels (``[fmbseg] image_labels``) of the images in the vocabulary."""
        labels, sources = load_image_labels(self.params.image_labels), self.sources()
        for i, meta in enumerate(metas):
            progress.step(i)
            image_id = meta["image_id"]
            names = labels.lookup(image_id, sources[image_id])
            known = sorted({k for k in (vocab.index(n) for n in names or []) if k is not None})
            if not known:
                reason = "no_image_labels" if names is None else "no_known_label"
                rejects.append(reject(image_id, sources[image_id], self.stage, reason,
                                      f"labels {names} not in vocabulary {vocab.name}"[:300]))
                continue
            rows.extend(detection_rows(image_id, vocab, None, known, "image_labels"))

    def detected_rows(self, progress: ProgressReporter, vocab: Vocabulary, text: np.ndarray, rows: list[dict],
                      rejects: list[dict]) -> None:
        """The rows of the classes the crops' CLS tokens detect, per image of the dense features."""
        cfg, sources = self.params, self.sources()
        with self.image_errors(rejects) as errors:
            for i, (image_id, features) in enumerate(read_ahead(self.dense())):
                progress.step(i)
                detection = errors.run(image_id, detect_classes, features.cls, text, cfg)
                if detection is REJECTED:
                    continue
                if not detection.present:
                    top = int(detection.counts.argmax())
                    rejects.append(reject(image_id, sources[image_id], self.stage, "no_class_detected",
                                          f"no class won more than {cfg.min_crops} of {len(features.cls)} "
                                          f"crops (best: {vocab.classes[top]} with {int(detection.counts[top])})"))
                    continue
                rows.extend(detection_rows(image_id, vocab, detection, detection.present, "clip"))


@dataclass
class Stage1Input:
    """What Stage 1.1 and 1.2 take of one image beside its pixels."""

    features: Any  # its dense features
    classes: list[int]  # its detected class indices
    embedding: SamImageEmbedding


@dataclass(kw_only=True)
class Stage1State(LoopState):
    cfg: Any  # FmbsegQueryMasksParams | FmbsegAutoMasksParams
    vocab: Vocabulary
    text: np.ndarray
    detections: dict[str, list[dict]]  # by image
    segmenter: Segmenter
    embed: SamEmbedder


class SamStage1Shard(UsesSamEmbeddings, FmbsegShardTask, BatchedImageStage[Stage1State]):
    """What Stage 1.1 and 1.2 share: the images with detected classes, with their dense features and SAM embedding,
    one image per SAM call, the rows made behind the loop; rows and rejects in manifest order."""

    upstreams = {"dense": FmbsegDenseShard, "detect": FmbsegDetectShard}
    contract, works_behind, sort_rejects = PSEUDO_MASKS, True, True

    def prepare(self) -> Stage1State:
        cfg, segmenter = self.params, load_role("segmenter", model_settings())
        detections = group_by_image(self.read("detect", DETECTIONS))
        return Stage1State(sources=self.sources(), in_count=self.count_in(detections), total=len(detections),
                           cfg=cfg, vocab=load_vocabulary(cfg.vocabulary), text=self.text(), detections=detections,
                           segmenter=segmenter, embed=self.sam_embedder(segmenter))

    def count_in(self, detections: dict[str, list[dict]]) -> int:
        """This stage's in_count: its counted items over the images with detections."""
        raise NotImplementedError

    def loop_images(self, state: Stage1State, errors: ImageErrors, progress: ProgressReporter) -> Iterator[LoopImage]:
        """Per image in manifest order, with its dense features, detected classes and SAM embedding; images without
        detections are skipped (rejected upstream), images without an embedding become rejects, so do images whose
        decoding or encoding raised a per-image error (``errors``)."""
        images = decoded_images(errors, self.path("ingest", "tar"))  # decoded ahead, as the features are read
        for i, (image_id, rgb, features) in enumerate(join_features(images, read_ahead(self.dense()))):
            progress.step(i)
            classes = self.detected(state.detections, image_id)
            if not classes:
                continue
            embedding = errors.run(image_id, state.embed, image_id, rgb)
            if embedding is REJECTED:
                continue
            if embedding is None:
                errors.rejects.extend(self.no_embedding_rejects(image_id, self.counted_items(state, image_id)))
                continue
            yield LoopImage(image_id, rgb, data=Stage1Input(features, classes, embedding))

    @staticmethod
    def detected(detections: dict[str, list[dict]], image_id: str) -> list[int]:
        return sorted(r["class_index"] for r in detections.get(image_id, []))


class FmbsegQueryMasksShard(SamStage1Shard):
    """Stage 1.1: per detected class, top-k similar patch centres → one SAM point prompt → best-IoU mask.

    Per image: the prompts decoded and the best-IoU masks thresholded on the device (``decode_query_points``);
    behind the loop on the host: empty-mask checks, RLE and rows. Manifest order."""

    stage = "fmbseg_query_masks"
    params_type, roles = FmbsegQueryMasksParams, ("segmenter",)

    def count_in(self, detections: dict[str, list[dict]]) -> int:
        return sum(len(v) for v in detections.values())

    def counted_items(self, state: Stage1State, image_id: str) -> list[str]:
        return [f"class:{c}" for c in self.detected(state.detections, image_id)]

    def run_batch(self, state: Stage1State, images: list[LoopImage]) -> list[DecodedQueries]:
        return [decode_query_points(state.segmenter, image.data.embedding, image.data.features, state.text,
                                    image.data.classes, state.cfg) for image in images]

    def finish_image(self, state: Stage1State, image: LoopImage, decoded: DecodedQueries) -> None:
        state.submit(image.image_id, self.query_rows, state.vocab, image.image_id, decoded)

    def query_rows(self, vocab: Vocabulary, image_id: str, decoded: DecodedQueries) -> tuple[list[dict], list[dict]]:
        """Behind the loop: the image's mask rows and its empty masks' rejects."""
        kept, image_rejects = [], []
        for m in finish_query_points(decoded):
            if m.area == 0:
                image_rejects.append(reject(image_id, f"class:{m.class_index}", self.stage, "empty_mask",
                                            f"{vocab.classes[m.class_index]}: SAM returned an empty mask"))
            else:
                kept.append(m)
        return mask_rows(image_id, vocab, kept), image_rejects


class FmbsegAutoMasksShard(SamStage1Shard):
    """Stage 1.2: SAM automatic masks within size limits, labelled by their mean dense CLIP feature (detected
    classes only)."""

    stage = "fmbseg_auto_masks"
    params_type, roles = FmbsegAutoMasksParams, ("segmenter",)

    def count_in(self, detections: dict[str, list[dict]]) -> int:
        return len(detections)

    def run_batch(self, state: Stage1State, images: list[LoopImage]) -> list[list[dict]]:
        return [state.segmenter.automatic_masks(image.rgb, embedding=image.data.embedding, **state.cfg.amg())
                for image in images]

    def finish_image(self, state: Stage1State, image: LoopImage, auto: list[dict]) -> None:
        state.submit(image.image_id, self.label, state, image.image_id, auto, image.data)

    def label(self, state: Stage1State, image_id: str, auto: list[dict], data: Stage1Input) -> tuple[list, list]:
        """Behind the loop: size limits, labels by mean dense feature, RLE rows (or the image's reject)."""
        masks = label_auto_masks(auto, data.features, state.text, data.classes, state.cfg)
        if not masks:
            return [], [reject(image_id, state.sources[image_id], self.stage, "no_auto_mask",
                               f"{len(auto)} automatic masks, none within the size limits")]
        return mask_rows(image_id, state.vocab, masks), []


def _pseudo_mask(row: dict[str, Any]) -> PseudoMask:
    mask = decode_rle(row_rle(row))
    return PseudoMask(stage=row["stage"], class_index=row["class_index"], mask=mask, score=row["score"],
                      similarity=row["similarity"], points_xy=np.asarray(row["points_xy"], np.float64).reshape(-1, 2),
                      multimask_index=row["multimask_index"], stability=row["stability"])


class FmbsegLabelsShard(FmbsegShardTask):
    """Merge: one label map per image (PNG, 255 = unlabelled) + JSON, the class table (``classes.json``) and one
    Parquet row per (image, class) region (RLE)."""

    stage = "fmbseg_labels"
    uses_model = False
    params_type = FmbsegLabelsParams

    @property
    def upstreams(self) -> dict[str, type[ShardTask]]:  # type: ignore[override]
        cfg = self.params
        ups: dict[str, type[ShardTask]] = {"detect": FmbsegDetectShard}
        if cfg.stage11:
            ups["query"] = FmbsegQueryMasksShard
        if cfg.stage12:
            ups["auto"] = FmbsegAutoMasksShard
        return ups

    def content_params(self) -> dict[str, Any]:
        if not (self.params.stage11 or self.params.stage12):
            raise ValueError("[fmbseg] stage11 and stage12 are both off: nothing to merge")
        return super().content_params()

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        vocab = load_vocabulary(self.params.vocabulary)
        detections = group_by_image(self.read("detect", DETECTIONS))
        masks = self.stage1_masks()
        entries = [r for r in self.read("ingest", MANIFEST) if r["image_id"] in detections]
        progress.start(len(detections))
        samples, rows, rejects = [], [], []
        with self.image_errors(rejects) as errors:
            for i, entry in enumerate(entries):
                progress.step(i)
                merged = errors.run(entry["image_id"], self.merge, entry, masks.get(entry["image_id"], []), vocab)
                if merged is not REJECTED:
                    self.add_merged(entry, merged, vocab, samples, rows, rejects)
        return label_maps_output(self, vocab, rows, rejects, len(detections), samples)

    def stage1_masks(self) -> dict[str, list[dict]]:
        """The Stage 1.1 and 1.2 mask rows (those merged), by image."""
        masks: dict[str, list[dict]] = defaultdict(list)
        for name in ("query", "auto"):
            if name in self.requires():
                for row in self.read(name, PSEUDO_MASKS):
                    masks[row["image_id"]].append(row)
        return masks

    def merge(self, entry: dict[str, Any], rows: list[dict],
              vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(label map, the Stage each pixel came from, the map's meta) of one image's masks."""
        cfg = self.params
        image_masks = sorted(rows, key=_merge_order)
        label, source = merge_label_map((entry["height"], entry["width"]), [_pseudo_mask(r) for r in image_masks], cfg)
        return label, source, label_map_meta(entry["image_id"], vocab, label, cfg.precedence)

    def add_merged(self, entry: dict[str, Any], merged: tuple[np.ndarray, np.ndarray, dict[str, Any]],
                   vocab: Vocabulary, samples: list[dict], rows: list[dict], rejects: list[dict]) -> None:
        """One image's label map and rows, or its reject when no pixel is labelled."""
        cfg, (label, source, meta) = self.params, merged
        if meta["labelled_pixels"] == 0:
            stages = "/".join(s for s, on in ((STAGE_11, cfg.stage11), (STAGE_12, cfg.stage12)) if on)
            rejects.append(reject(entry["image_id"], entry["source"], self.stage, "no_pseudo_label",
                                  f"no Stage {stages} mask for the detected classes"))
            return
        add_label_map(samples, rows, entry["image_id"], vocab, label, meta, source)


def _merge_order(row: dict[str, Any]) -> tuple[bool, int]:
    """Stage 1.1 masks first, then by mask index."""
    return row["stage"] != STAGE_11, row["mask_index"]


def add_label_map(samples: list[dict], rows: list[dict], image_id: str, vocab: Vocabulary, label: np.ndarray,
                  meta: dict[str, Any], source: np.ndarray) -> None:
    """One label map's tar sample (the PNG and its JSON meta, checked against LABEL_MAP_META) and its region rows
    (``source``: the Stage each pixel came from)."""
    LABEL_MAP_META.table([meta])
    samples.append({"__key__": image_id, "png": encode_label_png(label),
                    "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()})
    rows.extend(label_region_rows(image_id, vocab, label, source))


def label_maps_output(task: ChainedShardTask, vocab: Vocabulary, rows: list[dict], rejects: list[dict],
                      in_count: int, samples: list[dict]) -> ShardOutput:
    """A label-map artifact's shard: rows, rejects, the maps' tar and the class table (``classes.json``)."""
    table = (json.dumps(class_table(vocab), sort_keys=True, indent=1) + "\n").encode()
    return task.finish(LABEL_REGIONS, rows, rejects, in_count, tar=webdataset_tar_bytes(samples),
                       classes_json=table)


FmbsegDense = declare(stage_wrapper(FmbsegDenseShard), makes="FMbSeg: sliding-window MaskCLIP features",
                      counts="images", rows_are="images", contract=DENSE_FEATURES)
FmbsegDetect = declare(stage_wrapper(FmbsegDetectShard),
                       makes="FMbSeg: classes present (crop votes) or image-level labels",
                       counts="images", rows_are="detections", contract=DETECTIONS)
FmbsegQueryMasks = declare(stage_wrapper(FmbsegQueryMasksShard), makes="FMbSeg Stage 1.1: top-5 patches per class -> SAM",
                           counts="detections", rows_are="masks", contract=PSEUDO_MASKS)
FmbsegAutoMasks = declare(stage_wrapper(FmbsegAutoMasksShard),
                          makes="FMbSeg Stage 1.2: SAM automatic masks labelled by dense CLIP",
                          counts="images", rows_are="masks", contract=PSEUDO_MASKS)
FmbsegLabels = declare(stage_wrapper(
    FmbsegLabelsShard, "All shards of the FMbSeg Stage-1 branch's final artifact (merged pseudo-label maps)."),
    makes="FMbSeg: Stage 1.1 + 1.2 merged into one label map per image", counts="images", rows_are="regions",
    contract=LABEL_REGIONS, full_dag=True)

