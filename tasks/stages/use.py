"""USE segment–text pairs (use-paper §3.1), one Luigi task per shard and stage:

IngestShard → UseCaptionsShard → UseExpressionsShard → UseBoxesShard → UseBoxMasksShard → UseSegmentsShard

Each task reads its inputs, calls pipeline/ (and a model role from models/), and writes through schemas/.
"""

from __future__ import annotations

import dataclasses
import functools
import posixpath
from collections import defaultdict
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from pseudoseg.models.registry import load_role, load_spacy
from pseudoseg.models.roles import Captioner, Grounder, Sampling, Segmenter
from pseudoseg.pipeline.core.artifacts import ShardOutput
from pseudoseg.pipeline.core.sources import relative_name
from pseudoseg.pipeline.use.captions import (
    AMBIGUOUS_CAPTION_MATCH,
    GTCaptions,
    load_gt_captions,
    name_index,
    norm_key,
)
from pseudoseg.pipeline.use.gt_boxes import AMBIGUOUS_BOX_MATCH, BAD_REGION, load_gt_boxes, region_rows
from pseudoseg.pipeline.use.pairs import (
    CaptionQuery,
    DecodedBoxes,
    box_mask_row,
    box_row,
    caption_rows,
    caption_sentence_spans,
    decode_boxes,
    expression_rows,
    finish_box_masks,
    ground_captions,
    merge_segments,
)
from pseudoseg.pipeline.use.params import (
    UseBoxesParams,
    UseBoxMasksParams,
    UseCaptionsParams,
    UseExpressionsParams,
    UseGtBoxesParams,
    UseSegmentsParams,
)
from pseudoseg.schemas import BOX_MASKS, BOXES, CAPTIONS, EXPRESSIONS, MANIFEST, SEGMENTS
from pseudoseg.tasks.engine.base import (
    ProgressReporter,
    cached_listing,
    group_by_image,
    model_settings,
    reject,
    stage_params,
    stage_wrapper,
)
from pseudoseg.tasks.stages.catalog import declare
from pseudoseg.tasks.stages.chained import ChainedShardTask
from pseudoseg.tasks.stages.loop import BatchedImageStage, LoopImage, LoopState
from pseudoseg.tasks.stages.sam import SamEmbedder, UsesSamEmbeddings


@functools.lru_cache(maxsize=4)
def dataset_names(images: str, fingerprint: str) -> tuple[dict[str, int], dict[str, list[str]]]:
    """``name_index`` over every input the dataset's source lists (once per listing and process)."""
    return name_index(relative_name(images, e) for e in cached_listing(images).entries)


@dataclass(kw_only=True)
class CaptionsState(LoopState):
    cfg: UseCaptionsParams
    captioner: Captioner | None
    gt: GTCaptions | None  # with the dataset's names to match them by
    names: tuple[dict[str, int], dict[str, list[str]]] | None


class UseCaptionsShard(BatchedImageStage[CaptionsState]):
    """Ground-truth captions (if configured) + MLLM captions with the paper's prompt, both tagged by source."""

    stage = "use_captions"
    contract = CAPTIONS

    params_type = UseCaptionsParams

    def model_roles(self) -> tuple[str, ...]:
        return ("captioner",) if self.params.generate_captions else ()

    @property
    def uses_model(self) -> bool:  # type: ignore[override]
        return self.params.generate_captions

    def prepare(self) -> CaptionsState:
        cfg = self.params
        manifest = self.read("ingest", MANIFEST)
        gt, names = None, None
        if cfg.gt_captions:  # the content this stage was hashed with, or one line (CaptionFileChanged)
            gt = load_gt_captions(cfg.gt_captions, expect=self.stage_dir.params["params"]["gt_captions"])
            names = dataset_names(self.images, self.listing.fingerprint)
        captioner = load_role("captioner", model_settings()) if cfg.generate_captions else None
        return CaptionsState(sources={r["image_id"]: r["source"] for r in manifest}, in_count=len(manifest),
                             total=len(manifest), batch_size=cfg.caption_batch_size, cfg=cfg, captioner=captioner,
                             gt=gt, names=names)

    def run_batch(self, state: CaptionsState, images: list[LoopImage]) -> list[str]:
        if state.captioner is None:
            return [""] * len(images)
        # Seed per batch from the first image id, so a shard's captions do not depend on which batches came
        # before it (reruns of one shard reproduce it). A batch redone image by image (one image failed) seeds
        # each from its own id.
        cfg = state.cfg
        seed = cfg.seed + int(images[0].image_id[:8], 16)
        sampling = Sampling(cfg.caption_max_new_tokens, cfg.caption_temperature, cfg.caption_top_p,
                            cfg.caption_top_k, seed)
        return state.captioner.caption([image.rgb for image in images], cfg.caption_prompt, sampling)

    def finish_image(self, state: CaptionsState, image: LoopImage, text: str) -> None:
        image_id, source = image.image_id, state.sources[image.image_id]
        gt_caps: list[str] = []
        if state.gt is not None:
            found = state.gt.match(image_id, source, relative_name(self.images, source), *state.names)
            if found.ambiguous:  # a caption that may be another image's: none, and a row saying why
                state.rejects.append(reject(image_id, source, self.stage, AMBIGUOUS_CAPTION_MATCH, found.ambiguous))
                return
            gt_caps = found.captions
        gen = [text] if text.strip() else []
        image_rows = caption_rows(image_id, gt_caps, gen, state.captioner.source if state.captioner else "")
        if image_rows:
            state.rows.extend(image_rows)
        else:
            state.rejects.append(reject(image_id, source, self.stage, "no_caption",
                                        "no ground-truth caption and no generated text"))


class UseExpressionsShard(ChainedShardTask):
    """spaCy noun chunks expanded to referring expressions, per caption."""

    stage = "use_expressions"
    upstreams = {"captions": UseCaptionsShard}
    uses_model = False

    params_type = UseExpressionsParams

    def content_params(self) -> dict[str, Any]:
        import spacy

        return {**super().content_params(), "spacy": spacy.__version__}

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        cfg = self.params
        nlp = load_spacy(cfg.spacy_model)
        captions = self.read("captions", CAPTIONS)
        progress.start(len(captions))
        rows, rejects = [], []
        for i, caption in enumerate(captions):
            progress.step(i)
            found = expression_rows(caption, nlp, cfg)
            if found:
                rows.extend(found)
            else:
                rejects.append(reject(caption["image_id"], f"caption:{caption['caption_index']}", self.stage,
                                      "no_noun_phrase", caption["caption"][:200]))
        return self.finish(EXPRESSIONS, rows, rejects, in_count=len(captions))


Query = tuple[dict, list[dict], CaptionQuery]  # a caption, its expressions (phrase order), the grounder's query


@dataclass(kw_only=True)
class BoxesState(LoopState):
    cfg: UseBoxesParams
    nlp: Any
    grounder: Grounder
    captions: dict[str, list[dict]]  # by image
    expressions: dict[str, list[dict]]  # by image


class UseBoxesShard(BatchedImageStage[BoxesState]):
    """Grounding DINO queried with the whole caption; each box goes to the phrase holding its best token.

    Images decoded and resized ahead (``[throughput]``); the captions of consecutive images are grounded together,
    ``[use] grounder_batch_size`` per forward, each image encoded once (``ground_captions``)."""

    stage = "use_boxes"
    upstreams = {"captions": UseCaptionsShard, "expressions": UseExpressionsShard}
    contract, sort_rejects = BOXES, True

    params_type, roles = UseBoxesParams, ("grounder",)

    def prepare(self) -> BoxesState:
        cfg, grounder = self.params, load_role("grounder", model_settings())
        expressions = group_by_image(self.read("expressions", EXPRESSIONS))
        in_count = sum(len({r["caption_index"] for r in rows}) for rows in expressions.values())
        return BoxesState(sources=self.sources(), in_count=in_count, total=len(expressions),
                          batch_size=cfg.grounder_batch_size, prepare_image=grounder.prepare, cfg=cfg,
                          nlp=load_spacy(cfg.spacy_model), grounder=grounder,
                          captions=group_by_image(self.read("captions", CAPTIONS)), expressions=expressions)

    def counted_items(self, state: BoxesState, image_id: str) -> list[str]:
        """What in_count counts: the image's captions with expressions."""
        return [f"caption:{c}" for c in sorted({r["caption_index"] for r in state.expressions.get(image_id, [])})]

    def image_input(self, state: BoxesState, image: LoopImage) -> LoopImage | None:
        if not self.counted_items(state, image.image_id):
            return None
        image.data = self.image_queries(state, image.image_id)
        return image

    def image_queries(self, state: BoxesState, image_id: str) -> list[Query]:
        by_caption: dict[int, list[dict]] = defaultdict(list)
        for expr in state.expressions.get(image_id, []):
            by_caption[expr["caption_index"]].append(expr)
        found = []
        for caption in state.captions.get(image_id, []):
            exprs = sorted(by_caption.get(caption["caption_index"], []), key=itemgetter("phrase_index"))
            if not exprs:
                continue  # rejected upstream (no noun phrase)
            text = caption["caption"]
            # sentences matter only for a caption past the grounder's text limit (windows of sentences)
            long = state.grounder.count_tokens(text) > state.grounder.max_text_tokens
            sentences = tuple(caption_sentence_spans(text, state.nlp)) if long else None
            phrases = tuple((e["phrase_start"], e["phrase_end"]) for e in exprs)
            found.append((caption, exprs, CaptionQuery(0, text, phrases, sentences)))
        return found

    def batch_full(self, state: BoxesState, batch: list[LoopImage]) -> bool:
        return sum(len(image.data) for image in batch) >= state.batch_size

    def run_batch(self, state: BoxesState, images: list[LoopImage]) -> list[list[tuple[dict, list[dict], list]]]:
        queries = [dataclasses.replace(q, image=k) for k, image in enumerate(images) for _, _, q in image.data]
        boxes = iter(ground_captions(state.grounder, [image.rgb for image in images], queries, state.cfg,
                                     prepared=[image.prepared for image in images]))
        return [[(caption, exprs, next(boxes)) for caption, exprs, _ in image.data] for image in images]

    def finish_image(self, state: BoxesState, image: LoopImage, grounded: list[tuple[dict, list[dict], list]]) -> None:
        box_index = 0
        for caption, exprs, boxes in grounded:
            if not boxes:
                state.rejects.append(reject(image.image_id, f"caption:{caption['caption_index']}", self.stage,
                                            "no_box", "no box matched a noun phrase of the caption"))
                continue
            for box in boxes:
                state.rows.append(box_row(exprs[box.phrase_index], box, box_index))
                box_index += 1


class UseGtBoxesShard(ChainedShardTask):
    """Human box-text pairs (``[use] gt_boxes``: Visual Genome's region descriptions, or a Parquet) of this shard's
    images as boxes, mapped onto the stored images; ``UseBoxMasks`` turns them into masks beside the caption-grounded
    boxes (use-paper §4.1). Counts regions: in = the regions bound to the shard's images."""

    stage = "use_gt_boxes"
    params_type = UseGtBoxesParams
    uses_model = False

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        cfg = self.params
        gt = load_gt_boxes(cfg.gt_boxes, expect=self.stage_dir.params["params"]["gt_boxes"])
        names = dataset_names(self.images, self.listing.fingerprint)
        manifest = self.read("ingest", MANIFEST)
        progress.start(len(manifest))
        rows, rejects, in_count = [], [], 0
        for i, entry in enumerate(manifest):
            progress.step(i)
            image_id, source = entry["image_id"], entry["source"]
            found = gt.match(image_id, source, relative_name(self.images, source), *names)
            if found.ambiguous:  # regions that may be another image's: none, and a row per region saying why
                matched = gt.by_name.get(posixpath.basename(norm_key(relative_name(self.images, source))), [])
                in_count += len(matched)
                rejects += [reject(image_id, f"region:{k}", self.stage, AMBIGUOUS_BOX_MATCH, found.ambiguous)
                            for k in range(len(matched))]
                continue
            in_count += len(found.items)
            image_rows, refused = region_rows(image_id, found.items, (entry["orig_height"], entry["orig_width"]),
                                              (entry["height"], entry["width"]))
            rows += image_rows
            rejects += [reject(image_id, f"region:{k}", self.stage, BAD_REGION, why) for k, why in refused]
        return self.finish(BOXES, rows, rejects, in_count=in_count)


@dataclass(kw_only=True)
class BoxMasksState(LoopState):
    cfg: UseBoxMasksParams
    segmenter: Segmenter
    boxes: dict[str, list[dict]]  # by image
    embed: SamEmbedder


class UseBoxMasksShard(UsesSamEmbeddings, BatchedImageStage[BoxMasksState]):
    """SAM box → mask: one image encoding per image (the shared one, see tasks/stages/sam.py), all its boxes in one
    batched decoder call.

    Per image (decoded ahead, ``[throughput]``): its stored embedding, one batched decoder call, the stability choice
    and threshold on the device (``decode_boxes``); behind the loop, on the host: the decisions, cleanup, RLE and
    rows (``finish_box_masks``). Rows and rejects in manifest and box order."""

    stage = "use_box_masks"
    upstreams = {"boxes": UseBoxesShard}
    contract, works_behind, sort_rejects = BOX_MASKS, True, True

    params_type, roles = UseBoxMasksParams, ("segmenter",)

    def requires(self) -> dict[str, Any]:
        """The caption-grounded boxes, and the human ones when ``[use] gt_boxes`` names a file."""
        deps = super().requires()
        if stage_params(UseGtBoxesParams).gt_boxes:
            deps["gt_boxes"] = UseGtBoxesShard(shard=self.shard, **self.common())
        return deps

    def prepare(self) -> BoxMasksState:
        segmenter = load_role("segmenter", model_settings())
        boxes = group_by_image(self.read("boxes", BOXES) +
                               (self.read("gt_boxes", BOXES) if "gt_boxes" in self.requires() else []))
        return BoxMasksState(sources=self.sources(), in_count=sum(len(v) for v in boxes.values()), total=len(boxes),
                             cfg=self.params, segmenter=segmenter, boxes=boxes, embed=self.sam_embedder(segmenter))

    def image_boxes(self, state: BoxMasksState, image_id: str) -> list[dict]:
        return sorted(state.boxes.get(image_id, []), key=itemgetter("box_index"))

    def counted_items(self, state: BoxMasksState, image_id: str) -> list[str]:
        """What in_count counts: the image's boxes."""
        return [f"box:{b['box_index']}" for b in self.image_boxes(state, image_id)]

    def image_input(self, state: BoxMasksState, image: LoopImage) -> LoopImage | None:
        image.data = self.image_boxes(state, image.image_id)
        return image if image.data else None

    def run_batch(self, state: BoxMasksState, images: list[LoopImage]) -> list[DecodedBoxes | None]:
        return [self.decode(state, image) for image in images]

    def decode(self, state: BoxMasksState, image: LoopImage) -> DecodedBoxes | None:
        embedding = state.embed(image.image_id, image.rgb)
        if embedding is None:
            return None
        return decode_boxes(state.segmenter, image.rgb.shape[:2],
                            np.asarray([b["box_xyxy"] for b in image.data], np.float32), state.cfg,
                            embedding=embedding)

    def finish_image(self, state: BoxMasksState, image: LoopImage, decoded: DecodedBoxes | None) -> None:
        if decoded is None:
            state.rejects.extend(self.no_embedding_rejects(image.image_id, self.counted_items(state, image.image_id)))
        else:
            state.submit(image.image_id, self.mask_rows, image.image_id, image.data, decoded, state.cfg)

    def mask_rows(self, image_id: str, these: list[dict], decoded: DecodedBoxes,
                  cfg: UseBoxMasksParams) -> tuple[list[dict], list[dict]]:
        """Behind the loop: the image's rows and rejects."""
        results = finish_box_masks(decoded, cfg)
        image_rows, image_rejects = [], []
        for box, result in zip(these, results, strict=True):
            if result.reject_reason is not None:
                image_rejects.append(reject(image_id, f"box:{box['box_index']}", self.stage, result.reject_reason,
                                            f"predicted_iou={result.predicted_iou:.3f} "
                                            f"stability={result.stability:.3f}"))
                continue
            image_rows.append(box_mask_row(image_id, box["box_index"], box["box_xyxy"], result, [box]))
        return image_rows, image_rejects


class UseSegmentsShard(ChainedShardTask):
    """Mask NMS per image; every suppressed mask's texts merge into the kept mask's list."""

    stage = "use_segments"
    upstreams = {"box_masks": UseBoxMasksShard}
    uses_model = False

    params_type = UseSegmentsParams

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        masks = group_by_image(self.read("box_masks", BOX_MASKS))
        progress.start(len(masks))
        rows = []
        for i, image_id in enumerate(sorted(masks)):
            progress.step(i)
            rows.extend(merge_segments(masks[image_id], self.params))
        return self.finish(SEGMENTS, rows, [], in_count=sum(len(v) for v in masks.values()))


UseCaptions = declare(stage_wrapper(UseCaptionsShard), makes="USE: ground-truth and MLLM captions",
                      counts="images", rows_are="captions", contract=CAPTIONS)
UseExpressions = declare(stage_wrapper(UseExpressionsShard),
                         makes="USE: spaCy noun phrases expanded to referring expressions",
                         counts="captions", rows_are="expressions", contract=EXPRESSIONS)
UseBoxes = declare(stage_wrapper(UseBoxesShard),
                   makes="USE: Grounding DINO boxes, each matched to the phrase of its best token",
                   counts="captions", rows_are="boxes", contract=BOXES)
UseGtBoxes = declare(stage_wrapper(UseGtBoxesShard),
                     makes="USE: human box-text pairs ([use] gt_boxes: Visual Genome regions) as boxes for SAM",
                     counts="regions", rows_are="boxes", contract=BOXES)
UseBoxMasks = declare(stage_wrapper(UseBoxMasksShard), makes="USE: SAM box -> mask, best stability, cleanup, "
                      "whole-image rule", counts="boxes", rows_are="masks", contract=BOX_MASKS)
UseSegments = declare(stage_wrapper(UseSegmentsShard, "All shards of the USE branch's final artifact (segment–text "
                                    "pairs)."), makes="USE: mask NMS merging texts: the segment-text pairs",
                      counts="masks", rows_are="segments", contract=SEGMENTS, full_dag=True)
