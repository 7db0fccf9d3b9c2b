"""The methods evaluated (zero-shot semantic segmentation) behind one interface, `SegmentationMethod` ("segmenter"
names the SAM role only; fmbseg-paper §3.3 "Deployment", use-paper §4.3).

``segment(image, class_names, *, image_id=None) -> (label_map, class_scores)``
- image: uint8 RGB ``[H, W, 3]`` (original frame);
- class_names: the K evaluation classes, label value = index (``class_names[0] == "background"`` when a
  background threshold is used);
- label_map: uint8 ``[H, W]`` in the original frame, values in ``[0, K)`` or 255 (no prediction);
- class_scores: float32 ``[K]``, per class the highest per-pixel score it got (0 when never scored), for
  inspection and image-level tagging.

Models are passed in (role objects, heads, callables); this module loads nothing. Coordinate maps come from
:mod:`pipeline.core.transforms`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pseudoseg.pipeline.core.masks import encode_rle, mask_nms
from pseudoseg.pipeline.core.transforms import Resize, SlidingWindows, resize_label_map, working_size
from pseudoseg.pipeline.eval.metrics import IGNORE

TextProtos = np.ndarray | Callable[[Sequence[str]], np.ndarray]


class SegmentationMethod(ABC):
    @abstractmethod
    def segment(self, image: np.ndarray, class_names: Sequence[str], *,
                image_id: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """image uint8 [H, W, 3] → (label_map uint8 [H, W], class_scores float32 [K]); see the module doc."""


def _protos(text_protos: TextProtos, names: Sequence[str]) -> np.ndarray:
    """float32 [len(names), D], L2-normalised: `text_protos` itself (rows aligned with names) or its call."""
    t = np.asarray(text_protos(list(names)) if callable(text_protos) else text_protos, np.float32)
    if t.ndim != 2 or len(t) != len(names):
        raise ValueError(f"text prototypes must be [{len(names)}, D] for {len(names)} classes, got {t.shape}")
    return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)


def scores_to_labels(scores: np.ndarray, background_threshold: float | None = None,
                     temperature: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel class scores float [K', H, W] → (label uint8 [H, W], per-class max score float32 [K]).

    background_threshold None: label = argmax, K = K'. Otherwise the K' scores are foreground classes:
    probabilities = softmax(scores / temperature) over them; label = 1 + argmax, or 0 (background) where the best
    probability is below the threshold, K = K' + 1 (class_scores[0] = max over pixels of 1 - best probability).
    """
    s = torch.as_tensor(np.asarray(scores, np.float32))
    if background_threshold is None:
        best, label = s.max(0)
        per = s.flatten(1).max(1).values
        return label.numpy().astype(np.uint8), per.numpy().astype(np.float32)
    p = torch.softmax(s / temperature, dim=0)
    best, label = p.max(0)
    label = torch.where(best < background_threshold, 0, label + 1)
    per = torch.cat([(1 - best).max().reshape(1), p.flatten(1).max(1).values])
    return label.numpy().astype(np.uint8), per.numpy().astype(np.float32)


def stuff_as_background(scores: np.ndarray, num_foreground: int) -> tuple[np.ndarray, np.ndarray]:
    """The "stuff" background rule (fmbseg-paper §4, PV-21: "we add different Stuff categories to predict the
    background class"): scores float [K' + S, H, W] of K' foreground classes then S stuff classes → (label uint8
    [H, W], per-class max score float32 [K' + 1]): label = 1 + argmax where the argmax is a foreground class, 0
    (background) where it is a stuff class; class_scores[0] = max over pixels of the best stuff score."""
    s = torch.as_tensor(np.asarray(scores, np.float32))
    if not 0 < num_foreground < s.shape[0]:
        raise ValueError(f"need foreground and stuff scores, got {s.shape[0]} rows for {num_foreground} foreground")
    best = s.argmax(0)
    label = torch.where(best >= num_foreground, 0, best + 1)
    flat = s.flatten(1).max(1).values
    per = torch.cat([flat[num_foreground:].max().reshape(1), flat[:num_foreground]])
    return label.numpy().astype(np.uint8), per.numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------------ FMbSeg
class FMbSegMethod(SegmentationMethod):
    """Frozen dense encoder (DINOv2) → alignment block ℳ → cosine to text prototypes → bilinear upsampling of the
    similarities to the original size → argmax (fmbseg-paper §3.3 "Deployment").

    The image is resized to short side `short_side` with the long side capped at `max_long_side` (0 = no cap;
    rounded to patch multiples, see :func:`pipeline.core.transforms.working_size`), cut into `crop`² windows every
    `stride` pixels; each crop's tokens go through the block (it attends within a crop, as in training) and the
    per-crop similarities are averaged where crops overlap (:meth:`SlidingWindows.stitch`). text_protos: [K, D]
    rows aligned with the names prompted, or a callable names → [K, D]. Background (class_names[0], never
    prompted itself): background_threshold, see :func:`scores_to_labels`; or background_classes, extra names
    prompted after the foreground classes whose pixels become background (:func:`stuff_as_background`).
    """

    def __init__(self, dense_encoder, alignment_block, text_protos: TextProtos, *, short_side: int = 336,
                 crop: int = 224, stride: int = 112, max_long_side: int = 0, layer: int = -1,
                 background_threshold: float | None = None, background_classes: Sequence[str] = (),
                 temperature: float = 0.01, batch_size: int = 16) -> None:
        if background_threshold is not None and background_classes:
            raise ValueError("background by threshold or by background classes, not both")
        self.encoder, self.block, self.text_protos = dense_encoder, alignment_block, text_protos
        self.short_side, self.crop, self.stride, self.layer = short_side, crop, stride, layer
        self.max_long_side, self.background_classes = max_long_side, tuple(background_classes)
        self.background_threshold, self.temperature, self.batch_size = background_threshold, temperature, batch_size

    def similarities(self, image: np.ndarray, protos: np.ndarray) -> np.ndarray:
        """float32 [K, H, W]: cosine of every original pixel's (bilinearly interpolated) embedding score."""
        image = np.asarray(image)
        p = self.encoder.patch_size
        resize = Resize(tuple(image.shape[:2]), working_size(image.shape[:2], short_side=self.short_side,
                                                              multiple=p, min_side=self.crop,
                                                              max_long_side=self.max_long_side))
        windows = SlidingWindows(resize.new_hw, self.crop, self.stride, p)
        crops = windows.cut(resize.apply_image(image))
        text = torch.from_numpy(protos)
        sims = []
        for i in range(0, len(crops), self.batch_size):
            feats = self.encoder.encode(crops[i : i + self.batch_size], layers=[self.layer]).patches[:, 0]
            with torch.no_grad():
                dev = next(self.block.parameters()).device
                sims.append(self.block.predict_patches(torch.from_numpy(feats).to(dev), text.to(dev)).cpu().numpy())
        grid = windows.stitch(np.concatenate(sims))  # [h/p, w/p, K]
        # The grid tiles the working image, which maps onto the whole original: interpolate grid → [H, W].
        t = torch.from_numpy(grid).permute(2, 0, 1)[None]
        return F.interpolate(t, size=tuple(image.shape[:2]), mode="bilinear", align_corners=False)[0].numpy()

    def segment(self, image, class_names, *, image_id=None):
        with_bg = self.background_threshold is not None or bool(self.background_classes)
        names = list(class_names)[1:] if with_bg else list(class_names)
        sim = self.similarities(image, _protos(self.text_protos, names + list(self.background_classes)))
        if self.background_classes:
            return stuff_as_background(sim, len(names))
        return scores_to_labels(sim, self.background_threshold, self.temperature)


# ------------------------------------------------------------------------------------------------ USE + SAM
def vote_segments(masks: np.ndarray, probs: np.ndarray, uncovered: int = IGNORE,
                  chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Pixel voting of use-paper §4.3: each pixel's class score is the sum of the class probabilities of every
    segment covering it; label = argmax.

    masks: bool [S, H, W]; probs: float [S, K] (rows: softmax over classes). Pixels no segment covers get
    `uncovered` (255 = ignore-as-wrong in mIoU, or e.g. 0 for a background class). Returns (label uint8 [H, W],
    per-pixel max summed score float32 [H, W]). Pixels are processed `chunk` at a time ([K, chunk] memory).
    """
    masks = np.asarray(masks, bool)
    probs = np.asarray(probs, np.float32)
    if masks.ndim != 3 or probs.ndim != 2 or len(masks) != len(probs):
        raise ValueError(f"need masks [S, H, W] and probs [S, K] with the same S, got {masks.shape}, {probs.shape}")
    s, h, w = masks.shape
    label = np.full(h * w, uncovered, np.uint8)
    best = np.zeros(h * w, np.float32)
    if s == 0:
        return label.reshape(h, w), best.reshape(h, w)
    flat = masks.reshape(s, h * w)
    for a in range(0, h * w, chunk):
        m = flat[:, a : a + chunk]
        score = probs.T @ m.astype(np.float32)  # [K, n]
        covered = m.any(0)
        label[a : a + chunk] = np.where(covered, score.argmax(0), uncovered)
        best[a : a + chunk] = score.max(0)
    return label.reshape(h, w), best.reshape(h, w)


class UseSamMethod(SegmentationMethod):
    """USE + SAM (use-paper §4.3): SAM automatic masks → mask NMS (by predicted IoU) → segment embeddings →
    softmax over the classes of (logit_scale · cosine to the text prototypes) → :func:`vote_segments`.

    segmenter: a `Segmenter` role (its `automatic_masks`); embed_segments: callable (image uint8 [H, W, 3],
    masks bool [S, H, W]) → float [S, D] segment embeddings — e.g. :func:`use_head_embedder` around a trained
    USE head and its encoders; text_protos: [K, D] aligned with class_names or a callable. uncovered: label of
    pixels no mask covers (255 by default = counted wrong in mIoU; set 0 to call them background for VOC-21).
    """

    def __init__(self, segmenter, embed_segments: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 text_protos: TextProtos, *, nms_iou: float = 0.7, logit_scale: float = 100.0,
                 uncovered: int = IGNORE, amg_params: Mapping | None = None) -> None:
        self.segmenter, self.embed_segments, self.text_protos = segmenter, embed_segments, text_protos
        self.nms_iou, self.logit_scale, self.uncovered = nms_iou, logit_scale, uncovered
        self.amg_params = dict(amg_params or {})

    def masks(self, image: np.ndarray) -> np.ndarray:
        """bool [S, H, W]: SAM's automatic masks kept by mask NMS, in kept order."""
        recs = self.segmenter.automatic_masks(image, **self.amg_params)
        if not recs:
            return np.zeros((0, *np.asarray(image).shape[:2]), bool)
        groups = mask_nms([encode_rle(r["segmentation"]) for r in recs],
                          [float(r.get("predicted_iou", 1.0)) for r in recs], self.nms_iou)
        return np.stack([np.asarray(recs[g[0]]["segmentation"], bool) for g in groups])

    def segment(self, image, class_names, *, image_id=None):
        protos = _protos(self.text_protos, class_names)
        masks = self.masks(image)
        if len(masks) == 0:
            h, w = np.asarray(image).shape[:2]
            return np.full((h, w), self.uncovered, np.uint8), np.zeros(len(protos), np.float32)
        emb = np.asarray(self.embed_segments(image, masks), np.float32)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        probs = torch.softmax(torch.from_numpy(self.logit_scale * emb @ protos.T), dim=1).numpy()
        label, _ = vote_segments(masks, probs, self.uncovered)
        return label, probs.max(0).astype(np.float32)


def use_head_embedder(use_head, *, clip=None, dense=None, clip_layers: Sequence[int] = (),
                      dino_layers: Sequence[int] = (), image_size: int = 224) -> Callable:
    """(image, masks) → [S, D] with a trained `USEHead`: the image is resized to image_size² (masks pooled on the
    same grid by the head's `mask_pooling_weights`, so masks stay in the original frame), CLIP block tokens
    (`clip.encode_image_blocks`, the CLS of `clip.encode_image` when the head uses CLS) and/or DINOv2 tokens
    (`dense.encode`). Layers as the head was trained with."""

    def embed(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        resize = Resize(tuple(image.shape[:2]), (image_size, image_size))
        x = resize.apply_image(image)[None]
        feats: dict[str, torch.Tensor] = {}
        if clip is not None and clip_layers:
            cls, patches = clip.encode_image_blocks(x, clip_layers)
            feats["clip_patches"] = torch.from_numpy(patches)
            feats["clip_cls"] = torch.from_numpy(cls)
        if dense is not None and dino_layers:
            out = dense.encode(x, layers=list(dino_layers))
            feats["dino_patches"] = torch.from_numpy(out.patches)
            feats["dino_cls"] = torch.from_numpy(out.cls)
        dev = next(use_head.parameters()).device
        with torch.no_grad():
            emb = use_head.embed_masks(torch.from_numpy(np.asarray(masks, bool)),
                                       **{k: v.to(dev) for k, v in feats.items()})
        return emb.float().cpu().numpy()

    return embed


# ------------------------------------------------------------------------------------------------ Stage-1 labels
class PseudoLabelMethod(SegmentationMethod):
    """Scores Stage-1 pseudo label maps as predictions (an upper-bound check of the labels the heads learn from).

    label_maps: image_id → uint8 [h, w] label map in the Stage-1 vocabulary `source_classes` (255 = unlabelled);
    values are mapped to the evaluation classes by name (case-insensitive; names missing there → 255) and resized
    to the image with nearest-neighbour. An image without a label map predicts 255 everywhere (counted wrong).
    background_classes: source class names that map to the evaluation's class 0 (background), e.g. the COCO-Stuff
    stuff classes under the "stuff" background rule (:func:`stuff_as_background`).
    """

    def __init__(self, label_maps: Mapping[str, np.ndarray], source_classes: Sequence[str],
                 unlabelled: int = IGNORE, background_classes: Sequence[str] = ()) -> None:
        self.label_maps, self.source_classes, self.unlabelled = label_maps, list(source_classes), unlabelled
        self.background_classes = {n.lower() for n in background_classes}

    def segment(self, image, class_names, *, image_id=None):
        h, w = np.asarray(image).shape[:2]
        target = {n.lower(): i for i, n in enumerate(class_names)}
        background = target.get("background", self.unlabelled)
        lut = np.full(256, self.unlabelled, np.uint8)
        for i, n in enumerate(self.source_classes):
            lut[i] = background if n.lower() in self.background_classes else target.get(n.lower(), self.unlabelled)
        src = self.label_maps.get(image_id) if image_id is not None else None
        if src is None:
            return np.full((h, w), self.unlabelled, np.uint8), np.zeros(len(class_names), np.float32)
        label = lut[resize_label_map(src, (h, w))]
        present = np.zeros(len(class_names), np.float32)
        vals = np.unique(label)
        present[vals[vals < len(class_names)]] = 1.0
        return label, present
