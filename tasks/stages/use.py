"""USE segment–text pairs (use-paper §3.1), one Luigi task per shard and stage:

IngestShard → UseCaptionsShard → UseExpressionsShard → UseBoxesShard → UseBoxMasksShard → UseSegmentsShard

Each task reads its inputs, calls pipeline/ (and a model role from models/), and writes through schemas/.
"""

from __future__ import annotations

import dataclasses
import functools
import posixpath
from collections import defaultdict
from typing import Any

import numpy as np

from pseudoseg.models.registry import load_role, load_spacy
from pseudoseg.models.roles import Sampling
from pseudoseg.pipeline.core.artifacts import ShardOutput
from pseudoseg.pipeline.core.overlap import Outcome
from pseudoseg.pipeline.core.sources import relative_name
from pseudoseg.pipeline.use.captions import AMBIGUOUS_CAPTION_MATCH, load_gt_captions, name_index, norm_key
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
from pseudoseg.tasks.engine.image_errors import REJECTED
from pseudoseg.tasks.engine.throughput import behind, manifest_order
from pseudoseg.tasks.stages.catalog import declare
from pseudoseg.tasks.stages.chained import ChainedShardTask
from pseudoseg.tasks.stages.sam import UsesSamEmbeddings


@functools.lru_cache(maxsize=4)
def dataset_names(images: str, fingerprint: str) -> tuple[dict[str, int], dict[str, list[str]]]:
    """``name_index`` over every input the dataset's source lists (once per listing and process)."""
    return name_index(relative_name(images, e) for e in cached_listing(images).entries)


class UseCaptionsShard(ChainedShardTask):
    """Ground-truth captions (if configured) + MLLM captions with the paper's prompt, both tagged by source."""

    stage = "use_captions"

    params_type = UseCaptionsParams

    def model_roles(self) -> tuple[str, ...]:
        return ("captioner",) if self.params.generate_captions else ()

    @property
    def uses_model(self) -> bool:  # type: ignore[override]
        return self.params.generate_captions

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        cfg = self.params
        manifest = self.read("ingest", MANIFEST)
        gt, names = None, None
        if cfg.gt_captions:  # the content this stage was hashed with, or one line (CaptionFileChanged)
            gt = load_gt_captions(cfg.gt_captions, expect=self.stage_dir.params["params"]["gt_captions"])
            names = dataset_names(self.images, self.listing.fingerprint)
        captioner = load_role("captioner", model_settings()) if cfg.generate_captions else None
        progress.start(len(manifest))
        rows, rejects = [], []
        batch: list[tuple[str, np.ndarray]] = []
        sources = {r["image_id"]: r["source"] for r in manifest}

        def caption(items: list[tuple[str, np.ndarray]]) -> list[str]:
            if captioner is None:
                return [""] * len(items)
            # Seed per batch from the first image id, so a shard's captions do not depend on which batches came
            # before it (reruns of one shard reproduce it). A batch redone image by image (one image failed) seeds
            # each from its own id.
            seed = cfg.seed + int(items[0][0][:8], 16)
            sampling = Sampling(cfg.caption_max_new_tokens, cfg.caption_temperature, cfg.caption_top_p,
                                cfg.caption_top_k, seed)
            return captioner.caption([img for _, img in items], cfg.caption_prompt, sampling)

        def flush() -> None:
            if not batch:
                return
            generated = errors.run_batch([image_id for image_id, _ in batch], lambda: caption(batch),
                                         lambda k: caption([batch[k]])[0])
            for (image_id, _), text in zip(batch, generated, strict=True):
                if text is REJECTED:
                    continue
                gt_caps: list[str] = []
                if gt is not None:
                    source = sources[image_id]
                    found = gt.match(image_id, source, relative_name(self.images, source), *names)
                    if found.ambiguous:  # a caption that may be another image's: none, and a row saying why
                        rejects.append(reject(image_id, source, self.stage, AMBIGUOUS_CAPTION_MATCH, found.ambiguous))
                        continue
                    gt_caps = found.captions
                gen = [text] if text.strip() else []
                image_rows = caption_rows(image_id, gt_caps, gen, captioner.source if captioner else "")
                if image_rows:
                    rows.extend(image_rows)
                else:
                    rejects.append(reject(image_id, sources[image_id], self.stage, "no_caption",
                                          "no ground-truth caption and no generated text"))
            batch.clear()

        with self.image_errors(rejects) as errors:
            for image_id, rgb, _ in self.decoded(errors, progress):
                batch.append((image_id, rgb))
                if len(batch) >= cfg.caption_batch_size:
                    flush()
            flush()
        return self.finish(CAPTIONS, rows, rejects, in_count=len(manifest))


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


class UseBoxesShard(ChainedShardTask):
    """Grounding DINO queried with the whole caption; each box goes to the phrase holding its best token."""

    stage = "use_boxes"
    upstreams = {"captions": UseCaptionsShard, "expressions": UseExpressionsShard}

    params_type, roles = UseBoxesParams, ("grounder",)

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        """Images decoded and resized ahead (``[throughput]``); the captions of consecutive images are grounded
        together, ``[use] grounder_batch_size`` per forward, each image encoded once (``ground_captions``)."""
        cfg = self.params
        nlp = load_spacy(cfg.spacy_model)
        grounder = load_role("grounder", model_settings())
        captions = group_by_image(self.read("captions", CAPTIONS))
        expressions = group_by_image(self.read("expressions", EXPRESSIONS))
        in_count = sum(len({r["caption_index"] for r in rows}) for rows in expressions.values())
        progress.start(len(expressions))
        rows, rejects = [], []
        pending: list[tuple[str, np.ndarray, Any, list[tuple[dict, list[dict], CaptionQuery]]]] = []

        def units(image_id: str) -> list[str]:  # what in_count counts: the image's captions with expressions
            return [f"caption:{c}" for c in sorted({r["caption_index"] for r in expressions.get(image_id, [])})]

        def image_queries(image_id: str) -> list[tuple[dict, list[dict], CaptionQuery]]:
            by_caption: dict[int, list[dict]] = defaultdict(list)
            for expr in expressions.get(image_id, []):
                by_caption[expr["caption_index"]].append(expr)
            found = []
            for caption in captions.get(image_id, []):
                exprs = sorted(by_caption.get(caption["caption_index"], []), key=lambda r: r["phrase_index"])
                if not exprs:
                    continue  # rejected upstream (no noun phrase)
                text = caption["caption"]
                # sentences matter only for a caption past the grounder's text limit (windows of sentences)
                long = grounder.count_tokens(text) > grounder.max_text_tokens
                sentences = tuple(caption_sentence_spans(text, nlp)) if long else None
                phrases = tuple((e["phrase_start"], e["phrase_end"]) for e in exprs)
                found.append((caption, exprs, CaptionQuery(0, text, phrases, sentences)))
            return found

        def ground(items: list) -> list[list[tuple[dict, list[dict], list]]]:
            queries = [dataclasses.replace(q, image=k) for k, item in enumerate(items) for _, _, q in item[3]]
            boxes = iter(ground_captions(grounder, [item[1] for item in items], queries, cfg,
                                         prepared=[item[2] for item in items]))
            return [[(caption, exprs, next(boxes)) for caption, exprs, _ in item[3]] for item in items]

        def flush() -> None:
            if not pending:
                return
            grounded_images = errors.run_batch([item[0] for item in pending], lambda: ground(pending),
                                               lambda k: ground([pending[k]])[0])
            for (image_id, *_), grounded in zip(pending, grounded_images, strict=True):
                if grounded is not REJECTED:
                    add_rows(image_id, grounded)
            pending.clear()

        def add_rows(image_id: str, grounded: list[tuple[dict, list[dict], list]]) -> None:
            box_index = 0
            for caption, exprs, boxes in grounded:
                if not boxes:
                    rejects.append(reject(image_id, f"caption:{caption['caption_index']}", self.stage,
                                          "no_box", "no box matched a noun phrase of the caption"))
                    continue
                for box in boxes:
                    rows.append(box_row(exprs[box.phrase_index], box, box_index))
                    box_index += 1

        with self.image_errors(rejects, units) as errors:
            for image_id, rgb, prepared in self.decoded(errors, progress, grounder.prepare):
                if not units(image_id):
                    continue
                queries = errors.run(image_id, image_queries, image_id)
                if queries is REJECTED:
                    continue
                pending.append((image_id, rgb, prepared, queries))
                if sum(len(item[3]) for item in pending) >= cfg.grounder_batch_size:
                    flush()
            flush()
        rejects.sort(key=manifest_order(self.sources()))
        return self.finish(BOXES, rows, rejects, in_count=in_count)


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


class UseBoxMasksShard(UsesSamEmbeddings):
    """SAM box → mask: one image encoding per image (the shared one, see tasks/stages/sam.py), all its boxes in one
    batched decoder call."""

    stage = "use_box_masks"
    upstreams = {"boxes": UseBoxesShard}

    params_type, roles = UseBoxMasksParams, ("segmenter",)

    def requires(self) -> dict[str, Any]:
        """The caption-grounded boxes, and the human ones when ``[use] gt_boxes`` names a file."""
        deps = super().requires()
        if stage_params(UseGtBoxesParams).gt_boxes:
            deps["gt_boxes"] = UseGtBoxesShard(shard=self.shard, **self.common())
        return deps

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        """Per image (decoded ahead, ``[throughput]``): its stored embedding, one batched decoder call, the stability
        choice and threshold on the device (``decode_boxes``); behind the loop, on the host: the decisions, cleanup,
        RLE and rows (``finish_box_masks``). Rows and rejects in manifest and box order."""
        cfg = self.params
        segmenter = load_role("segmenter", model_settings())
        boxes = group_by_image(self.read("boxes", BOXES) +
                               (self.read("gt_boxes", BOXES) if "gt_boxes" in self.requires() else []))
        in_count = sum(len(v) for v in boxes.values())
        embed = self.sam_embedder(segmenter)
        sources = self.sources()
        progress.start(len(boxes))
        rows, rejects = [], []

        def image_boxes(image_id: str) -> list[dict]:
            return sorted(boxes.get(image_id, []), key=lambda r: r["box_index"])

        def decode(image_id: str, rgb: np.ndarray, these: list[dict]) -> DecodedBoxes | None:
            embedding = embed(image_id, rgb)
            if embedding is None:
                return None
            return decode_boxes(segmenter, rgb.shape[:2], np.asarray([b["box_xyxy"] for b in these], np.float32),
                                cfg, embedding=embedding)

        def finish(image_id: str, these: list[dict], decoded: DecodedBoxes) -> tuple[list[dict], list[dict]]:
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

        def deliver(image_id: str, outcome: Outcome) -> None:
            result = errors.run(image_id, outcome.get)
            if result is not REJECTED:
                rows.extend(result[0])
                rejects.extend(result[1])

        def units(image_id: str) -> list[str]:  # what in_count counts: the image's boxes
            return [f"box:{b['box_index']}" for b in image_boxes(image_id)]

        with self.image_errors(rejects, units) as errors, behind(deliver) as post:
            for image_id, rgb, _ in self.decoded(errors, progress):
                these = image_boxes(image_id)
                if not these:
                    continue
                decoded = errors.run(image_id, decode, image_id, rgb, these)
                if decoded is REJECTED:
                    continue
                if decoded is None:
                    rejects.extend(self.no_embedding_rejects(image_id, units(image_id)))
                    continue
                post.submit(image_id, finish, image_id, these, decoded)
        rejects.sort(key=manifest_order(sources))
        return self.finish(BOX_MASKS, rows, rejects, in_count=in_count)


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
