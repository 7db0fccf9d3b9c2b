import cv2
import numpy as np
import pytest
import torch

from pseudoseg.models.training.heads import AlignmentBlock, USEHead
from pseudoseg.pipeline.eval.methods import (
    FMbSegMethod,
    PseudoLabelMethod,
    UseSamMethod,
    scores_to_labels,
    stuff_as_background,
    use_head_embedder,
    vote_segments,
)
from pseudoseg.pipeline.eval.metrics import miou
from tests.oracles import CropOracleDense, OracleDenseEncoder, OracleSegmenter, area_fractions

DIM = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def identity_block():
    block = AlignmentBlock(DIM, DIM, variant="linear")
    with torch.no_grad():
        block.net.weight.copy_(torch.eye(DIM))
        block.net.bias.zero_()
    return block


def test_fmbseg_oracle_voc21(gt):
    names = list(gt.class_names)  # background + 20
    # A fine oracle grid (1-pixel patches, 16-pixel crops): the test checks the pipeline, not the resolution.
    seg = FMbSegMethod(CropOracleDense(gt), identity_block(), np.eye(DIM, dtype=np.float32)[: len(names)],
                          crop=16, stride=8)
    label, scores = seg.segment(gt.rgb, names)
    assert label.shape == gt.size and label.dtype == np.uint8 and scores.shape == (21,)
    m, per = miou([label], [gt.class_label], 21)
    print("FMbSeg oracle mIoU", m)
    assert m >= 0.9


def test_fmbseg_at_dinov2_patch_grid_equals_reference(gt):
    """Real DINOv2 geometry (14-px patches, 224/112 windows, short side 336): the segmenter's label map equals an
    independent computation from GT — per-patch class-area fractions → cosine to one-hot prototypes → OpenCV
    bilinear resize to the photo → argmax. mIoU is then the patch grid's ceiling on this photo (≈0.74: the 8 chair
    fragments are thinner than a patch), which is why the ≥ 0.9 check above uses 1-px patches."""
    names = list(gt.class_names)
    dense = CropOracleDense(gt, short_side=336, crop=224, stride=112, patch=14, noise=0.0, soft=True)
    seg = FMbSegMethod(dense, identity_block(), np.eye(DIM, dtype=np.float32)[: len(names)], short_side=336,
                          crop=224, stride=112)
    label, _ = seg.segment(gt.rgb, names)

    rows, cols = dense.windows.grid_hw
    frac = area_fractions(gt.class_label, rows, cols)[..., : len(names)]
    cosine = frac / np.maximum(np.linalg.norm(frac, axis=-1, keepdims=True), 1e-12)
    h, w = gt.size
    reference = cv2.resize(cosine, (w, h), interpolation=cv2.INTER_LINEAR).argmax(-1)
    agree = (label == reference).mean()
    m, per = miou([label], [gt.class_label], 21)
    m_ref, _ = miou([reference], [gt.class_label], 21)
    print(f"FMbSeg 14-px grid: agreement {agree:.5f}, mIoU {m:.4f} (reference {m_ref:.4f}), chair {per[9]:.3f}")
    assert agree > 0.999 and abs(m - m_ref) < 2e-3
    assert m > 0.7 and min(per[c] for c in (0, 5, 11, 15)) > 0.8  # every class but the chair fragments


def test_fmbseg_background_threshold(gt):
    names = list(gt.class_names)
    protos = lambda ns: np.eye(DIM, dtype=np.float32)[1 : 1 + len(ns)]  # noqa: E731 - foreground only
    seg = FMbSegMethod(CropOracleDense(gt), identity_block(), protos, crop=16, stride=8,
                          background_threshold=0.5, temperature=0.1)
    label, _ = seg.segment(gt.rgb, names)
    m, _ = miou([label], [gt.class_label], 21)
    print("FMbSeg oracle mIoU (background by threshold)", m)
    assert m >= 0.9


def test_stuff_as_background_hand():
    """PV-21 rule (fmbseg-paper §4): 2 foreground classes (labels 1, 2) + 2 stuff classes; a pixel whose best
    class is a stuff class is background (0), whatever its margin; no threshold."""
    s = np.array([
        [[0.9, 0.1, 0.2, 0.30]],  # fg "aeroplane"
        [[0.1, 0.8, 0.1, 0.29]],  # fg "bicycle"
        [[0.0, 0.2, 0.7, 0.10]],  # stuff "sky"
        [[0.2, 0.0, 0.1, 0.31]],  # stuff "wall": best by 0.01 in the last pixel
    ], np.float32)  # [K' + S = 4, H = 1, W = 4]
    label, per = stuff_as_background(s, num_foreground=2)
    assert label.tolist() == [[1, 2, 0, 0]] and label.dtype == np.uint8
    np.testing.assert_allclose(per, [0.7, 0.9, 0.8])  # [background = best stuff score, aeroplane, bicycle]
    with pytest.raises(ValueError):
        stuff_as_background(s, num_foreground=4)


def test_fmbseg_stuff_classes_predict_background(gt):
    """FMbSegMethod with background_classes: the foreground names then the stuff names are prompted (never
    "background" itself); GT background patches (code 0) match a stuff prototype → label 0."""
    names = list(gt.class_names)
    stuff = ("sky-other", "wall-other", "grass")
    asked = []

    def protos(ns):
        asked.append(list(ns))
        eye = np.eye(DIM, dtype=np.float32)
        return np.stack([eye[1 + names[1:].index(n)] if n in names else eye[0] if n == "wall-other" else eye[-1]
                         for n in ns])

    seg = FMbSegMethod(CropOracleDense(gt), identity_block(), protos, crop=16, stride=8,
                          background_classes=stuff)
    label, scores = seg.segment(gt.rgb, names)
    assert asked == [names[1:] + list(stuff)] and scores.shape == (21,)
    m, per = miou([label], [gt.class_label], 21)
    print("FMbSeg oracle mIoU (background by stuff classes)", m)
    assert m >= 0.9 and per[0] >= 0.9
    with pytest.raises(ValueError, match="not both"):
        FMbSegMethod(CropOracleDense(gt), identity_block(), protos, background_threshold=0.5,
                        background_classes=stuff)


def test_pseudo_labels_stuff_as_background():
    src = np.array([[0, 1], [2, 255]], np.uint8)  # Stage-1 labels in a COCO-Stuff-like vocabulary
    seg = PseudoLabelMethod({"x": src}, ["dog", "sky-other", "wall-other"], background_classes=["sky-other",
                                                                                                    "wall-other"])
    voc21 = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog"]
    label, _ = seg.segment(np.zeros((2, 2, 3), np.uint8), voc21, image_id="x")
    assert label.tolist() == [[12, 0], [0, 255]]
    label, _ = seg.segment(np.zeros((2, 2, 3), np.uint8), voc21[1:], image_id="x")  # no background class
    assert label.tolist() == [[11, 255], [255, 255]]


def test_scores_to_labels():
    s = np.array([[[0.9, 0.1]], [[0.1, 0.12]]], np.float32)  # K'=2, H=1, W=2
    label, per = scores_to_labels(s)
    assert label.tolist() == [[0, 1]] and per.shape == (2,)
    label, per = scores_to_labels(s, background_threshold=0.6, temperature=0.1)
    assert label.tolist() == [[1, 0]] and per.shape == (3,)


def test_vote_segments_hand():
    masks = np.zeros((3, 2, 3), bool)
    masks[0, :, :2] = True  # class 0 likely
    masks[1, :, 1:] = True  # class 1 likely, overlaps column 1
    masks[2, 0, 1] = True   # tips pixel (0, 1) to class 1
    probs = np.array([[0.6, 0.4], [0.3, 0.7], [0.0, 1.0]])
    label, best = vote_segments(masks, probs)
    # column 1 row 1: 0.6+0.3 = 0.9 vs 0.4+0.7 = 1.1 → class 1
    assert label.tolist() == [[0, 1, 1], [0, 1, 1]]
    masks[:, :, 2] = False
    label, _ = vote_segments(masks, probs, uncovered=7, chunk=2)
    assert label[:, 2].tolist() == [7, 7]
    assert vote_segments(np.zeros((0, 2, 2), bool), np.zeros((0, 3)))[0].tolist() == [[255, 255], [255, 255]]


def test_use_sam_oracle(gt):
    names = list(gt.class_names)

    def embed(image, masks):  # oracle segment embedding: one-hot of the majority GT class under the mask
        out = np.zeros((len(masks), DIM), np.float32)
        for i, m in enumerate(masks):
            vals = gt.class_label[m]
            out[i, np.bincount(vals[vals != 255], minlength=DIM).argmax()] = 1
        return out

    seg = UseSamMethod(OracleSegmenter(gt), embed, np.eye(DIM, dtype=np.float32)[: len(names)], uncovered=0)
    label, scores = seg.segment(gt.rgb, names)
    m, _ = miou([label], [gt.class_label], 21)
    print("USE+SAM oracle mIoU", m)
    assert m >= 0.9
    # uncovered pixels as ignore: background pixels count as wrong, objects still right
    seg.uncovered = 255
    label, _ = seg.segment(gt.rgb, names)
    assert (label[gt.class_label == 0] == 255).all()


def test_use_head_embedder_shapes(gt):
    torch.manual_seed(0)
    head = USEHead(clip_dim=0, clip_blocks=0, dino_dim=32, dino_blocks=2, embed_dim=16, width=8)
    embed = use_head_embedder(head, dense=OracleDenseEncoder(gt), dino_layers=(-2, -1), image_size=224)
    masks = np.stack([gt.instance_label == k for k in (1, 2)])
    assert embed(gt.rgb, masks).shape == (2, 16)


def test_pseudo_label_segmenter(gt):
    src_names = ["person", "background", "bottle", "chair", "diningtable", "cat"]  # other order than the evaluation classes
    names = list(gt.class_names)
    inv = {n: i for i, n in enumerate(src_names)}
    src = np.full(gt.size, 255, np.uint8)
    for c in np.unique(gt.class_label):
        if c != 255 and names[c] in inv:
            src[gt.class_label == c] = inv[names[c]]
    seg = PseudoLabelMethod({"a": src, "half": src[::2, ::2]}, src_names)
    label, present = seg.segment(gt.rgb, names, image_id="a")
    m, _ = miou([label], [gt.class_label], 21)
    assert m == 1.0 and present[[0, 5, 9, 11, 15]].all()
    half, _ = seg.segment(gt.rgb, names, image_id="half")
    assert half.shape == gt.size and (half == label).mean() > 0.95
    assert (seg.segment(gt.rgb, names, image_id="missing")[0] == 255).all()
