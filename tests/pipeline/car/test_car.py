import dataclasses
import platform

import cv2
import numpy as np
import pytest
import torch

from pseudoseg.pipeline.car.recurrent import (
    CAR_DEFAULTS,
    CaRMethod,
    CarParams,
    affinity_refine,
    apply_visual_prompts,
    cam_box_mask,
    car_family,
    car_loop,
    car_params,
    clip_classifier,
    iom,
    masks_to_label_map,
    official_query_name,
    prompt_image,
    proposals_to_labels,
    sam_ensemble,
    sinkhorn_affinity,
)
from pseudoseg.pipeline.core.transforms import resize_label_map
from pseudoseg.pipeline.eval.metrics import miou
from tests import official
from tests.oracles import OracleCam, OracleClassifier, OracleSegmenter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_loop_drops_absent_and_stops(gt):
    fg = list(gt.class_names[1:])
    cam = OracleCam(gt)
    params = CarParams(prompts=("black",), crf=False)
    res = car_loop(gt.rgb, fg, cam, OracleClassifier(gt), params)
    present = {gt.class_names[c] for c in np.unique(gt.class_label) if c not in (0, 255)}
    assert set(res.queries) == present
    assert len(res.steps) == 2 and len(res.steps[0].queries) == 20 and res.steps[1].queries == res.queries
    assert (res.steps[-1].scores > params.theta).all()
    assert res.proposals.shape == (len(present), *gt.size)
    # official CAM texts (car.py cam_text_template): the bare names at the first step, "a clean origami {}." after
    assert cam.calls[0] == fg and cam.calls[1] == [f"a clean origami {q}." for q in res.queries]
    assert len(cam.calls) == 2


def test_loop_first_step_never_ends_it_and_best_query_is_kept(gt):
    """Official stopping rule: the loop ends when a step keeps every query it scored, never at the first step;
    when no query passes θ the best one is kept (the set never empties) and, alone, it then scores 1."""
    present = [gt.class_names[c] for c in np.unique(gt.class_label) if c not in (0, 255)]
    cam = OracleCam(gt)
    res = car_loop(gt.rgb, present, cam, OracleClassifier(gt), CarParams(prompts=("black",), crf=False))
    assert len(res.steps) == 2 and res.queries == tuple(present)  # all kept at step 1, still a second step

    def flat(images, queries):  # no query ever passes θ = 0.6; "dog" (not the first) is the best
        p = np.full((len(images), len(queries)), 1.0 / len(queries))
        if len(queries) > 1:
            p[:, queries.index("dog")] += 0.1
            p /= p.sum(1, keepdims=True)
        return p

    res = car_loop(gt.rgb, ["cat", "dog", "person"], cam, flat, CarParams(prompts=("black",), crf=False))
    assert res.queries == ("dog",) and res.proposals.shape == (1, *gt.size)
    assert [s.queries for s in res.steps] == [("cat", "dog", "person"), ("dog",)]
    np.testing.assert_allclose(res.steps[-1].scores, [1.0])
    seg = CaRMethod(cam, flat, CarParams(prompts=("black",), crf=False))
    _, scores = seg.segment(gt.rgb, ["background", "cat", "dog", "person"])
    assert 0 < scores[2] < 0.6  # the lowest score over the steps: the fallback stays below θ

    def exactly_theta(images, queries):  # P_ii = θ exactly (in float32, as the official torch scores): not kept
        p = np.full((len(images), len(queries)), 0.1)
        for i, q in enumerate(queries):
            p[i, i] = {"cat": 0.6, "dog": 0.6, "person": 0.9}[q]
        return p.astype(np.float32)

    res = car_loop(gt.rgb, ["cat", "dog", "person"], cam, exactly_theta, CarParams(prompts=("black",), crf=False))
    assert res.steps[0].queries == ("cat", "dog", "person") and res.queries == ("person",)


def test_loop_reuses_the_previous_proposals_when_all_are_zero(gt):
    """Official _forward_car: a step whose proposals are all zero keeps the previous step's (of the same queries);
    a first step has no previous one and keeps its zeros."""
    h, w = gt.size
    first = np.zeros((3, h, w), np.float32)
    first[0, :10], first[1, 10:20], first[2, 20:30] = 0.9, 0.8, 0.7

    def cam(image, queries, background):  # maps at the first step only, all zero after
        return first.copy() if queries[0] == "cat" else np.zeros((len(queries), h, w), np.float32)

    def drop_dog(images, queries):
        return np.eye(len(queries))[: len(images)] * np.array([0.1 if q == "dog" else 0.9 for q in queries])[:, None]

    res = car_loop(gt.rgb, ["cat", "dog", "person"], cam, drop_dog, CarParams(crf=False))
    assert res.queries == ("cat", "person") and len(res.steps) == 2
    np.testing.assert_array_equal(res.proposals, first[[0, 2]])  # not the second step's zeros, rows of cat/person
    zero = car_loop(gt.rgb, ["dog", "cow"], lambda im, q, b: np.zeros((len(q), h, w), np.float32),
                    lambda im, q: np.eye(len(q))[: len(im)], CarParams(crf=False))
    assert zero.queries == ("dog", "cow") and not zero.proposals.any()


def test_loop_has_no_step_cap_below_the_query_count(gt):
    """The official loop runs until no query is dropped (`while True`): 40 queries dropped one per step take 40
    steps with the default parameters; a cap is only a safety net, reported when reached."""
    queries = [f"q{i}" for i in range(40)]

    def cam(image, qs, background):
        return np.full((len(qs), 8, 8), 0.5, np.float32)

    def drop_last(images, qs):  # every query but the last one passes θ
        return np.eye(len(qs))[: len(images)] * np.array([0.9] * (len(qs) - 1) + [0.1 if len(qs) > 1 else 1.0])

    res = car_loop(gt.rgb[:8, :8], queries, cam, drop_last, CarParams())
    assert len(res.steps) == 40 and res.queries == ("q0",) and not res.capped
    capped = car_loop(gt.rgb[:8, :8], queries, cam, drop_last, CarParams(max_steps=5))
    assert capped.capped and len(capped.steps) == 5 and len(capped.queries) == 35


def test_mutual_background_for_stuff(gt):
    """car-paper App. E / official evaluate.py: stuff classes run a second loop whose background queries are the
    thing classes (as "a clean origami {}."), with the stuff visual prompts; things use the 23 official
    background queries; stuff is painted first, things on top."""
    calls = []

    def cam(image, queries, background):
        calls.append((tuple(queries), tuple(background)))
        h, w = image.shape[:2]
        out = np.zeros((len(queries), h, w), np.float32)
        for i, q in enumerate(queries):
            if "sky" in q:
                out[i, : h // 2] = 1.0  # top half
            if "person" in q:
                out[i, h // 4 : h // 2, : w // 2] = 1.0  # overlaps the sky: things end on top
        return out

    def classify(images, queries):
        return np.eye(len(queries))[: len(images)]

    params = dataclasses.replace(CAR_DEFAULTS["context"], crf=False, stuff=("sky", "grass"))
    seg = CaRMethod(cam, classify, params)
    names = ["background", "person", "sky", "cat", "grass"]
    label, _ = seg.segment(gt.rgb, names)
    stuff_calls = [c for c in calls if c[0][0] in ("sky", "grass", "a clean origami sky.")]
    thing_calls = [c for c in calls if c not in stuff_calls]
    assert stuff_calls and thing_calls
    assert all(bg == ("a clean origami person.", "a clean origami cat.") for _, bg in stuff_calls)
    assert all(bg == tuple(f"a clean origami {q}." for q in OFFICIAL_BG_CLS) for _, bg in thing_calls)
    h, w = gt.size
    assert (label[h // 4 : h // 2, : w // 2] == 1).all()  # person over sky
    assert (label[: h // 4] == 2).all() and (label[h // 2 :] == 0).all()
    # without a background class (PC-59): what neither pass claims stays unlabelled, as the official code
    no_bg, _ = seg.segment(gt.rgb, names[1:])
    assert (no_bg[h // 4 : h // 2, : w // 2] == 0).all() and (no_bg[: h // 4] == 1).all()
    assert (no_bg[h // 2 :] == 255).all()


def test_post_processing_background_unary_and_score_order():
    """Official PostProcess: background = (1 - max proposal)^bg_factor; official assign_label: masks painted in
    ascending score order (the most confident on top)."""
    img = np.zeros((2, 3, 3), np.uint8)
    p = np.array([[[0.9, 0.3, 0.0], [0.2, 0.6, 0.0]], [[0.1, 0.5, 0.45], [0.0, 0.0, 0.1]]], np.float32)
    # bg = 1 - max = [[0.1, 0.5, 0.55], [0.8, 0.4, 0.9]] → argmax over [bg, p0, p1]
    lab = proposals_to_labels(img, p, crf=False, background=True)
    np.testing.assert_array_equal(lab, [[0, -1, -1], [-1, 0, -1]])
    lab2 = proposals_to_labels(img, p, crf=False, background=True, bg_factor=2.0)  # bg = (1 - max)^2
    np.testing.assert_array_equal(lab2, [[0, 1, 1], [-1, 0, -1]])
    np.testing.assert_array_equal(proposals_to_labels(img, p, crf=False, background=False), [[0, 1, 1], [0, 0, 1]])
    masks = np.zeros((2, 2, 3), bool)
    masks[0, 0] = masks[1, :, 0] = True
    np.testing.assert_array_equal(masks_to_label_map(masks, [5, 7], [0.9, 0.4], 0), [[5, 5, 5], [7, 0, 0]])
    np.testing.assert_array_equal(masks_to_label_map(masks, [5, 7], [0.3, 0.4], 0), [[7, 5, 5], [7, 0, 0]])


def official_postprocess(image: np.ndarray, cams: np.ndarray, *, srgb: float = 3, bgr: bool = True,
                         wrap: bool = True, as_is: bool = False) -> np.ndarray:
    """clip_as_rnn crf.py PostProcess (separate=False, bg_factor 1) written from its text on pydensecrf, the package
    it calls: the photo as float32 BGR minus (104.008, 116.669, 122.675) cast to uint8 — on x86, where the published
    numbers were made, the cast truncates toward zero and keeps the low 8 bits (wrap=False: saturates instead;
    as_is: the photo itself) — the background score (1 - max)^1 stacked first, unary_from_softmax, Gaussian sxy 1
    compat 3, bilateral sxy 67 srgb 3 compat 4, 10 iterations; argmax - 1 (-1 = background)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    photo = image.astype(np.float32)[:, :, ::-1] if bgr else image.astype(np.float32)
    shifted = photo - np.array((104.008, 116.669, 122.675), np.float32)
    if as_is:
        cast = image
    elif wrap:
        cast = np.trunc(shifted).astype(np.int16).astype(np.uint8)  # integer → uint8 wraps on every platform
        if platform.machine().lower() in ("x86_64", "amd64"):
            np.testing.assert_array_equal(cast, shifted.astype(np.uint8))  # the official cast itself, here
    else:
        cast = np.clip(np.trunc(shifted), 0, 255).astype(np.uint8)
    probs = np.concatenate([1 - cams.max(0, keepdims=True), cams]).astype(np.float32)
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=srgb, rgbim=np.ascontiguousarray(cast), compat=4)
    return np.array(d.inference(10)).reshape(c, h, w).argmax(0) - 1


def fixed_proposals(maps: np.ndarray):
    """A CamFn returning `maps` for any query list of their length, and a ClassifyFn keeping every query."""
    def cam(image, queries, background):
        return maps[: len(queries)].copy()

    def classify(images, queries):
        return np.eye(len(queries))[: len(images)]

    return cam, classify


def test_dense_crf_is_the_official_postprocess():
    """CaR's post-processing with the default parameters equals the official crf.py PostProcess (written out above):
    the CRF's bilateral kernel sees the wrapped mean-subtracted BGR copy (`[car] crf_image = official`), srgb 3.
    The photo and proposals are chosen so that the RGB photo, an unflipped or a saturated copy, or srgb 13 would
    each label pixels differently."""
    rng = np.random.default_rng(5)
    h, w = 48, 64
    blocks = rng.integers(0, 256, (h // 8, w // 8, 3)).astype(np.uint8)
    image = np.clip(np.kron(blocks, np.ones((8, 8, 1))) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    maps = np.stack([cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 6) for _ in range(3)])
    maps = (maps - maps.min()) / (maps.max() - maps.min())
    want = official_postprocess(image, maps)
    for variant in ({"srgb": 13}, {"bgr": False}, {"wrap": False}, {"as_is": True}):
        assert (official_postprocess(image, maps, **variant) != want).sum() > 20, variant
    cam, classify = fixed_proposals(maps)
    label, _ = CaRMethod(cam, classify, CarParams(prompts=("black",))).segment(image, ["background", "a", "b", "c"])
    np.testing.assert_array_equal(label.astype(int), want + 1)
    rgb = CaRMethod(cam, classify, CarParams(prompts=("black",), crf_image="rgb")).segment(
        image, ["background", "a", "b", "c"])[0]
    np.testing.assert_array_equal(rgb.astype(int), official_postprocess(image, maps, as_is=True) + 1)


def test_no_background_benchmarks_keep_the_background_channel():
    """Official evaluate.py on VOC-20, PC-59, ADE (ignore_background): the CRF still has the background channel,
    the pixels it wins stay unlabelled (assign_label's 0, dropped from the score) — here 255; never the best class."""
    h, w = 20, 30
    maps = np.zeros((2, h, w), np.float32)
    maps[0, :10] = 0.9  # top half: class a; bottom half: every proposal weak, the background (1 - 0.1) wins
    maps[1] = 0.1
    cam, classify = fixed_proposals(maps)
    image = np.full((h, w, 3), 120, np.uint8)
    for crf in (False, True):
        label, _ = CaRMethod(cam, classify, CarParams(prompts=("black",), crf=crf)).segment(image, ["a", "b"])
        assert (label[:10] == 0).all() and (label[10:] == 255).all(), crf
        with_bg, _ = CaRMethod(cam, classify, CarParams(prompts=("black",), crf=crf)).segment(
            image, ["background", "a", "b"])
        assert (with_bg[:10] == 1).all() and (with_bg[10:] == 0).all(), crf


def test_clip_classifier_is_the_official_template_ensemble():
    """g's score (official forward_clip): per template softmax(logit_scale · cos), summed over templates, softmaxed
    again; images through CLIP's centre crop; the penultimate-block CLS (skip_last_block) is what is asked for."""
    rng = np.random.default_rng(0)
    templates = ("a {}.", "b {}.", "c {}.")
    queries = ["cat", "dog"]
    text = {f"{t[0]} {q}.": v / np.linalg.norm(v) for t in templates for q in queries
            for v in [rng.normal(size=8)]}
    img_emb = rng.normal(size=(3, 8))
    img_emb /= np.linalg.norm(img_emb, axis=1, keepdims=True)
    asked = {}

    class FakeClip:
        image_size, logit_scale = 4, 100.0

        def encode_text(self, texts):
            return np.stack([text[t] for t in texts])

        def encode_image_car(self, crops, skip_last_block):
            asked.update(shape=crops.shape, skip=skip_last_block)
            return img_emb

    images = rng.integers(0, 255, (3, 6, 10, 3), dtype=np.uint8)
    p = clip_classifier(FakeClip(), templates)(images, queries)
    assert asked == {"shape": (3, 4, 4, 3), "skip": True}
    ref = np.zeros((3, 2))
    for t in templates:
        logits = 100.0 * img_emb @ np.stack([text[t.format(q)] for q in queries]).T
        e = np.exp(logits - logits.max(1, keepdims=True))
        ref += e / e.sum(1, keepdims=True)
    ref = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)
    np.testing.assert_allclose(p, ref, rtol=1e-12)


@pytest.mark.parametrize("crf", [False, True])
def test_car_segmenter_oracle(gt, crf):
    seg = CaRMethod(OracleCam(gt), OracleClassifier(gt), CarParams(prompts=("black",), crf=crf))
    label, scores = seg.segment(gt.rgb, list(gt.class_names))
    m, per = miou([label], [gt.class_label], 21)
    print(f"CaR oracle mIoU (crf={crf})", m, np.round(per[~np.isnan(per)], 3))
    # The oracle's CAMs are exact, so the CRF (colour-driven smoothing) can only lose detail (thin chair legs).
    assert m >= (0.75 if crf else 0.9)
    assert scores[15] > 0.6 and scores[gt.class_names.index("cat")] < 0.6


def test_car_empty_queries(gt):
    res = car_loop(gt.rgb, [], OracleCam(gt), OracleClassifier(gt), CarParams(crf=False))
    assert res.queries == () and res.proposals.shape == (0, *gt.size)


def test_visual_prompts(gt):
    mask = np.zeros(gt.size, bool)
    mask[100:200, 150:300] = True
    out = apply_visual_prompts(gt.rgb, mask, ("circle", "blur", "gray", "contour", "rectangle"))
    assert out.shape == gt.rgb.shape and out.dtype == np.uint8
    black = apply_visual_prompts(gt.rgb, mask, ("black",))
    assert (black[~mask] == 0).all() and (black[mask] == gt.rgb[mask]).all()
    with pytest.raises(ValueError):
        apply_visual_prompts(gt.rgb, mask, ("sparkles",))


def test_visual_prompts_as_the_official_code():
    """Official `apply_visual_prompts`: 1 px red ellipse centred on the mask's (truncated) mean pixel with half its
    pixel extents as axes; "gray" with OpenCV's BGR weights applied to the RGB array; "blur" = cv2.GaussianBlur
    15 × 15 (sigma from the size) outside the mask; CaR.apply_visual_prompts leaves the image unprompted when the
    proposal sums to at most 1 (`torch.sum(mask) <= 1`), else prompts `proposal > η`."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    region = np.zeros((40, 60), bool)
    region[10:30, 20:45] = True
    blurred = apply_visual_prompts(photo, region, ("blur",))
    np.testing.assert_array_equal(blurred[~region], cv2.GaussianBlur(photo, (15, 15), 0)[~region])
    np.testing.assert_array_equal(blurred[region], photo[region])
    one = np.zeros((40, 60), np.float32)
    one[5, 5] = 1.0  # sums to exactly 1: not prompted
    np.testing.assert_array_equal(prompt_image(photo, one, 0.4, ("blur",)), photo)
    one[6, 6] = 0.5  # 1.5: prompted with the mask one > η
    np.testing.assert_array_equal(prompt_image(photo, one, 0.4, ("blur",)), apply_visual_prompts(
        photo, one > 0.4, ("blur",)))
    assert (prompt_image(photo, one, 0.4, ("blur",)) != photo).any()

    img = np.full((40, 60, 3), 80, np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[10:20, 10:40] = True
    mask[10:12, 40:50] = True  # a tail: the mean pixel is left of the box centre
    ys, xs = np.nonzero(mask)
    center = (int(xs.mean()), int(ys.mean()))
    axes = ((xs.max() - xs.min() + 1) // 2, (ys.max() - ys.min() + 1) // 2)
    expected = cv2.ellipse(img.copy(), center, axes, 0, 0, 360, (255, 0, 0), 1)
    np.testing.assert_array_equal(apply_visual_prompts(img, mask, ("circle",)), expected)
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 200  # pure red: BGR weights give 0.114 · 200 ≈ 23 (RGB weights would give 60)
    gray = apply_visual_prompts(rgb, np.zeros((4, 4), bool), ("gray",))
    assert (gray == 23).all()


def test_iom_and_sam_ensemble(gt):
    a = np.zeros((10, 10), bool)
    a[:5] = True
    b = np.zeros((10, 10), bool)
    b[:2] = True
    assert iom(a, b) == 1.0 and iom(a, np.zeros_like(a)) == 0.0
    # CaR's coarse person mask, SAM's exact instances: the matched union replaces it
    person = gt.class_label == 15
    coarse = person.copy()
    coarse[::7] = False
    sam = [r["segmentation"] for r in OracleSegmenter(gt).automatic_masks(gt.rgb)]
    out = sam_ensemble(coarse[None], sam)
    assert (out[0] == (gt.instance_label > 0) & np.isin(gt.instance_label, np.flatnonzero(
        gt.instance_classes == 15))).all()
    # no match above phi_iou → kept
    tiny = np.zeros_like(person)
    tiny[:3, :3] = True
    assert (sam_ensemble(tiny[None], sam)[0] == tiny).all()
    # matched by IoM (half of one SAM mask: IoM 1) but the union's IoU with it is about 0.5 < φ_iou: kept
    big = max(sam, key=lambda m: (m & person).sum())
    ys, xs = np.nonzero(big)
    part = np.zeros_like(person)
    part[ys[: len(ys) // 2], xs[: len(xs) // 2]] = True
    assert iom(big, part) == 1.0
    assert (sam_ensemble(part[None], sam)[0] == part).all()


# The official configs (clip_as_rnn configs/voc.yaml, coco.yaml, pascal_context.yaml, ade_150.yaml), written out.
OFFICIAL_BG_CLS = ("ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
                   "railway", "railroad", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock", "street",
                   "valley", "bridge")
OFFICIAL_SEMANTIC_TEMPLATES = (
    "a clean origami {}.", "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene",
    "There is the {} in the scene", "a photo of a {} in the scene", "a photo of a small {}.",
    "a photo of a medium {}.", "a photo of a large {}.", "This is a photo of a small {}.",
    "This is a photo of a medium {}.", "This is a photo of a large {}.", "There is a small {} in the scene.",
    "There is a medium {} in the scene.", "There is a large {} in the scene.")
# data/context.py PASCAL_CONTEXT_STUFF_CLASS and data/ade.py ADE_STUFF_CLASS (by their dataset names)
OFFICIAL_CONTEXT_STUFF = {"bedclothes", "ceiling", "cloth", "curtain", "floor", "grass", "ground", "light",
                          "mountain", "platform", "road", "sidewalk", "sky", "snow", "wall", "water", "window", "wood",
                          "door", "fence", "rock"}
OFFICIAL_ADE_STUFF = {"wall", "sky", "floor", "tree", "ceiling", "road", "grass", "earth", "mountain", "plant", "water",
                      "sea", "field", "sand", "skyscraper", "path", "river", "bridge", "flower", "hill", "land",
                      "dirt track", "apparel", "lake", "waterfall"}


def test_defaults_are_the_official_configs():
    """configs/voc.yaml, coco.yaml, pascal_context.yaml, ade_150.yaml: mask_threshold (η), confidence_threshold (θ),
    clipes_threshold (λ), visual_prompt_type, stuff_visual_prompt_type, bg_cls, semantic_templates; car.py's
    cam_text_template; crf.py's PostProcess (bg_factor 1, the mean-subtracted BGR image); car-paper §4's SAM
    thresholds (0.7); no background query left out (the official loop filters none)."""
    voc, coco, ctx, ade = (car_params(n) for n in ("voc21", "coco_object", "context60", "ade150"))
    assert (voc.eta, voc.theta, voc.lam, voc.prompts) == (0.4, 0.6, 0.4, ("circle", "blur"))
    assert (coco.eta, coco.theta, coco.lam, coco.prompts) == (0.5, 0.3, 0.5, ("blur", "gray"))
    assert (ctx.eta, ctx.theta, ctx.lam, ctx.prompts, ctx.stuff_prompts) == \
        (0.6, 0.25, 0.4, ("blur", "circle"), ("blur", "gray"))
    assert (ade.eta, ade.theta, ade.lam, ade.prompts, ade.stuff_prompts) == \
        (0.6, 0.25, 0.7, ("gray", "blur"), ("gray", "blur"))
    assert set(ctx.stuff) == OFFICIAL_CONTEXT_STUFF and len(ctx.stuff) == 21
    assert set(ade.stuff) == OFFICIAL_ADE_STUFF and len(ade.stuff) == 25 and not voc.stuff and not coco.stuff
    assert car_params("context59") == ctx and car_params("voc20") == voc == CAR_DEFAULTS["voc"]
    assert car_params("coco_object80") == coco and car_params("cityscapes19") == voc
    for p in (voc, coco, ctx, ade):
        assert p.background == OFFICIAL_BG_CLS and not p.drop_background_queries
        assert p.classifier_templates == OFFICIAL_SEMANTIC_TEMPLATES and p.cam_template == "a clean origami {}."
        assert p.raw_first_step and p.classifier_skip_last_block and p.cam == "clip_es"
        assert p.crf and p.bg_factor == 1.0 and p.crf_image == "official"
        assert (p.phi_iom, p.phi_iou) == (0.7, 0.7)
    from pseudoseg.pipeline.core.vocabularies import load_vocabulary

    assert set(ctx.stuff) <= set(load_vocabulary("context59").classes)  # official ids → our class names
    assert set(ade.stuff) <= set(load_vocabulary("ade150").classes)


# The official query texts in the order of our vocabularies: data/voc.py VOC_CLASSES, data/context.py
# PASCAL_CONTEXT_CLASSES, data/coco.py COCO_OBJECT_CLASSES, data/ade.py ADE_CLASSES.
OFFICIAL_VOC_CLASSES = [
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow", "diningtable",
    "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor screen"]
OFFICIAL_CONTEXT_CLASSES = [
    "airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building", "bus",
    "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door", "fence",
    "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "plant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow",
    "sofa", "table", "track", "train", "tree", "truck", "monitor", "wall", "water", "window", "wood"]
OFFICIAL_COCO_OBJECT_CLASSES = [
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird avian", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack,bag", "umbrella,parasol", "handbag,purse",
    "necktie", "suitcase", "frisbee", "skis", "sknowboard", "sports ball", "kite", "baseball bat", "glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "dessertspoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair seat",
    "sofa", "pottedplant", "bed", "diningtable", "toilet", "tvmonitor screen", "laptop", "mouse", "remote control",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hairdrier,blowdrier", "toothbrush"]
OFFICIAL_ADE_CLASSES = [
    "wall", "building, edifice", "sky", "floor, flooring", "tree", "ceiling", "road, route", "bed",
    "windowpane, window", "grass", "cabinet", "sidewalk, pavement",
    "person, individual, someone, somebody, mortal, soul", "earth, ground", "door, double, door", "table",
    "mountain, mount", "plant, flora, plant, life", "curtain, drape, drapery, mantle, pall", "chair",
    "car, auto, automobile, machine, motorcar", "water", "painting, picture", "sofa, couch, lounge", "shelf", "house",
    "sea", "mirror", "rug, carpet, carpeting", "field", "armchair", "seat", "fence, fencing", "desk", "rock, stone",
    "wardrobe, closet, press", "lamp", "bathtub, bathing, tub, bath, tub", "railing, rail", "cushion",
    "base, pedestal, stand", "box", "column, pillar", "signboard, sign", "chest, of, drawers, chest, bureau, dresser",
    "counter", "sand", "sink", "skyscraper", "fireplace, hearth, open, fireplace", "refrigerator, icebox",
    "grandstand, covered, stand", "path", "stairs, steps", "runway", "case, display, case, showcase, vitrine",
    "pool, table, billiard, table, snooker, table", "pillow", "screen, door, screen", "stairway, staircase", "river",
    "bridge, span", "bookcase", "blind, screen", "coffee, table, cocktail, table",
    "toilet, can, commode, crapper, pot, potty, stool, throne", "flower", "book", "hill", "bench", "countertop",
    "stove, kitchen, stove, range, kitchen, range, cooking, stove", "palm, palm, tree", "kitchen, island",
    "computer, computing, machine, computing, device, data, processor, electronic, computer, information, "
    "processing, system", "swivel, chair", "boat", "bar", "arcade, machine", "hovel, hut, hutch, shack, shanty",
    "bus, autobus, coach, charabanc, double-decker, jitney, motorbus, motorcoach, omnibus, passenger, vehicle",
    "towel", "light, light, source", "truck, motortruck", "tower", "chandelier, pendant, pendent",
    "awning, sunshade, sunblind", "streetlight, street, lamp", "booth, cubicle, stall, kiosk",
    "television, television, receiver, television, set, tv, tv, set, idiot, box, boob, tube, telly, goggle, box",
    "airplane, aeroplane, plane", "dirt, track", "apparel, wearing, apparel, dress, clothes", "pole",
    "land, ground, soil", "bannister, banister, balustrade, balusters, handrail",
    "escalator, moving, staircase, moving, stairway", "ottoman, pouf, pouffe, puff, hassock", "bottle",
    "buffet, counter, sideboard", "poster, posting, placard, notice, bill, card", "stage", "van", "ship", "fountain",
    "conveyer, belt, conveyor, belt, conveyer, conveyor, transporter", "canopy",
    "washer, automatic, washer, washing, machine", "plaything, toy", "swimming, pool, swimming, bath, natatorium",
    "stool", "barrel, cask", "basket, handbasket", "waterfall, falls", "tent, collapsible, shelter", "bag",
    "minibike, motorbike", "cradle", "oven", "ball", "food, solid, food", "step, stair", "tank, storage, tank",
    "trade, name, brand, name, brand, marque", "microwave, microwave, oven", "pot, flowerpot",
    "animal, animate, being, beast, brute, creature, fauna", "bicycle, bike, wheel, cycle", "lake",
    "dishwasher, dish, washer, dishwashing, machine", "screen, silver, screen, projection, screen", "blanket, cover",
    "sculpture", "hood, exhaust, hood", "sconce", "vase", "traffic, light, traffic, signal, stoplight", "tray",
    "ashcan, trash, can, garbage, can, wastebin, ash, bin, ash-bin, ashbin, dustbin, trash, barrel, trash, bin",
    "fan", "pier, wharf, wharfage, dock", "crt, screen", "plate", "monitor, monitoring, device",
    "bulletin, board, notice, board", "shower", "radiator", "glass, drinking, glass", "clock", "flag"]


@pytest.mark.parametrize(("benchmark", "official"), [
    ("voc20", OFFICIAL_VOC_CLASSES), ("context59", OFFICIAL_CONTEXT_CLASSES),
    ("coco_object80", OFFICIAL_COCO_OBJECT_CLASSES), ("ade150", OFFICIAL_ADE_CLASSES)])
def test_query_names_are_the_official_class_lists(benchmark, official):
    """CaR queries each benchmark class by the official code's name list (as Evaluate does: the benchmark's family,
    `official_query_name`); the stuff classes of the mutual-background pass are found among those queries."""
    from pseudoseg.pipeline.core.vocabularies import load_vocabulary

    family = car_family(benchmark)
    classes = load_vocabulary(benchmark).classes
    assert [official_query_name(family, c) for c in classes] == official
    stuff = {official_query_name(family, c) for c in car_params(benchmark).stuff}
    assert stuff <= set(official)


def test_official_benchmarks_keep_all_23_background_queries(gt):
    """The official code leaves no background query out of f's softmax, also one equal to a query: Pascal Context's
    thing pass queries "building" and "tree" and still has all 23 (from the second step on a query's CAM text and
    a background text are the same)."""
    calls = []

    def cam(image, queries, background):
        calls.append((tuple(queries), tuple(background)))
        return np.zeros((len(queries), *image.shape[:2]), np.float32)

    def classify(images, queries):
        return np.eye(len(queries))[: len(images)]

    seg = CaRMethod(cam, classify, dataclasses.replace(car_params("context59"), crf=False))
    seg.segment(gt.rgb, ["building", "tree", "sky", "cat"])
    things = [bg for queries, bg in calls if "sky" not in queries and "a clean origami sky." not in queries]
    assert len(things) == 2 and all(bg == tuple(f"a clean origami {q}." for q in OFFICIAL_BG_CLS) for bg in things)


def test_label_runs_leave_background_queries_equal_to_a_query_out(gt):
    """The CaR label source (pipeline.car.params.car_label_params) is no official benchmark: with a vocabulary such as
    coco_stuff171 the background queries equal to one of its classes (grass, tree, wall, sky, ...) are left out of
    f's softmax; the others stay."""
    from pseudoseg.pipeline.car.params import CaRLabelsParams, CarSettings, car_label_params
    from pseudoseg.pipeline.core.vocabularies import load_vocabulary

    vocab = load_vocabulary("coco_stuff171")
    params = dataclasses.replace(car_label_params(CaRLabelsParams(), vocab.name, CarSettings()), crf=False)
    seen = []

    def cam(image, queries, background):
        seen.append(tuple(background))
        return np.zeros((len(queries), *image.shape[:2]), np.float32)

    assert vocab.prompts[vocab.index("sky-other")][0] == "sky"  # what tasks/stages/car_labels.py queries for it
    car_loop(gt.rgb, ["grass", "sky", "tree", "person"], cam, lambda im, q: np.eye(len(q))[: len(im)], params)
    kept = tuple(f"a clean origami {q}." for q in OFFICIAL_BG_CLS if q not in ("grass", "sky", "tree"))
    assert seen and all(bg == kept for bg in seen)


def test_gradcam_and_clip_adapters_tiny(tiny_cache, gt):
    from pseudoseg.models.adapters import tiny
    from pseudoseg.models.adapters.clip import HFClipEncoder
    from pseudoseg.pipeline.car.recurrent import clip_cam

    f = HFClipEncoder(str(tiny.ensure_tiny("cam_clip", tiny_cache)), device="cpu")
    g = HFClipEncoder(str(tiny.ensure_tiny("classifier_clip", tiny_cache)), device="cpu")
    p = f.patch_size
    image = gt.rgb[: 3 * p, : 5 * p]  # non-square, not the native size: bilinear position embeddings
    fg = f.encode_text(["cat", "dog"])
    bg = f.encode_text(["a clean origami grass.", "a clean origami sky."])
    maps = f.gradcam(image, fg, bg)
    assert maps.shape == (2, 3, 5) and maps.dtype == np.float32 and maps.min() >= 0 and maps.max() <= 1
    with torch.no_grad():  # also fine when called under no_grad
        assert f.gradcam(image, fg[:1]).shape == (1, 3, 5)
    for method in ("gradcam", "clip_es"):
        res = car_loop(gt.rgb, ["cat", "dog"], clip_cam(f, method=method), clip_classifier(g),
                       CarParams(crf=False, background=("grass", "sky"), theta=0.0))
        assert res.queries == ("cat", "dog") and res.proposals.shape == (2, *gt.size)
        assert np.isfinite(res.proposals).all() and res.proposals.max() <= 1 + 1e-6


def test_gradcam_attention_equals_eager_attention_weights(tiny_cache, gt):
    """The CAA attention (recomputed from the blocks' inputs: sdpa returns no weights) equals transformers' own
    eager attention weights, averaged over heads and the last blocks, CLS dropped."""
    from pseudoseg.models.adapters import tiny
    from pseudoseg.models.adapters.clip import HFClipEncoder

    clip = HFClipEncoder(str(tiny.ensure_tiny("cam_clip", tiny_cache)), device="cpu")
    s, g = clip.image_size, clip.image_size // clip.patch_size
    text = clip.encode_text(["a photo of a cat.", "a photo of a dog."])
    maps, attention = clip.gradcam(gt.rgb[:s, :s], text, attention_layers=8)
    assert maps.shape == (2, g, g) and attention.shape == (g * g, g * g)
    clip.model.set_attn_implementation("eager")
    with torch.no_grad():
        out = clip.model.vision_model(pixel_values=clip.pixel_values(gt.rgb[None, :s, :s]), output_attentions=True)
    layers = out.attentions[-8:]  # tiny CLIP has fewer blocks: all of them
    reference = torch.stack(layers).mean(0)[0].mean(0)[1:, 1:].numpy()
    np.testing.assert_allclose(attention, reference, atol=1e-5)


def test_sinkhorn_affinity_is_symmetric_and_doubly_stochastic():
    rng = np.random.default_rng(0)
    w = rng.random((30, 30)) ** 3
    a = sinkhorn_affinity(w, rounds=50)
    np.testing.assert_allclose(a, a.T)
    np.testing.assert_allclose(a.sum(0), 1, atol=1e-6)
    np.testing.assert_allclose(a.sum(1), 1, atol=1e-6)
    with pytest.raises(ValueError, match="non-negative square"):
        sinkhorn_affinity(-w)


def test_cam_box_mask_hand():
    cam = np.zeros((6, 8), np.float32)
    cam[1, 1], cam[2, 2] = 1.0, 0.5  # one 8-connected region (diagonal): box rows 1-2, cols 1-2
    cam[4, 6] = 0.45                 # a second region above int(λ · 255)
    cam[0, 7] = 0.3                  # below: no box
    box = cam_box_mask(cam, 0.4)
    expected = np.zeros_like(box)
    expected[1:3, 1:3] = True
    expected[4, 6] = True
    np.testing.assert_array_equal(box, expected)
    assert not cam_box_mask(np.zeros((3, 3)), 0.4).any()


def test_cam_box_mask_quirks_of_the_official_scoremap2bbox():
    """uint8 quantisation with a STRICT threshold int(λ · max); boxes end one short of the last row/column (the
    official code clips x1 to W - 1 and slices end-exclusive)."""
    cam = np.zeros((5, 6), np.float32)
    cam[1:5, 3:6] = 1.0                          # touches the bottom and right borders
    box = cam_box_mask(cam, 0.4)
    expected = np.zeros_like(box)
    expected[1:4, 3:5] = True                    # rows 1..3, columns 3..4: the last row and column stay out
    np.testing.assert_array_equal(box, expected)
    edge = np.zeros((4, 4), np.float32)
    edge[1, 1], edge[2, 2] = 1.0, 0.4            # 0.4·255 = 102 = int(0.4 · 255): not strictly above
    assert cam_box_mask(edge, 0.4).sum() == 1


def test_affinity_refine_equals_formula_loop():
    """CLIP-ES refinement as the official clipcam.py computes it (car-paper Eq. 7-8), written out with loops: the
    attention W column- then row-normalised once and twice more (Sinkhorn, 3 rounds), A = (D + Dᵀ) / 2, squared
    (one matmul: t = 2), the columns outside the class's boxes zeroed, times vec(M_c), min-max scaled — with the
    project's default rounds and power."""
    rng = np.random.default_rng(1)
    h, w, t = 4, 5, 3
    n = h * w
    cams = rng.random((t, h, w)).astype(np.float32) ** 4
    cams[2, :2, :2] = 1.0  # one map with a clear region: its boxes cover a part of the grid only
    attention = rng.random((n, n)) ** 3
    d = [[float(v) for v in row] for row in attention]
    for _ in range(3):
        for j in range(n):
            col = sum(d[i][j] for i in range(n))
            for i in range(n):
                d[i][j] /= col
        for i in range(n):
            row = sum(d[i])
            d[i] = [v / row for v in d[i]]
    a = [[(d[i][j] + d[j][i]) / 2 for j in range(n)] for i in range(n)]
    a2 = [[sum(a[i][k] * a[k][j] for k in range(n)) for j in range(n)] for i in range(n)]
    out = affinity_refine(cams, sinkhorn_affinity(attention), lam=0.5)
    assert not official.box_mask(cams[2], 0.5).all()
    for c in range(t):
        box = official.box_mask(cams[c], 0.5).reshape(-1)
        m = cams[c].reshape(-1)
        ref = np.array([sum(a2[i][j] * box[j] * m[j] for j in range(n)) for i in range(n)])
        ref = (ref - ref.min()) / (1e-15 + (ref - ref.min()).max())
        np.testing.assert_allclose(out[c].reshape(-1), ref, rtol=1e-5, atol=1e-6)


def test_affinity_refine_spreads_a_seed_over_its_object(gt):
    """GT-derived attention (patches attend to patches of their own class) turns a CAM that lights only a few
    patches of the persons into a map covering the persons, and nothing of other classes leaks in."""
    labels = resize_label_map(gt.class_label, (24, 32)).astype(int)  # a CLIP-like patch grid of the photo
    flat = labels.reshape(-1)
    attention = (flat[:, None] == flat[None, :]).astype(np.float64) + 1e-3
    person = labels == 15
    cam = np.zeros((1, 24, 32))
    ys, xs = np.nonzero(person)
    pick = np.random.default_rng(0).choice(len(ys), 12, replace=False)
    cam[0, ys[pick], xs[pick]] = 1.0
    refined = affinity_refine(cam, sinkhorn_affinity(attention), lam=0.4)[0]
    iou_before = (cam[0] > 0.4)[person].sum() / ((cam[0] > 0.4) | person).sum()
    inside_boxes = cam_box_mask(cam[0], 0.4)
    on = refined > 0.4
    assert on[person & inside_boxes].mean() > 0.9  # the person patches inside the seed boxes light up
    assert not on[~person].any()                  # no other class does
    print(f"person IoU of the thresholded CAM: {iou_before:.3f} → {(on & person).sum() / (on | person).sum():.3f}")
