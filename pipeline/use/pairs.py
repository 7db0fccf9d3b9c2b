"""USE segment–text pairs of one image (use-paper §3.1, hyperparameters of §4.1 "Training Data").

captions → referring expressions → grounded boxes (the whole caption is the query) → SAM box masks (best
stability of the three multimask outputs, thresholds, cleanup) → mask NMS, expressions merged into a list;
then the texts of a segment for training: its noun phrases AND referring expressions (§3.1 "store both"), one
drawn uniformly per segment and epoch (§3.2).

Pure per-image logic: the Grounder / Segmenter roles and the spaCy ``nlp`` are passed in; nothing is loaded
here.
Row dicts carry exactly the columns of the contracts in ``schemas/use.py`` (CAPTIONS, EXPRESSIONS, BOXES,
BOX_MASKS, SEGMENTS), so ``CONTRACT.table(rows)`` takes them as they are.

Conventions
- image: uint8 RGB ``[H, W, 3]``; masks: ``bool [H, W]``, ``mask[y, x]`` with ``(x, y) = (column, row)``;
- boxes: ``xyxy`` float32 pixels of that image (x = column); mask bboxes: COCO ``xywh``;
- character spans ``(start, end)`` into the caption, end exclusive.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pseudoseg.pipeline.core.masks import (
    box_covers_image,
    clean_mask,
    decode_rle,
    encode_rle,
    full_image_mask,
    is_tensor,
    mask_nms,
    rle_area,
    rle_bbox,
    rle_row_fields,
    row_rle,
    stability_score,
)
from pseudoseg.pipeline.core.overlap import HostCopy
from pseudoseg.pipeline.use.expressions import extract_expressions
from pseudoseg.pipeline.use.grounding import box_nms, match_boxes_to_phrases, shift_spans, split_caption_windows
from pseudoseg.pipeline.use.params import (
    TEXT_KINDS,
    UseBoxesParams,
    UseBoxMasksParams,
    UseExpressionsParams,
    UseSegmentsParams,
)

if TYPE_CHECKING:  # role objects are passed in; pipeline/ never imports the model layer at run time
    from pseudoseg.models.roles import Grounder, SamImageEmbedding, Segmenter

GT_SOURCE = "gt"
MLLM_PREFIX = "mllm:"

# The stages' settings (use-paper §4.1: Grounding DINO box threshold 0.05 and NMS 0.7; SAM predicted-IoU and
# stability thresholds lowered to 0.6 "to obtain more segments"; mask NMS at IoU 0.7) are the params objects of
# pipeline/use/params.py, passed whole.

# Reject reasons of a box whose mask is not kept.
LOW_PREDICTED_IOU = "low_predicted_iou"
LOW_STABILITY = "low_stability"
EMPTY_MASK = "empty_mask"


# ----------------------------------------------------------------------------------------------------- captions
def caption_rows(image_id: str, gt: Sequence[str], generated: Sequence[str], generator: str) -> list[dict]:
    """CAPTIONS rows of one image: ground-truth captions first (source ``"gt"``), then the generated ones
    (source ``"mllm:<generator>"``), ``caption_index`` 0.. in that order.

    Captions are stripped; empty ones are dropped (they hold no phrase) before numbering. Duplicates are kept:
    each caption is its own grounding query.
    """
    rows: list[dict] = []
    tagged = [(GT_SOURCE, c) for c in gt] + [(f"{MLLM_PREFIX}{generator}", c) for c in generated]
    for source, text in tagged:
        text = text.strip()
        if text:
            rows.append({"image_id": image_id, "caption_index": len(rows), "source": source, "caption": text})
    return rows


def expression_rows(caption_row: Mapping, nlp, params: UseExpressionsParams) -> list[dict]:
    """EXPRESSIONS rows of one CAPTIONS row: one per noun chunk (``phrase_index`` in text order) with its
    referring expression (:func:`pipeline.use.expressions.extract_expressions`, capped at
    ``params.max_expression_tokens`` spaCy tokens). ``caption[phrase_start:phrase_end] == phrase``."""
    exprs = extract_expressions(caption_row["caption"], nlp, max_tokens=params.max_expression_tokens)
    return [
        {
            "image_id": caption_row["image_id"],
            "caption_index": caption_row["caption_index"],
            "source": caption_row["source"],
            "phrase_index": k,
            "phrase": e.phrase,
            "expression": e.expression,
            "phrase_start": e.phrase_start,
            "phrase_end": e.phrase_end,
        }
        for k, e in enumerate(exprs)
    ]


def caption_sentence_spans(caption: str, nlp) -> list[tuple[int, int]]:
    """Character spans of the caption's sentences by spaCy (``nlp`` with a parser or sentencizer), in order;
    what :func:`ground_caption` needs to window captions longer than the grounder's text limit."""
    return [(s.start_char, s.end_char) for s in nlp(caption).sents]


# ----------------------------------------------------------------------------------------------------- grounding
@dataclass(frozen=True)
class GroundedBox:
    """One box of a caption: ``box_xyxy`` float32 [4] pixels (x = column), the grounder's ``score`` (max token
    probability) and the index of the phrase (in the caller's ``phrase_spans``) its best token lies in."""

    box_xyxy: np.ndarray
    score: float
    phrase_index: int


@dataclass(frozen=True)
class CaptionQuery:
    """One caption of one image to ground: ``image`` indexes the caller's image list; ``phrase_spans`` are
    character spans of its phrases; ``sentence_spans`` its sentences (None: one sentence), used only when it is
    longer than the grounder's text limit (see :func:`ground_caption`)."""

    image: int
    caption: str
    phrase_spans: tuple[tuple[int, int], ...]
    sentence_spans: tuple[tuple[int, int], ...] | None = None


def caption_windows(grounder: Grounder, query: CaptionQuery) -> list[tuple[int, int]]:
    """Character windows of the caption the grounder is asked with: the whole caption, or, past
    ``grounder.max_text_tokens``, runs of whole sentences that fit (:func:`pipeline.use.grounding.split_caption_windows`).
    No window when the caption cannot receive a box (no phrase, or blank): the model is not asked about it."""
    caption = query.caption
    if not query.phrase_spans or not caption.strip():
        return []
    if grounder.count_tokens(caption) > grounder.max_text_tokens:
        spans = list(query.sentence_spans) if query.sentence_spans is not None else [(0, len(caption))]
        return split_caption_windows(caption, spans, grounder.count_tokens, grounder.max_text_tokens)
    return [(0, len(caption))]


def caption_boxes(query: CaptionQuery, windows: Sequence[tuple[int, int]], groundings: Sequence,
                  box_nms_thresh: float) -> list[GroundedBox]:
    """The boxes of one caption from the grounder's answers for its ``windows`` (same order): each window's token
    spans shifted back into caption coordinates, each box given to the phrase holding its most probable token
    (:func:`pipeline.use.grounding.match_boxes_to_phrases`; boxes outside every phrase dropped), then box NMS at
    ``box_nms_thresh`` over all the caption's boxes, whatever their phrase."""
    boxes: list[np.ndarray] = []
    scores: list[float] = []
    phrases: list[int] = []
    for (start, _end), g in zip(windows, groundings, strict=True):
        if len(g.boxes_xyxy) == 0:
            continue
        token_spans = shift_spans(g.token_char_spans, start)
        matched = match_boxes_to_phrases(g.token_probs, token_spans, list(query.phrase_spans))
        for box, score, k in zip(g.boxes_xyxy, g.scores, matched, strict=True):
            if k is not None:
                boxes.append(np.asarray(box, dtype=np.float32).reshape(4))
                scores.append(float(score))
                phrases.append(k)
    if not boxes:
        return []
    keep = box_nms(np.stack(boxes), np.asarray(scores, dtype=np.float32), box_nms_thresh)
    return [GroundedBox(box_xyxy=boxes[i], score=scores[i], phrase_index=phrases[i]) for i in keep.tolist()]


def ground_captions(
    grounder: Grounder,
    images: Sequence[np.ndarray],
    queries: Sequence[CaptionQuery],
    params: UseBoxesParams,
    *,
    prepared: Sequence | None = None,
) -> list[list[GroundedBox]]:
    """:func:`ground_caption` of every query (captions of one or several ``images``, uint8 RGB [H, W, 3]) with ONE
    ``grounder.ground_batch`` call for all their windows: each image is encoded once for all its captions, and
    ``params.grounder_batch_size`` windows go through the text and fusion layers together. prepared: the images'
    ``grounder.prepare`` outputs, if computed ahead. One list per query."""
    windows = [caption_windows(grounder, q) for q in queries]
    texts = [(q.image, q.caption[s:e]) for q, ws in zip(queries, windows, strict=True) for s, e in ws]
    answers = iter(grounder.ground_batch(images, texts, box_threshold=params.box_threshold,
                                         text_threshold=params.text_threshold, batch_size=params.grounder_batch_size,
                                         prepared=prepared) if texts else [])
    return [caption_boxes(q, ws, [next(answers) for _ in ws], params.box_nms_thresh) if ws else []
            for q, ws in zip(queries, windows, strict=True)]


def ground_caption(
    grounder: Grounder,
    image: np.ndarray,
    caption: str,
    phrase_spans: Sequence[tuple[int, int]],
    params: UseBoxesParams,
    *,
    sentence_spans: Sequence[tuple[int, int]] | None = None,
) -> list[GroundedBox]:
    """Boxes of ``caption``'s phrases in ``image`` (uint8 RGB [H, W, 3]), each assigned to one phrase.

    The grounder is queried with the ENTIRE caption (use-paper Fig. 4: context finds object parts). When the
    caption has more tokens than ``grounder.max_text_tokens``, it is queried window by window, windows being
    runs of whole sentences (``sentence_spans``: character spans, e.g. :func:`caption_sentence_spans`; None →
    the caption is one sentence, which the grounder then truncates); each window's token spans are shifted
    back into caption coordinates. A box goes to the phrase holding its most probable token
    (:func:`pipeline.use.grounding.match_boxes_to_phrases`); boxes outside every phrase are dropped. Then box NMS
    at ``params.box_nms_thresh`` over all the caption's boxes, whatever their phrase.

    ``phrase_spans``: character spans of the phrases in ``caption``. Returns boxes by descending score (equal
    scores: earlier window, then the grounder's order first). = :func:`ground_captions` of this one caption.
    """
    query = CaptionQuery(0, caption, tuple(tuple(p) for p in phrase_spans),
                         None if sentence_spans is None else tuple(tuple(s) for s in sentence_spans))
    return ground_captions(grounder, [image], [query], params)[0]


def text_of(row: Mapping) -> dict:
    """The TEXT struct (phrase, expression, source, caption_index) of an EXPRESSIONS or BOXES row."""
    return {
        "phrase": row["phrase"],
        "expression": row["expression"],
        "source": row["source"],
        "caption_index": int(row["caption_index"]),
    }


def box_row(expression_row: Mapping, box: GroundedBox, box_index: int) -> dict:
    """BOXES row: the grounded ``box`` paired with the EXPRESSIONS row of its phrase; ``box_index`` is per
    image, over all its captions (the caller numbers them)."""
    return {
        "image_id": expression_row["image_id"],
        "box_index": int(box_index),
        "caption_index": int(expression_row["caption_index"]),
        "source": expression_row["source"],
        "phrase_index": int(expression_row["phrase_index"]),
        "phrase": expression_row["phrase"],
        "expression": expression_row["expression"],
        "box_xyxy": [float(v) for v in np.asarray(box.box_xyxy, dtype=np.float32).reshape(4)],
        "score": float(box.score),
    }


# ----------------------------------------------------------------------------------------------------- masks
@dataclass(frozen=True)
class BoxMaskResult:
    """SAM's answer to one box prompt.

    mask: bool [H, W] after cleanup, or None when rejected. predicted_iou / stability: of the chosen multimask
    output (1.0 / 1.0 for a whole-image box, which is exact by construction). multimask_index: 0..M-1, -1 for
    a whole-image box. reject_reason: None (kept), ``"low_predicted_iou"``, ``"low_stability"`` or
    ``"empty_mask"``.
    """

    mask: np.ndarray | None
    predicted_iou: float
    stability: float
    multimask_index: int
    whole_image: bool
    reject_reason: str | None = None

    @property
    def kept(self) -> bool:
        return self.reject_reason is None


def choose_by_stability(logits, iou_pred, *, mask_threshold: float = 0.0, offset: float = 1.0):
    """Per prompt, the multimask output with the highest SAM stability score.

    logits: float [N, M, H, W] at image resolution; iou_pred: float [N, M]. Ties on stability go to the higher
    predicted IoU, then to the lower index. Returns (index int64 [N], stability float32 [N]) of the chosen
    outputs. Numpy arrays in → numpy out; torch tensors in (any device) → tensors on that device, the same values
    (the stability counts are integers and the order rule is one stable two-key sort either way).
    """
    if is_tensor(logits):
        import torch

        if logits.ndim != 4:
            raise ValueError(f"logits must be [N, M, H, W], got {tuple(logits.shape)}")
        stab = stability_score(logits, mask_threshold, offset)  # [N, M]
        iou = torch.as_tensor(iou_pred, device=stab.device).to(torch.float32).reshape(stab.shape)
        # np.lexsort((-iou, -stab)) as two stable sorts: by the secondary key, then by the primary one.
        by_iou = torch.argsort(-iou, dim=-1, stable=True)
        order = by_iou.gather(-1, torch.argsort(-stab.gather(-1, by_iou), dim=-1, stable=True))
        index = order[:, 0] if len(order) else torch.zeros(0, dtype=torch.int64, device=stab.device)
        return index, stab.gather(-1, index[:, None])[:, 0]
    logits = np.asarray(logits)
    if logits.ndim != 4:
        raise ValueError(f"logits must be [N, M, H, W], got {logits.shape}")
    stab = stability_score(logits, mask_threshold, offset)  # [N, M]
    iou = np.asarray(iou_pred, dtype=np.float32).reshape(stab.shape)
    # lexsort: last key is primary; it is stable, so remaining ties keep the lower index first.
    index = np.lexsort((-iou, -stab), axis=-1)[:, 0].astype(np.int64) if stab.size else np.zeros(0, np.int64)
    return index, stab[np.arange(len(index)), index].astype(np.float32)


@dataclass(frozen=True)
class DecodedBoxes:
    """SAM's decoding of one image's box prompts, reduced where the model ran (:func:`decode_boxes`): what
    :func:`finish_box_masks` needs on the host, each a :class:`pipeline.core.overlap.HostCopy` already on its way.

    size: (H, W); whole: indices of boxes taking the whole-image mask (never sent to SAM); to_sam: the others, in
    input order, with per box the chosen multimask ``index`` int64 [K], its predicted ``iou`` float32 [K] and
    ``stability`` float32 [K], and its binary ``masks`` bool [K, H, W] (logits > mask_threshold, before cleanup).
    """

    size: tuple[int, int]
    whole: tuple[int, ...]
    to_sam: tuple[int, ...]
    index: tuple[HostCopy, ...] = ()
    iou: tuple[HostCopy, ...] = ()
    stability: tuple[HostCopy, ...] = ()
    masks: tuple[HostCopy, ...] = ()


def decode_boxes(
    segmenter: Segmenter,
    image_hw: tuple[int, int],
    boxes_xyxy: np.ndarray,
    params: UseBoxMasksParams,
    *,
    embedding: SamImageEmbedding,
    mask_threshold: float = 0.0,
    stability_offset: float = 1.0,
) -> DecodedBoxes:
    """The model half of :func:`masks_for_boxes` on one image of ``image_hw`` = (H, W): boxes covering more than
    ``params.whole_image_fraction`` are set aside; the others are decoded by ``segmenter.predict_device`` (one
    call, or chunks of ``params.sam_boxes_per_call``; 0 = one call), the most stable output chosen (:func:`choose_by_stability`) and thresholded
    where the logits are (the accelerator), and only the chosen binary masks and three numbers per box start their
    copy to the host. Nothing here waits for the device."""
    import torch

    h, w = int(image_hw[0]), int(image_hw[1])
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    whole = tuple(i for i, box in enumerate(boxes) if box_covers_image(box, h, w, params.whole_image_fraction))
    to_sam = tuple(i for i in range(len(boxes)) if i not in set(whole))
    if not to_sam:
        return DecodedBoxes(size=(h, w), whole=whole, to_sam=())
    parts: dict[str, list[HostCopy]] = {"index": [], "iou": [], "stability": [], "masks": []}
    step = params.sam_boxes_per_call or len(to_sam)
    for c in range(0, len(to_sam), step):
        chunk = list(to_sam[c : c + step])
        predict = getattr(segmenter, "predict_device", segmenter.predict)  # duck-typed segmenters: predict
        pred = predict(embedding, boxes_xyxy=boxes[chunk], multimask=True)
        logits, iou_pred = pred.logits, pred.iou_pred
        if not is_tensor(logits):  # a backend without a device answered with numpy arrays
            logits, iou_pred = torch.from_numpy(np.asarray(logits)), torch.from_numpy(np.asarray(iou_pred))
        index, stab = choose_by_stability(logits, iou_pred, mask_threshold=mask_threshold, offset=stability_offset)
        rows = torch.arange(len(chunk), device=index.device)
        parts["index"].append(HostCopy(index))
        parts["iou"].append(HostCopy(iou_pred.reshape(len(chunk), -1)[rows, index]))
        parts["stability"].append(HostCopy(stab))
        parts["masks"].append(HostCopy(logits[rows, index] > mask_threshold))
    return DecodedBoxes(size=(h, w), whole=whole, to_sam=to_sam,
                        **{k: tuple(v) for k, v in parts.items()})


def finish_box_masks(
    decoded: DecodedBoxes, params: UseBoxMasksParams,
) -> list[BoxMaskResult]:
    """The host half of :func:`masks_for_boxes` (thread-safe: stages run it behind the model loop): the decisions
    on the chosen outputs — rejected when the predicted IoU is below ``params.pred_iou_thresh`` or the stability
    below ``params.stability_score_thresh``; else holes and islands under ``params.cleanup_area`` pixels fixed
    (:func:`pipeline.core.masks.clean_mask`), empty → rejected — and the whole-image boxes. One result per box, in
    input order."""
    h, w = decoded.size
    results: dict[int, BoxMaskResult] = {i: BoxMaskResult(full_image_mask(h, w), 1.0, 1.0, -1, True)
                                         for i in decoded.whole}
    arrays = {k: np.concatenate([c.numpy() for c in getattr(decoded, k)]) if decoded.to_sam else None
              for k in ("index", "iou", "stability", "masks")}
    for n, i in enumerate(decoded.to_sam):
        m = int(arrays["index"][n])
        iou = float(arrays["iou"][n])
        s = float(arrays["stability"][n])
        reason = None
        mask = None
        if iou < params.pred_iou_thresh:
            reason = LOW_PREDICTED_IOU
        elif s < params.stability_score_thresh:
            reason = LOW_STABILITY
        else:
            mask = clean_mask(arrays["masks"][n], params.cleanup_area)
            if not mask.any():
                reason, mask = EMPTY_MASK, None
        results[i] = BoxMaskResult(mask, iou, s, m, False, reason)
    return [results[i] for i in sorted(results)]


def masks_for_boxes(
    segmenter: Segmenter,
    image: np.ndarray,
    boxes_xyxy: np.ndarray,
    params: UseBoxMasksParams,
    *,
    mask_threshold: float = 0.0,
    stability_offset: float = 1.0,
    embedding: SamImageEmbedding | None = None,
) -> list[BoxMaskResult]:
    """SAM masks of N box prompts on one image (uint8 RGB [H, W, 3]); boxes float [N, 4] xyxy pixels.

    - A box covering more than ``params.whole_image_fraction`` of the image gets the whole-image mask without SAM
      (use-paper §3.1: vague texts such as "the atmosphere").
    - The others: ONE ``segmenter.embed`` (none when no box needs SAM; none either when ``embedding``, this
      image's stored embedding, is given) and ONE batched
      ``predict(multimask=True)`` call (``params.sam_boxes_per_call`` splits it when the caller must bound the
      N*3*H*W float32 logits in memory; None = one call).
    - Of the 3 outputs the most stable is kept (:func:`choose_by_stability`); rejected when its predicted IoU
      is below ``params.pred_iou_thresh`` or its stability below ``params.stability_score_thresh``; then holes and islands under
      ``params.cleanup_area`` pixels are fixed (:func:`pipeline.core.masks.clean_mask`); empty → rejected.
    Returns one :class:`BoxMaskResult` per box, in input order.

    = :func:`finish_box_masks` of :func:`decode_boxes` (the stages run the two halves on either side of the model
    loop; the stability choice and the threshold happen where the logits are, only binary masks reach the host).
    """
    image = np.asarray(image)
    h, w = int(image.shape[0]), int(image.shape[1])
    boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    if embedding is None and any(not box_covers_image(b, h, w, params.whole_image_fraction) for b in boxes):
        embedding = segmenter.embed(image)
    decoded = decode_boxes(segmenter, (h, w), boxes, params, embedding=embedding, mask_threshold=mask_threshold,
                           stability_offset=stability_offset)
    return finish_box_masks(decoded, params)


def box_mask_row(
    image_id: str,
    box_index: int,
    box_xyxy: Sequence[float],
    result: BoxMaskResult,
    texts: Sequence[Mapping],
) -> dict:
    """BOX_MASKS row of a kept mask: the prompt box (``box_xyxy`` float pixels, x = column), its ``texts``
    (TEXT structs, e.g. ``[text_of(boxes_row)]``), and the mask as compressed COCO RLE with its area and COCO
    xywh bbox. Raises ValueError for a rejected result (it has no mask)."""
    if result.mask is None:
        raise ValueError(f"box {box_index} was rejected ({result.reject_reason}); it has no mask row")
    rle = encode_rle(result.mask)
    return {
        "image_id": image_id,
        "box_index": int(box_index),
        **rle_row_fields(rle),
        "area": rle_area(rle),
        "bbox": rle_bbox(rle),
        "box_xyxy": [float(v) for v in box_xyxy],
        "predicted_iou": float(result.predicted_iou),
        "stability": float(result.stability),
        "multimask_index": int(result.multimask_index),
        "whole_image": bool(result.whole_image),
        "texts": [text_of(t) for t in texts],
    }


# ----------------------------------------------------------------------------------------------------- segments
def merge_segments(masks: Sequence[Mapping], params: UseSegmentsParams) -> list[dict]:
    """SEGMENTS rows of one image from its BOX_MASKS rows (use-paper §4.1: similar segments merged by NMS,
    expressions merged into a list).

    Greedy mask NMS ranked by ``predicted_iou`` (:func:`pipeline.core.masks.mask_nms`; equal scores: earlier row
    first). Each kept mask absorbs the masks it suppressed: ``box_indices`` and ``texts`` list the kept mask's
    first, then the absorbed ones' in input order, with exact duplicate texts (all four fields equal) dropped
    after their first occurrence. ``segment_id`` = rank in NMS order; ``score`` = the kept mask's predicted
    IoU; mask, area and bbox are the kept mask's.
    """
    if not masks:
        return []
    ids = {m["image_id"] for m in masks}
    if len(ids) != 1:
        raise ValueError(f"merge_segments works on one image at a time, got image ids {sorted(ids)}")
    rles = [row_rle(m) for m in masks]
    groups = mask_nms(rles, [float(m["predicted_iou"]) for m in masks], params.segment_nms_iou)
    rows = []
    for segment_id, group in enumerate(groups):
        kept = masks[group[0]]
        texts: list[dict] = []
        seen: set[tuple] = set()
        for i in group:
            for t in masks[i]["texts"]:
                key = (t["phrase"], t["expression"], t["source"], int(t["caption_index"]))
                if key not in seen:
                    seen.add(key)
                    texts.append(
                        dict(zip(("phrase", "expression", "source", "caption_index"), key, strict=True))
                    )
        rle = rles[group[0]]
        rows.append(
            {
                "image_id": kept["image_id"],
                "segment_id": segment_id,
                "height": int(kept["height"]),
                "width": int(kept["width"]),
                "rle_counts": kept["rle_counts"],
                "area": rle_area(rle),
                "bbox": rle_bbox(rle),
                "score": float(kept["predicted_iou"]),
                "box_indices": [int(masks[i]["box_index"]) for i in group],
                "texts": texts,
            }
        )
    return rows


def segment_mask(row: Mapping) -> np.ndarray:
    """bool [H, W] mask of a BOX_MASKS or SEGMENTS row."""
    return decode_rle(row_rle(row))


# ----------------------------------------------------------------------------------------------------- training texts
# The texts a segment's training text is drawn from: TEXT_KINDS / TEXT_CHOICES (pipeline/use/params.py, with the
# paper's words).


def segment_texts(texts: Sequence[Mapping], kinds: Sequence[str] = TEXT_KINDS) -> list[str]:
    """The distinct training texts of one segment, from its TEXT structs (a SEGMENTS row's ``texts``).

    Each struct gives its ``phrase`` and its ``expression`` (``kinds`` picks which; the paper: both), in struct
    order, phrase first; a text already listed (an unexpanded phrase is its own expression; the same phrase from
    two captions) and empty texts are not repeated. Returns ``[]`` for a segment without texts.
    """
    bad = [k for k in kinds if k not in TEXT_KINDS]
    if bad or not kinds:
        raise ValueError(f"text kinds must be a non-empty subset of {TEXT_KINDS}, got {list(kinds)}")
    out: dict[str, None] = {}
    for t in texts:
        for kind in TEXT_KINDS:
            if kind in kinds and str(t[kind]).strip():
                out.setdefault(str(t[kind]), None)
    return list(out)


def text_pool(segments: Iterable[Mapping]) -> list[tuple[str, bool, bool]]:
    """Every distinct text of the segments' TEXT structs, phrases and expressions alike, sorted:
    ``(text, as_phrase, as_expression)`` with the flags telling whether it occurs as a phrase / an expression of
    some segment (both for an unexpanded phrase). What the text encoder must embed, each text once."""
    flags: dict[str, list[bool]] = {}
    for segment in segments:
        for t in segment["texts"]:
            for i, kind in enumerate(TEXT_KINDS):
                text = str(t[kind])
                if text.strip():
                    flags.setdefault(text, [False, False])[i] = True
    return [(text, f[0], f[1]) for text, f in sorted(flags.items())]


def draw_segment_texts(options: Sequence[Sequence[int]], rng: np.random.Generator) -> np.ndarray:
    """One text per segment, uniformly among that segment's distinct texts (``options[s]``: its text ids, as
    :func:`segment_texts` lists them, mapped to ids by the caller). Returns int64 ``[S]`` (the drawn ids); draws
    in segment order from ``rng``, so a seeded rng gives the same texts whatever else runs."""
    if any(len(o) == 0 for o in options):
        raise ValueError("every segment needs at least one text to draw from")
    return np.array([o[int(rng.integers(len(o)))] for o in options], np.int64)
