"""USE pairs of one image (pipeline/use/pairs.py): rows against the schemas/use.py contracts, grounding with the
oracle and a windowing stub, SAM box masks against segment-anything's own SamPredictor, the whole-image rule,
thresholds and cleanup, and mask NMS with merged texts. CPU only; the SAM is a small random-init one."""

from __future__ import annotations

import re
import zlib
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from pseudoseg.models.roles import Grounder, Grounding, MaskPrediction, SamImageEmbedding, Segmenter
from pseudoseg.pipeline.core.masks import clean_mask, decode_rle, encode_rle, full_image_mask, mask_nms
from pseudoseg.pipeline.use.pairs import (
    EMPTY_MASK,
    LOW_PREDICTED_IOU,
    LOW_STABILITY,
    BoxMaskResult,
    GroundedBox,
    box_mask_row,
    box_row,
    caption_rows,
    caption_sentence_spans,
    choose_by_stability,
    expression_rows,
    ground_caption,
    masks_for_boxes,
    merge_segments,
    segment_mask,
    text_of,
)
from pseudoseg.pipeline.use.params import (
    UseBoxesParams,
    UseBoxMasksParams,
    UseExpressionsParams,
    UseSegmentsParams,
)
from pseudoseg.schemas.use import BOX_MASKS, BOXES, CAPTIONS, EXPRESSIONS, SEGMENTS
from tests.oracles import OracleGrounder, OracleSegmenter

# the stages' defaults (pipeline/use/params.py), as production passes them
EXPRESSIONS_PARAMS, BOXES_PARAMS, MASKS_PARAMS = UseExpressionsParams(), UseBoxesParams(), UseBoxMasksParams()


def _phrase_spans(rows: list[dict]) -> list[tuple[int, int]]:
    return [(r["phrase_start"], r["phrase_end"]) for r in rows]


# ----------------------------------------------------------------------------------------------------- captions
def test_caption_rows_gt_first_then_generated(nlp):
    rows = caption_rows("img1", ["A dog.", "  ", "A dog."], [" A brown dog on grass. "], "cogvlm")
    assert [(r["caption_index"], r["source"], r["caption"]) for r in rows] == [
        (0, "gt", "A dog."),
        (1, "gt", "A dog."),  # duplicates kept, empty dropped
        (2, "mllm:cogvlm", "A brown dog on grass."),
    ]
    assert CAPTIONS.table(rows).num_rows == 3
    exprs = expression_rows(rows[2], nlp, EXPRESSIONS_PARAMS)
    assert [(e["phrase_index"], e["phrase"], e["expression"]) for e in exprs] == [
        (0, "A brown dog", "A brown dog on grass"),
        (1, "grass", "grass"),
    ]
    for e in exprs:
        assert (e["image_id"], e["caption_index"], e["source"]) == ("img1", 2, "mllm:cogvlm")
        assert rows[2]["caption"][e["phrase_start"] : e["phrase_end"]] == e["phrase"]
    assert EXPRESSIONS.table(exprs).num_rows == 2
    assert caption_rows("img1", [], [], "x") == []


# ----------------------------------------------------------------------------------------------------- grounding
class SpyGrounder(Grounder):
    """Wraps a grounder and records the texts it was queried with."""

    def __init__(self, inner: Grounder, max_text_tokens: int | None = None) -> None:
        self.inner = inner
        self.max_text_tokens = max_text_tokens or inner.max_text_tokens
        self.calls: list[str] = []

    def count_tokens(self, caption: str) -> int:
        return self.inner.count_tokens(caption)

    def ground(self, image, caption, *, box_threshold, text_threshold) -> Grounding:
        self.calls.append(caption)
        return self.inner.ground(image, caption, box_threshold=box_threshold, text_threshold=text_threshold)


def test_oracle_grounding_assigns_every_box_to_the_phrase_naming_its_class(nlp, gt):
    caption = "A person sits on a chair next to a table with a bottle on it."
    image = gt.rgb
    rows = expression_rows({"image_id": "voc", "caption_index": 0, "source": "gt", "caption": caption}, nlp, EXPRESSIONS_PARAMS)
    spy = SpyGrounder(OracleGrounder(gt))
    boxes = ground_caption(
        spy, image, caption, _phrase_spans(rows), BOXES_PARAMS, sentence_spans=caption_sentence_spans(caption, nlp)
    )
    assert spy.calls == [caption]  # the ENTIRE caption is the query
    gt_boxes = {k: gt.instance_box_xyxy(k) for k in range(1, len(gt.instance_classes))}
    named = set()
    for b in boxes:
        assert isinstance(b, GroundedBox) and b.box_xyxy.dtype == np.float32 and b.box_xyxy.shape == (4,)
        k = next(k for k, gb in gt_boxes.items() if np.allclose(gb, b.box_xyxy))
        cls = int(gt.instance_classes[k])
        assert gt.class_in_text(rows[b.phrase_index]["phrase"]) == cls, (rows[b.phrase_index]["phrase"], cls)
        named.add(gt.class_names[cls])
    assert named == {"person", "chair", "diningtable", "bottle"}
    scores = [b.score for b in boxes]
    assert scores == sorted(scores, reverse=True)
    # Box NMS at 0.7 only ever removes boxes: every GT instance of a named class is either kept or overlaps a kept one.
    kept = np.stack([b.box_xyxy for b in boxes])
    for k, gb in gt_boxes.items():
        if gt.class_names[int(gt.instance_classes[k])] in named:
            assert any(np.allclose(gb, kb) for kb in kept) or _max_iou(gb, kept) > 0.7
    bx = [box_row(rows[b.phrase_index], b, i) for i, b in enumerate(boxes)]
    assert BOXES.table(bx).num_rows == len(boxes)


def _max_iou(box: np.ndarray, boxes: np.ndarray) -> float:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return float((inter / (area(box) + area(boxes) - inter)).max())


_WORD = re.compile(r"\w+|[^\w\s]")
LONG_CAPTION = (
    "A brown dog sleeps on the porch. A small cat watches a bird. The red car is parked near a tree. "
    "A man holds an umbrella."
)
OBJECTS = ["dog", "porch", "cat", "bird", "car", "tree", "man", "umbrella"]


class WordGrounder(Grounder):
    """Word tokens between [CLS]/[SEP]; one box per token naming an object of OBJECTS (box k is a distinct
    square, score 0.9 - k/100); its token probabilities: 0.3 on every word (a decoy level), 0.9 on the object."""

    def __init__(self, max_text_tokens: int) -> None:
        self.max_text_tokens = max_text_tokens
        self.calls: list[str] = []

    @staticmethod
    def _spans(text: str) -> list[tuple[int, int]]:
        return [(-1, -1)] + [m.span() for m in _WORD.finditer(text)] + [(-1, -1)]

    def count_tokens(self, caption: str) -> int:
        return len(self._spans(caption))

    def ground(self, image, caption, *, box_threshold, text_threshold) -> Grounding:
        self.calls.append(caption)
        spans = self._spans(caption)[: self.max_text_tokens]  # truncation, as a real tokenizer
        boxes, rows, scores = [], [], []
        for t, (s, e) in enumerate(spans):
            if s >= 0 and caption[s:e] in OBJECTS:
                k = OBJECTS.index(caption[s:e])
                row = np.array([0.0 if a < 0 else 0.3 for a, _ in spans], np.float32)
                row[t] = 0.9 - k / 100
                boxes.append([20.0 * k, 0.0, 20.0 * k + 10, 10.0])
                rows.append(row)
                scores.append(row[t])
        return Grounding(
            boxes_xyxy=np.array(boxes, np.float32).reshape(-1, 4),
            scores=np.array(scores, np.float32),
            token_probs=np.array(rows, np.float32).reshape(-1, len(spans)),
            token_char_spans=tuple(spans),
            text_threshold=text_threshold,
        )


def test_long_caption_is_windowed_and_spans_map_back(nlp):
    caption = LONG_CAPTION
    rows = expression_rows({"image_id": "x", "caption_index": 0, "source": "gt", "caption": caption}, nlp, EXPRESSIONS_PARAMS)
    spans = _phrase_spans(rows)
    image = np.zeros((32, 200, 3), np.uint8)
    sents = caption_sentence_spans(caption, nlp)
    assert len(sents) == 4

    small = WordGrounder(max_text_tokens=12)
    assert small.count_tokens(caption) > 12
    windowed = ground_caption(small, image, caption, spans, BOXES_PARAMS, sentence_spans=sents)
    assert len(small.calls) == 4  # one window per sentence at this limit
    assert [caption[s:e] for s, e in sents] == small.calls
    assert all(small.count_tokens(c) <= 12 for c in small.calls)

    whole = WordGrounder(max_text_tokens=256)
    unsplit = ground_caption(whole, image, caption, spans, BOXES_PARAMS, sentence_spans=sents)
    assert whole.calls == [caption]

    for result in (windowed, unsplit):
        found = []
        for b in result:
            word = OBJECTS[int(b.box_xyxy[0]) // 20]
            s, e = spans[b.phrase_index]
            assert word in caption[s:e].split(), (word, caption[s:e])
            found.append(word)
        assert found == OBJECTS  # all found, by descending score
    assert [(b.phrase_index, b.score) for b in windowed] == [(b.phrase_index, b.score) for b in unsplit]


def test_box_nms_over_the_caption_boxes():
    """Two windows each find the same dog box with the same score: NMS keeps one, the first window's."""
    caption = "A dog runs. A dog sits."
    spans = [(0, 5), (12, 17)]  # "A dog", "A dog"
    sents = [(0, 11), (12, 23)]
    image = np.zeros((10, 10, 3), np.uint8)
    grounder = WordGrounder(max_text_tokens=6)
    out = ground_caption(grounder, image, caption, spans, BOXES_PARAMS, sentence_spans=sents)
    assert grounder.calls == ["A dog runs.", "A dog sits."]
    assert [b.phrase_index for b in out] == [0]
    both = ground_caption(grounder, image, caption, spans, replace(BOXES_PARAMS, box_nms_thresh=1.0), sentence_spans=sents)
    assert [b.phrase_index for b in both] == [0, 1]  # equal scores: window order
    assert ground_caption(grounder, image, caption, [], BOXES_PARAMS) == []


# ----------------------------------------------------------------------------------------------------- SAM exactness
@pytest.fixture(scope="module")
def tiny_sam():
    """segment-anything's SAM with the tiny image encoder, random init (seed 0). The mask hypernetworks' last
    layers are scaled so that logits span about ±10 like a trained SAM's (random init gives ±0.2, where every
    stability score would be 0 and the choice among the 3 outputs would be untested)."""
    from pseudoseg.models.adapters.segmenter import SAM_ARCHS, SamSegmenter, build_sam_arch

    torch.manual_seed(0)
    sam = build_sam_arch(SAM_ARCHS["tiny"], checkpoint=None)
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(40)
    return SamSegmenter(sam, device="cpu")


def test_batched_masks_equal_sam_predictor_box_by_box(tiny_sam):
    from segment_anything import SamPredictor
    from segment_anything.utils.amg import calculate_stability_score

    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), (15, 15), 0)  # H=300, W=400
    boxes = np.array(
        [
            [10, 20, 150, 200],
            [200, 50, 390, 290],
            [50, 100, 120, 140],
            [0, 0, 399, 150],
            [300, 200, 330, 260],
            [5, 5, 60, 290],
            [100, 10, 300, 80],
            [150, 150, 250, 250],
        ],
        np.float32,
    )
    # Accept everything and skip cleanup, so the result is the chosen raw mask.
    got = masks_for_boxes(
        tiny_sam, image, boxes, replace(MASKS_PARAMS, pred_iou_thresh=-np.inf, stability_score_thresh=-np.inf, cleanup_area=0)
    )

    predictor = SamPredictor(tiny_sam.sam)
    predictor.set_image(image)
    chosen = []
    for box, res in zip(boxes, got, strict=True):
        # logits [3, H, W] at the image size, iou [3]
        logits, iou, _ = predictor.predict(box=box, multimask_output=True, return_logits=True)
        stab = torch.nan_to_num(calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0)).numpy()
        ref = int(np.lexsort((-iou, -stab))[0])  # highest stability, then highest predicted IoU
        assert np.sort(stab)[-1] - np.sort(stab)[-2] > 1e-4  # no near-tie: the choice is well defined
        assert res.multimask_index == ref and not res.whole_image
        assert res.stability == pytest.approx(float(stab[ref]), abs=1e-5)
        assert res.predicted_iou == pytest.approx(float(iou[ref]), abs=1e-5)
        ref_mask = logits[ref] > 0
        if res.mask is None:
            assert res.reject_reason == EMPTY_MASK and not ref_mask.any()
            continue
        assert res.mask.shape == (300, 400) and res.mask.dtype == bool
        # Batch-of-N vs batch-of-1 float rounding (≈1e-5) may flip a pixel whose logit is ~0, nothing else.
        differ = res.mask != ref_mask
        assert not (differ & (np.abs(logits[ref]) > 1e-4)).any()
        assert differ.sum() <= 2
        chosen.append(ref)
    assert len(set(chosen)) > 1  # the fixture exercises more than one of SAM's three outputs


# ----------------------------------------------------------------------------------------------------- whole image
class SpySegmenter(Segmenter):
    def __init__(self, inner: Segmenter) -> None:
        self.inner = inner
        self.embeds = 0
        self.predicts: list[np.ndarray] = []

    def embed(self, image):
        self.embeds += 1
        return self.inner.embed(image)

    def predict(self, embedding, *, boxes_xyxy=None, points_xy=None, point_labels=None, multimask=True):
        assert multimask
        self.predicts.append(np.array(boxes_xyxy))
        return self.inner.predict(embedding, boxes_xyxy=boxes_xyxy, multimask=multimask)

    def automatic_masks(self, image, **params):
        raise NotImplementedError


def test_whole_image_boxes_never_reach_sam(gt):
    image = gt.rgb
    h, w = gt.size
    whole = np.array([[0, 0, w, h], [-5, -5, w + 5, h + 5], [0, 0, w * 0.96, h * 0.96]], np.float32)
    spy = SpySegmenter(OracleSegmenter(gt))
    res = masks_for_boxes(spy, image, whole, MASKS_PARAMS)
    assert spy.embeds == 0 and spy.predicts == []
    for r in res:
        assert r.whole_image and r.multimask_index == -1 and r.kept
        assert np.array_equal(r.mask, full_image_mask(h, w))

    normal = np.stack([gt.instance_box_xyxy(k) for k in (1, 2, 10)])
    mixed = np.concatenate([whole[:1], normal[:2], whole[1:2], normal[2:]])
    spy = SpySegmenter(OracleSegmenter(gt))
    res = masks_for_boxes(spy, image, mixed, MASKS_PARAMS)
    assert spy.embeds == 1 and len(spy.predicts) == 1
    np.testing.assert_array_equal(spy.predicts[0], normal)  # only the normal boxes, in order, one batch
    assert [r.whole_image for r in res] == [True, False, False, True, False]
    for r, k in zip([res[1], res[2], res[4]], (1, 2, 10), strict=True):
        # The oracle's outputs all have stability 1; the tie goes to the exact mask (highest predicted IoU).
        assert r.multimask_index == 1 and r.kept and r.predicted_iou == pytest.approx(0.95)
        assert np.array_equal(r.mask, clean_mask(gt.instance_label == k, MASKS_PARAMS.cleanup_area))

    spy = SpySegmenter(OracleSegmenter(gt))
    masks_for_boxes(spy, image, np.concatenate([normal, normal]), replace(MASKS_PARAMS, sam_boxes_per_call=4))
    assert spy.embeds == 1 and [len(p) for p in spy.predicts] == [4, 2]
    assert masks_for_boxes(spy, image, np.zeros((0, 4), np.float32), MASKS_PARAMS) == []


# ----------------------------------------------------------------------------------------------------- thresholds
H, W = 60, 80


def _stable(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 10.0, -10.0).astype(np.float32)


def _rect(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


class DesignedSegmenter(Segmenter):
    """Answers each box (looked up by its coordinates) with designed logits [3, H, W] and iou_pred [3]."""

    def __init__(self, answers: dict[tuple, tuple[np.ndarray, np.ndarray]]) -> None:
        self.answers = answers

    def embed(self, image):
        return SamImageEmbedding(features=None, original_size=image.shape[:2], input_size=image.shape[:2])

    def predict(self, embedding, *, boxes_xyxy=None, points_xy=None, point_labels=None, multimask=True):
        out = [self.answers[tuple(float(v) for v in b)] for b in boxes_xyxy]
        logits = np.stack([o[0] for o in out]).astype(np.float32)
        return MaskPrediction(
            logits=logits,
            iou_pred=np.stack([o[1] for o in out]).astype(np.float32),
            low_res_logits=np.zeros((len(out), 3, 256, 256), np.float32),
        )

    def automatic_masks(self, image, **params):
        raise NotImplementedError


def test_choose_by_stability_prefers_stability_over_predicted_iou():
    shaky = _stable(_rect(10, 40, 10, 50))
    shaky[10:40, 10:30] = 0.5  # foreground, but inside the ±1 band: unstable
    logits = np.stack([np.stack([shaky, _stable(_rect(10, 40, 10, 50)), _stable(_rect(0, 5, 0, 5))])])
    index, stab = choose_by_stability(logits, np.array([[0.99, 0.7, 0.7]]))
    assert index.tolist() == [1] and stab.tolist() == [1.0]  # outputs 1 and 2 tie on stability and on IoU
    index, _ = choose_by_stability(logits, np.array([[0.99, 0.7, 0.8]]))
    assert index.tolist() == [2]  # stability tie → higher predicted IoU


def test_thresholds_rejections_and_cleanup():
    body = _rect(10, 40, 10, 50)
    with_defects = body.copy()
    with_defects[20:23, 20:23] = False  # a 9-pixel hole
    with_defects[50:54, 70:74] = True  # a 16-pixel island
    shaky = _stable(body)
    shaky[10:40, 10:30] = 0.5
    low_stab = np.full((H, W), -10.0, np.float32)
    low_stab[5:55, 5:75] = 0.5  # foreground everywhere inside, none of it above +1
    low_stab[5:10, 5:10] = 10.0
    empty = np.full((H, W), -10.0, np.float32)
    answers = {
        (1.0, 1.0, 50.0, 40.0): (
            np.stack([shaky, _stable(with_defects), shaky]),
            np.array([0.99, 0.7, 0.98]),
        ),
        (2.0, 2.0, 50.0, 40.0): (np.stack([_stable(body)] * 3), np.array([0.5, 0.55, 0.59])),
        (3.0, 3.0, 50.0, 40.0): (np.stack([low_stab] * 3), np.array([0.9, 0.9, 0.9])),
        (4.0, 4.0, 50.0, 40.0): (np.stack([empty] * 3), np.array([0.9, 0.9, 0.9])),
    }
    boxes = np.array(list(answers), np.float32)
    image = np.zeros((H, W, 3), np.uint8)
    res = masks_for_boxes(DesignedSegmenter(answers), image, boxes, MASKS_PARAMS)
    assert [r.reject_reason for r in res] == [None, LOW_PREDICTED_IOU, LOW_STABILITY, LOW_STABILITY]
    assert [r.multimask_index for r in res] == [1, 2, 0, 0]
    assert res[0].stability == 1.0 and res[0].predicted_iou == pytest.approx(0.7)
    assert np.array_equal(res[0].mask, body)  # hole filled, island removed
    assert res[1].predicted_iou == pytest.approx(0.59) and res[1].mask is None
    assert res[2].stability == pytest.approx(25 / (50 * 70)) and res[2].mask is None
    # Cleanup off: the defects stay. Stability threshold 0: the empty mask is rejected for being empty.
    res = masks_for_boxes(
        DesignedSegmenter(answers), image, boxes,
        replace(MASKS_PARAMS, cleanup_area=0, stability_score_thresh=0.0, pred_iou_thresh=0.5),
    )
    assert [r.reject_reason for r in res] == [None, None, None, EMPTY_MASK]
    assert np.array_equal(res[0].mask, with_defects)
    assert np.array_equal(res[2].mask, low_stab > 0)
    # A mask made only of small islands keeps its largest one (SAM's rule), so it is not empty.
    specks = np.zeros((H, W), bool)
    specks[0:3, 0:3] = specks[30:35, 30:35] = True
    answers = {(5.0, 5.0, 9.0, 9.0): (np.stack([_stable(specks)] * 3), np.array([0.9, 0.9, 0.9]))}
    (r,) = masks_for_boxes(DesignedSegmenter(answers), image, np.array([[5, 5, 9, 9]], np.float32), MASKS_PARAMS)
    assert r.kept and np.array_equal(r.mask, _rect(30, 35, 30, 35))


# ----------------------------------------------------------------------------------------------------- segments
def _box_rows() -> list[dict]:
    def expr(k, phrase, caption_index=0):
        return {
            "image_id": "img",
            "caption_index": caption_index,
            "source": "gt",
            "phrase_index": k,
            "phrase": phrase,
            "expression": phrase + " here",
            "phrase_start": 0,
            "phrase_end": len(phrase),
        }

    texts = [
        expr(0, "a dog"),
        expr(1, "a cat"),
        expr(2, "the dog", 1),
        expr(0, "a dog"),
        expr(3, "the scene"),
    ]
    return [
        box_row(e, GroundedBox(np.array([0, 0, 5, 5], np.float32), 0.5, e["phrase_index"]), i)
        for i, e in enumerate(texts)
    ]


def test_merge_segments_merges_texts_into_the_kept_mask():
    h, w = 50, 60
    m0 = np.zeros((h, w), bool)
    m0[5:25, 5:30] = True
    m1 = np.zeros((h, w), bool)
    m1[30:45, 35:55] = True
    m2 = np.zeros((h, w), bool)
    m2[5:25, 5:28] = True  # IoU with m0 = 460 / 500
    masks = [m0, m1, m2, m0.copy(), np.ones((h, w), bool)]
    ious = [0.8, 0.85, 0.9, 0.7, 1.0]
    rows = [
        box_mask_row(
            b["image_id"],
            b["box_index"],
            b["box_xyxy"],
            BoxMaskResult(m, iou, 0.95, -1 if i == 4 else 0, i == 4),
            [text_of(b)],
        )
        for i, (b, m, iou) in enumerate(zip(_box_rows(), masks, ious, strict=True))
    ]
    BOX_MASKS.table(rows)
    assert rows[0]["bbox"] == [5.0, 5.0, 25.0, 20.0] and rows[0]["area"] == 500
    for r, m in zip(rows, masks, strict=True):
        assert np.array_equal(segment_mask(r), m)

    segs = merge_segments(rows, UseSegmentsParams(segment_nms_iou=0.7))
    SEGMENTS.table(segs)
    assert [s["segment_id"] for s in segs] == [0, 1, 2]
    assert [s["box_indices"] for s in segs] == [[4], [2, 0, 3], [1]]
    assert [s["score"] for s in segs] == pytest.approx([1.0, 0.9, 0.85])
    assert [t["phrase"] for t in segs[1]["texts"]] == ["the dog", "a dog"]  # box 3's duplicate text dropped
    assert segs[1]["texts"][0] == {
        "phrase": "the dog",
        "expression": "the dog here",
        "source": "gt",
        "caption_index": 1,
    }
    for s, kept in zip(segs, [4, 2, 1], strict=True):
        assert np.array_equal(decode_rle({"size": [h, w], "counts": s["rle_counts"]}), masks[kept])
        assert s["area"] == masks[kept].sum() and s["rle_counts"] == rows[kept]["rle_counts"]
    assert segs[1]["bbox"] == [5.0, 5.0, 23.0, 20.0]
    assert merge_segments(rows, UseSegmentsParams(segment_nms_iou=1.0))[1]["box_indices"] == [2]
    assert merge_segments([], UseSegmentsParams()) == []
    with pytest.raises(ValueError, match="one image"):
        merge_segments([rows[0], {**rows[1], "image_id": "other"}], UseSegmentsParams())
    with pytest.raises(ValueError, match="rejected"):
        box_mask_row("img", 0, [0, 0, 5, 5], BoxMaskResult(None, 0.1, 0.9, 0, False, LOW_PREDICTED_IOU), [])


def test_merge_segments_agrees_with_mask_nms():
    rng = np.random.default_rng(3)
    h, w = 40, 50
    rows = []
    for i in range(30):
        y, x = rng.integers(0, 30), rng.integers(0, 40)
        m = np.zeros((h, w), bool)
        m[y : y + rng.integers(3, 12), x : x + rng.integers(3, 12)] = True
        rle = encode_rle(m)
        rows.append(
            {
                "image_id": "img",
                "box_index": 100 + i,
                "height": h,
                "width": w,
                "rle_counts": rle["counts"],
                "predicted_iou": float(rng.choice([0.7, 0.8, 0.9])),
                "texts": [
                    {"phrase": f"p{i % 7}", "expression": f"p{i % 7}", "source": "gt", "caption_index": 0}
                ],
            }
        )
    for thr in (0.3, 0.5, 0.7):
        segs = merge_segments(rows, UseSegmentsParams(segment_nms_iou=thr))
        groups = mask_nms(
            [{"size": [h, w], "counts": r["rle_counts"]} for r in rows],
            [r["predicted_iou"] for r in rows],
            thr,
        )
        assert [s["box_indices"] for s in segs] == [[100 + i for i in g] for g in groups]
        for s, g in zip(segs, groups, strict=True):
            want = list(dict.fromkeys(f"p{i % 7}" for i in g))
            assert [t["phrase"] for t in s["texts"]] == want
            assert s["rle_counts"] == rows[g[0]]["rle_counts"]


# ----------------------------------------------------------------------------------------------------- training texts
def _text(phrase: str, expression: str, caption_index: int = 0) -> dict:
    return {"phrase": phrase, "expression": expression, "source": "gt", "caption_index": caption_index}


# A hand-made segment table (SEGMENTS rows, texts only): the paper's example caption, merged by NMS.
TEXT_SEGMENTS = [
    {"segment_id": 0, "texts": [_text("the right side", "the right side of the rabbit"),
                                _text("the rabbit", "the rabbit")]},  # an unexpanded phrase is its own expression
    {"segment_id": 1, "texts": [_text("another red apple", "another red apple visible behind the rabbit"),
                                _text("an orange-red apple", "an orange-red apple"),
                                _text("another red apple", "another red apple visible behind the rabbit", 1)]},
    {"segment_id": 2, "texts": [_text("the rabbit", "the rabbit", 2)]},
    {"segment_id": 3, "texts": []},
]


class _WordClip:
    """encode_text stand-in: a deterministic unit vector per prompt (what each prompt was is all that matters)."""

    embed_dim = 8

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def encode_text(self, prompts):
        self.prompts += list(prompts)
        out = np.stack([np.random.default_rng(zlib.crc32(p.encode())).standard_normal(8) for p in prompts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def test_segment_text_pool_holds_phrases_and_expressions_each_once():
    """use-paper §3.1 "store both": a segment's texts are its noun phrases AND its referring expressions; the pool
    the text encoder embeds is every distinct one of them, each embedded once, with where it came from."""
    from pseudoseg.pipeline.features.cache import (
        TEXT_TEMPLATE_SETS,
        embed_texts,
        text_matrix,
        text_rows,
    )
    from pseudoseg.pipeline.features.params import UseTextParams
    from pseudoseg.pipeline.use.pairs import segment_texts, text_pool
    from pseudoseg.schemas.features import TEXT_EMBEDDINGS

    assert segment_texts(TEXT_SEGMENTS[0]["texts"]) == ["the right side", "the right side of the rabbit", "the rabbit"]
    assert segment_texts(TEXT_SEGMENTS[1]["texts"]) == [
        "another red apple", "another red apple visible behind the rabbit", "an orange-red apple"]
    assert segment_texts(TEXT_SEGMENTS[0]["texts"], ("expression",)) == ["the right side of the rabbit", "the rabbit"]
    assert segment_texts(TEXT_SEGMENTS[0]["texts"], ("phrase",)) == ["the right side", "the rabbit"]
    assert segment_texts(TEXT_SEGMENTS[3]["texts"]) == []
    with pytest.raises(ValueError):
        segment_texts(TEXT_SEGMENTS[0]["texts"], ("caption",))

    pool = text_pool(TEXT_SEGMENTS)
    assert pool == [
        ("an orange-red apple", True, True),
        ("another red apple", True, False),
        ("another red apple visible behind the rabbit", False, True),
        ("the rabbit", True, True),
        ("the right side", True, False),
        ("the right side of the rabbit", False, True),
    ]
    clip = _WordClip()
    texts = [t for t, _, _ in pool]
    # use-paper §4.2: "4 prompt templates including: a photo of {}, This is a photo of {}, There is {} in the scene,
    # and a photo of {} in the scene" — the default of [features_use] text_templates
    paper = ("a photo of {}", "This is a photo of {}", "There is {} in the scene", "a photo of {} in the scene")
    templates = TEXT_TEMPLATE_SETS[UseTextParams().text_templates]
    assert templates == paper
    emb = embed_texts(clip, texts, templates, batch_size=5)
    assert sorted(clip.prompts) == sorted(t.format(x) for x in texts for t in paper)  # each text once
    rows = text_rows(texts, emb, kind="segment_text", template_set="use4", as_phrase=[p for _, p, _ in pool],
                     as_expression=[x for _, _, x in pool])
    table = TEXT_EMBEDDINGS.table(rows)
    index, matrix = text_matrix([table, table])  # a second shard with the same texts adds nothing
    assert sorted(index) == texts and matrix.shape == (6, 8)
    every = {t for s in TEXT_SEGMENTS for t in segment_texts(s["texts"])}
    assert every == set(index)


def test_segment_texts_are_drawn_from_both_kinds_seeded():
    """use-paper §3.2: one text per segment per iteration, at random: over epochs every text of a segment comes
    up, phrases and expressions alike, uniformly; the same (seed, epoch, index) draws the same texts."""
    from pseudoseg.pipeline.features.cache import sample_rng
    from pseudoseg.pipeline.use.pairs import draw_segment_texts, segment_texts, text_pool

    index = {t: i for i, (t, _, _) in enumerate(text_pool(TEXT_SEGMENTS))}
    options = [[index[t] for t in segment_texts(s["texts"])] for s in TEXT_SEGMENTS[:3]]
    draws = np.stack([draw_segment_texts(options, sample_rng(0, epoch, 7)) for epoch in range(600)])
    for s, opts in enumerate(options):
        counts = np.array([(draws[:, s] == o).sum() for o in opts])
        assert set(np.unique(draws[:, s])) == set(opts)
        assert (np.abs(counts / len(draws) - 1 / len(opts)) < 0.07).all(), counts
    phrases_only = {index["the right side"], index["another red apple"]}
    expressions_only = {index["the right side of the rabbit"], index["another red apple visible behind the rabbit"]}
    assert phrases_only & set(draws.ravel()) and expressions_only & set(draws.ravel())
    again = np.stack([draw_segment_texts(options, sample_rng(0, epoch, 7)) for epoch in range(600)])
    assert np.array_equal(draws, again)
    assert not np.array_equal(draws, np.stack([draw_segment_texts(options, sample_rng(1, e, 7)) for e in range(600)]))
    with pytest.raises(ValueError):
        draw_segment_texts([[0], []], np.random.default_rng(0))


def test_text_embeddings_of_an_older_version_fail_clearly(tmp_path):
    """v1 (expressions only, no as_phrase / as_expression) must not be read as a v2 pool."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pseudoseg.schemas.contract import META_KEY, SchemaError
    from pseudoseg.schemas.features import TEXT_EMBEDDINGS

    v1 = pa.table({"text": ["a dog"], "kind": ["expression"], "class_index": pa.array([-1], pa.int32()),
                   "template_set": ["use4"], "embedding": [[1.0, 0.0]], "dim": pa.array([2], pa.int32())})
    path = tmp_path / "shard-000000.parquet"
    pq.write_table(v1.replace_schema_metadata({META_KEY: b"text_embeddings/v1"}), path)
    with pytest.raises(SchemaError, match="expected text_embeddings/v2, found text_embeddings/v1"):
        TEXT_EMBEDDINGS.read_parquet(path)


# ----------------------------------------------------------------------------------------------------- end to end
def test_oracle_image_end_to_end(nlp, gt):
    """captions → expressions → boxes → masks → segments on the VOC photo: every segment is a GT instance and its
    texts name that instance's class."""
    image = gt.rgb
    caps = caption_rows(
        "voc",
        ["A person sits on a chair.", "A bottle stands on the table."],
        ["a photo of a person, a chair and a table."],
        "oracle",
    )
    boxes = []
    for cap in caps:
        rows = expression_rows(cap, nlp, EXPRESSIONS_PARAMS)
        for b in ground_caption(
            OracleGrounder(gt),
            image,
            cap["caption"],
            _phrase_spans(rows),
            BOXES_PARAMS,
            sentence_spans=caption_sentence_spans(cap["caption"], nlp),
        ):
            boxes.append(box_row(rows[b.phrase_index], b, len(boxes)))
    BOXES.table(boxes)
    results = masks_for_boxes(
        OracleSegmenter(gt), image, np.array([b["box_xyxy"] for b in boxes], np.float32), MASKS_PARAMS
    )
    mask_rows = [
        box_mask_row(b["image_id"], b["box_index"], b["box_xyxy"], r, [text_of(b)])
        for b, r in zip(boxes, results, strict=True)
        if r.kept
    ]
    assert len(mask_rows) == len(boxes)
    segs = merge_segments(mask_rows, UseSegmentsParams())
    SEGMENTS.table(segs)
    assert sorted(i for s in segs for i in s["box_indices"]) == list(range(len(boxes)))
    for s in segs:
        mask = segment_mask(s)
        k = int(np.bincount(gt.instance_label[mask]).argmax())
        assert np.array_equal(mask, clean_mask(gt.instance_label == k, MASKS_PARAMS.cleanup_area))
        for t in s["texts"]:
            assert gt.class_in_text(t["phrase"]) == int(gt.instance_classes[k])
    # The same instance found from three captions is one segment carrying the three texts.
    person = [s for s in segs if {t["phrase"] for t in s["texts"]} >= {"A person", "a person"}]
    assert person and {t["caption_index"] for t in person[0]["texts"]} == {0, 2}
