"""FMbSeg Stage 1 (fmbseg-paper §3.2): pseudo semantic labels from CLIP + SAM. Pure logic; the CLIP encoder and the
SAM segmenter are role objects passed in (models/roles.py), never loaded here. Every coordinate transform goes
through pipeline/core/transforms.py.

Settings arrive as the stages' params objects (pipeline/fmbseg/params.py), whole.

1. High-resolution dense features (:func:`clip_dense_features`): the image resized to a working size (short side
   ``short_side``), cut into encoder-sized crops by a sliding window, each crop encoded by CLIP (MaskCLIP patch
   tokens + CLS), patch tokens stitched into one full-image grid (overlaps averaged, then L2-normalised).
2. Category detection (:func:`detect_classes`): each crop gets the class whose text embedding is most similar to
   its CLS token; a class is present when more than ``min_crops`` crops got it. Image-level labels, when given,
   replace this step (the paper's semi-supervised variant).
3. Stage 1.1 (:func:`query_point_masks`): per detected class, the ``top_k`` grid cells most similar to its text
   embedding → their centres in original pixels → ONE SAM prompt of ``top_k`` positive points (Fig. 2: the points
   "are forwarded to SAM which generates 3 different segmentation masks for the object"; 3 masks per object is one
   multimask prompt) → the mask with the highest predicted IoU.
4. Stage 1.2 (:func:`label_auto_masks`): SAM's automatic masks within size limits, each labelled by the mean dense
   CLIP feature over its pixels (nearest-cell upsampling of the grid), argmax over the DETECTED classes only.
5. Merge (:func:`merge_label_map`): one uint8 label map (255 = unlabelled) by a configurable precedence.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import webdataset as wds

from pseudoseg.pipeline.core.masks import encode_rle, rle_bbox, rle_row_fields
from pseudoseg.pipeline.core.npy import npy_array, npy_bytes
from pseudoseg.pipeline.core.transforms import (
    Resize,
    SlidingWindows,
    flat_to_rowcol,
    grid_cells_to_original_xy,
    pixel_cell_index,
    working_size,
)
from pseudoseg.pipeline.core.vocabularies import UNLABELLED, Vocabulary, class_text_embeddings  # noqa: F401 — re-exported
from pseudoseg.pipeline.fmbseg.params import (
    PRECEDENCES,
    FmbsegAutoMasksParams,
    FmbsegDenseParams,
    FmbsegDetectParams,
    FmbsegLabelsParams,
    FmbsegQueryMasksParams,
)

STAGE_11 = "1.1"
STAGE_12 = "1.2"
FEATURE_DTYPE = np.float16  # on disk; computations run in float32


def _unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------------------------------- dense CLIP
def auto_stride(crop: int, patch: int, stride: int) -> int:
    """``stride`` if > 0, else half the crop rounded down to a multiple of the patch (at least one patch)."""
    if stride > 0:
        return stride
    return max(patch, (crop // 2) // patch * patch)


@dataclass(frozen=True)
class DenseClip:
    """CLIP features of one image on the working frame.

    dense: float32 ``[rows, cols, D]``, cell (row, col) of the working image's patch grid, L2-normalised.
    cls: float32 ``[C, D]``, one projected CLS embedding per crop (crop order of ``windows``), L2-normalised.
    resize: original ``(H, W)`` ↔ working ``(h, w)``; windows: the crops on the working image.
    """

    dense: np.ndarray
    cls: np.ndarray
    resize: Resize
    windows: SlidingWindows

    @property
    def patch(self) -> int:
        return self.windows.patch

    def meta(self, image_id: str) -> dict[str, Any]:
        """The sample's JSON record (contract schemas.fmbseg.DENSE_FEATURES)."""
        (h0, w0), (h, w) = self.resize.orig_hw, self.resize.new_hw
        rows, cols = self.windows.grid_hw
        return {
            "image_id": image_id, "height": int(h0), "width": int(w0), "resized_height": int(h),
            "resized_width": int(w), "grid_height": int(rows), "grid_width": int(cols),
            "embed_dim": int(self.dense.shape[-1]), "patch_size": int(self.patch), "crop_size": int(self.windows.crop),
            "stride": int(self.windows.stride), "num_crops": int(len(self.windows)),
            "crop_boxes_xyxy": [[int(v) for v in b] for b in self.windows.boxes_xyxy],
            "dtype": np.dtype(FEATURE_DTYPE).name, "dense_shape": [int(rows), int(cols), int(self.dense.shape[-1])],
            "cls_shape": [int(v) for v in self.cls.shape],
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], dense: np.ndarray, cls_tokens: np.ndarray) -> DenseClip:
        """Rebuild from a stored sample (features cast back to float32)."""
        resize = Resize((meta["height"], meta["width"]), (meta["resized_height"], meta["resized_width"]))
        windows = SlidingWindows(resize.new_hw, meta["crop_size"], meta["stride"], meta["patch_size"])
        dense = np.asarray(dense, np.float32)
        if dense.shape != (*windows.grid_hw, meta["embed_dim"]) or len(cls_tokens) != len(windows):
            raise ValueError(f"{meta['image_id']}: stored features {dense.shape}/{np.shape(cls_tokens)} do not match "
                             f"their metadata (grid {windows.grid_hw}, {len(windows)} crops)")
        return cls(dense=dense, cls=np.asarray(cls_tokens, np.float32), resize=resize, windows=windows)


@dataclass(frozen=True)
class DenseCrops:
    """The crops of one image for :func:`stitch_dense`: uint8 ``[C, S, S, 3]`` cut from the working image."""

    crops: np.ndarray
    resize: Resize
    windows: SlidingWindows


def dense_crops(rgb: np.ndarray, cfg: FmbsegDenseParams, *, image_size: int, patch_size: int) -> DenseCrops:
    """The host half of :func:`clip_dense_features` before CLIP (thread-safe): ``rgb`` (uint8 ``[H, W, 3]``) resized
    to the working size (short side ``cfg.short_side``, long side at most ``cfg.max_long_side`` (0 = no cap), patch
    multiples, at least one crop; :func:`transforms.working_size`) and cut into ``image_size`` square crops every
    ``cfg.stride`` working pixels (0 = half a crop), edges included."""
    rgb = np.asarray(rgb)
    s, p = int(image_size), int(patch_size)
    resize = Resize(rgb.shape[:2], working_size(rgb.shape[:2], short_side=cfg.short_side, multiple=p, min_side=s,
                                                 max_long_side=cfg.max_long_side))
    windows = SlidingWindows(resize.new_hw, s, auto_stride(s, p, cfg.stride), p)
    return DenseCrops(crops=windows.cut(resize.apply_image(rgb)), resize=resize, windows=windows)


def stitch_dense(crops: DenseCrops, patch: np.ndarray, cls: np.ndarray) -> DenseClip:
    """The host half after CLIP: the crops' patch tokens ``[C, S/p, S/p, D]`` stitched into the working image's
    grid (overlaps averaged) and L2-normalised, with the crops' CLS tokens ``[C, D]`` normalised."""
    dense = _unit(crops.windows.stitch(np.asarray(patch)))
    return DenseClip(dense=dense, cls=_unit(cls), resize=crops.resize, windows=crops.windows)


def clip_dense_features(clip, rgb: np.ndarray, cfg: FmbsegDenseParams) -> DenseClip:
    """Sliding-window MaskCLIP features of ``rgb`` (uint8 ``[H, W, 3]``).

    Working size: short side ``cfg.short_side`` (patch multiples, at least one crop; :func:`transforms.working_size`).
    Crops: ``clip.image_size`` square, every ``cfg.stride`` working pixels (0 = half a crop), edges included,
    encoded ``cfg.clip_batch_size`` per call. = :func:`stitch_dense` of :func:`dense_crops` (the stage packs the
    crops of several images into its batches: ``pipeline.core.overlap.packed_batches``).
    """
    crops = dense_crops(rgb, cfg, image_size=clip.image_size, patch_size=clip.patch_size)
    patches, tokens = [], []
    step = max(1, cfg.clip_batch_size)
    for i in range(0, len(crops.crops), step):
        f = clip.encode_image(crops.crops[i : i + step])
        patches.append(f.patch)
        tokens.append(f.cls)
    return stitch_dense(crops, np.concatenate(patches), np.concatenate(tokens))


def dense_sample(image_id: str, features: DenseClip) -> tuple[dict[str, Any], dict[str, Any]]:
    """(WebDataset sample ``{__key__, dense.npy, cls.npy, json}``, metadata row). Features stored float16."""
    meta = features.meta(image_id)
    sample = {
        "__key__": image_id,
        "dense.npy": npy_bytes(features.dense.astype(FEATURE_DTYPE)),
        "cls.npy": npy_bytes(features.cls.astype(FEATURE_DTYPE)),
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
    }
    return sample, meta


def iter_dense_features(tar_path: str) -> Iterator[tuple[str, DenseClip]]:
    """(image_id, DenseClip) for every sample of a dense-features shard tar, in stored (manifest) order."""
    for sample in wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        dense = npy_array(sample["dense.npy"])
        cls_tokens = npy_array(sample["cls.npy"])
        yield sample["__key__"], DenseClip.from_meta(meta, dense, cls_tokens)


def join_features(
    images: Iterator[tuple[str, np.ndarray, dict[str, Any]]], features: Iterator[tuple[str, DenseClip]],
) -> Iterator[tuple[str, np.ndarray, DenseClip]]:
    """(image_id, rgb, features) for the images that have features. Both iterators must follow the same (manifest)
    order, features being a subsequence of images (a dense shard skips its rejects), so one pass streams both."""
    for image_id, dense in features:
        for other_id, rgb, _meta in images:
            if other_id == image_id:
                yield image_id, rgb, dense
                break
        else:
            raise ValueError(f"features of {image_id} have no image in the ingest shard (or are out of order)")


# ----------------------------------------------------------------------------------------------------- text + detection
@dataclass(frozen=True)
class Detection:
    """crop_classes int64 ``[C]`` (argmax class per crop), crop_scores float32 ``[C]`` (its CLS·text cosine),
    counts int64 ``[K]`` (crops per class), present: detected class indices, ascending."""

    crop_classes: np.ndarray
    crop_scores: np.ndarray
    counts: np.ndarray
    present: tuple[int, ...]


def detect_classes(cls_tokens: np.ndarray, text: np.ndarray, cfg: FmbsegDetectParams) -> Detection:
    """Each crop (CLS ``[C, D]``) → the class with the highest cosine to ``text`` ``[K, D]``; a class is present
    when assigned to MORE than ``cfg.min_crops`` crops (paper §3.2)."""
    sim = np.asarray(cls_tokens, np.float32) @ np.asarray(text, np.float32).T  # [C, K]
    best = sim.argmax(axis=1)
    counts = np.bincount(best, minlength=text.shape[0])
    present = tuple(int(k) for k in np.flatnonzero(counts > cfg.min_crops))
    return Detection(crop_classes=best.astype(np.int64), crop_scores=sim.max(axis=1).astype(np.float32),
                     counts=counts.astype(np.int64), present=present)


def detection_rows(image_id: str, vocab: Vocabulary, detection: Detection | None, classes: Sequence[int],
                   source: str) -> list[dict[str, Any]]:
    """Rows of schemas.fmbseg.DETECTIONS, one per present class (``detection`` None for image-level labels)."""
    rows = []
    for k in sorted(set(classes)):
        if detection is not None:
            crops = np.flatnonzero(detection.crop_classes == k)
            score = float(detection.crop_scores[crops].max()) if len(crops) else 0.0
        else:
            crops, score = np.zeros(0, np.int64), 1.0
        rows.append({"image_id": image_id, "class_index": int(k), "class_name": vocab.classes[k], "source": source,
                     "crop_count": int(len(crops)), "crop_indices": [int(c) for c in crops], "score": score})
    return rows


# ----------------------------------------------------------------------------------------------------- masks
@dataclass
class PseudoMask:
    """One class-labelled mask of one image (original frame).

    mask: bool ``[H, W]``; score: SAM's predicted IoU; similarity: cosine of the class text to the evidence
    (1.1: mean over the query cells; 1.2: the mask's mean dense feature); points_xy: float ``[P, 2]`` (x, y)
    original pixels (1.1: the query points, most similar first; 1.2: the generator's grid point).
    """

    stage: str
    class_index: int
    mask: np.ndarray
    score: float
    similarity: float
    points_xy: np.ndarray
    multimask_index: int = -1
    stability: float = -1.0

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def query_points(features: DenseClip, text_vec: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` grid cells most similar to ``text_vec`` ``[D]`` → (points_xy float64 ``[k, 2]`` (x, y) cell
    centres in ORIGINAL pixels, most similar first; their cosines ``[k]``). Ties go to the lower row-major index."""
    sim = (features.dense @ np.asarray(text_vec, np.float32)).ravel()
    k = min(int(top_k), sim.size)
    order = np.argsort(-sim, kind="stable")[:k]
    rows, cols = flat_to_rowcol(order, features.windows.grid_hw)
    return grid_cells_to_original_xy(rows, cols, features.patch, features.resize), sim[order]


@dataclass(frozen=True)
class DecodedQueries:
    """Stage 1.1's SAM decoding of one image (:func:`decode_query_points`), reduced where the model ran: per class
    (``classes`` order) the query points (x, y) original pixels float32 ``[k, 2]``, their mean cosine, and — as
    :class:`pipeline.core.overlap.HostCopy` chunks on their way to the host — the highest-IoU output's index, predicted
    IoU and binary mask (logits > 0) bool ``[H, W]``."""

    classes: tuple[int, ...]
    points: tuple[np.ndarray, ...]
    similarity: tuple[float, ...]
    index: tuple[Any, ...] = ()
    iou: tuple[Any, ...] = ()
    masks: tuple[Any, ...] = ()


def decode_query_points(
    segmenter, embedding, features: DenseClip, text: np.ndarray, classes: Sequence[int], cfg: FmbsegQueryMasksParams,
    *, chunk: int = 8,
) -> DecodedQueries:
    """The model half of :func:`query_point_masks`: one prompt of ``cfg.top_k`` positive points per class (SAM's
    three outputs when ``cfg.multimask``), decoded by
    ``segmenter.predict_device`` ``chunk`` classes per call; the best-IoU output is chosen and thresholded on the
    device, only binary masks start their copy to the host. Nothing here waits for the device."""
    import torch

    from pseudoseg.pipeline.core.overlap import HostCopy

    classes = tuple(int(c) for c in classes)
    if not classes:
        return DecodedQueries(classes=(), points=(), similarity=())
    pts, sims = zip(*(query_points(features, text[c], cfg.top_k) for c in classes), strict=True)
    points = tuple(p.astype(np.float32) for p in pts)  # [k, 2] (x, y) original pixels
    index, iou, masks = [], [], []
    for start in range(0, len(classes), chunk):
        batch = np.stack(points[start : start + chunk])
        predict = getattr(segmenter, "predict_device", segmenter.predict)  # duck-typed segmenters: predict
        pred = predict(embedding, points_xy=batch, point_labels=np.ones(batch.shape[:2], np.int64),
                       multimask=cfg.multimask)
        logits, iou_pred = pred.logits, pred.iou_pred
        if not torch.is_tensor(logits):  # a backend without a device answered with numpy arrays
            logits, iou_pred = torch.from_numpy(np.asarray(logits)), torch.from_numpy(np.asarray(iou_pred))
        best = iou_pred.argmax(dim=1)
        rows = torch.arange(len(batch), device=best.device)
        index.append(HostCopy(best))
        iou.append(HostCopy(iou_pred[rows, best]))
        masks.append(HostCopy(logits[rows, best] > 0.0))
    return DecodedQueries(classes=classes, points=points, similarity=tuple(float(np.mean(s)) for s in sims),
                          index=tuple(index), iou=tuple(iou), masks=tuple(masks))


def finish_query_points(decoded: DecodedQueries) -> list[PseudoMask]:
    """The host half of :func:`query_point_masks` (thread-safe): one :class:`PseudoMask` per class, in order."""
    if not decoded.classes:
        return []
    index, iou, masks = (np.concatenate([c.numpy() for c in parts])
                         for parts in (decoded.index, decoded.iou, decoded.masks))
    return [PseudoMask(stage=STAGE_11, class_index=c, mask=masks[n], score=float(iou[n]),
                       similarity=decoded.similarity[n], points_xy=decoded.points[n].astype(np.float64),
                       multimask_index=int(index[n]))
            for n, c in enumerate(decoded.classes)]


def query_point_masks(
    segmenter, embedding, features: DenseClip, text: np.ndarray, classes: Sequence[int], cfg: FmbsegQueryMasksParams,
    *, chunk: int = 8,
) -> list[PseudoMask]:
    """Stage 1.1 for the ``classes`` of one image: one prompt of ``cfg.top_k`` positive points per class, batched in
    one decoder call per ``chunk`` classes; keeps each prompt's mask with the highest predicted IoU.

    embedding: ``segmenter.embed(rgb)`` of the original image (one encoding for all classes).
    = :func:`finish_query_points` of :func:`decode_query_points` (the stage runs the halves on either side of its
    model loop).
    """
    return finish_query_points(decode_query_points(segmenter, embedding, features, text, classes, cfg, chunk=chunk))


def mask_mean_features(features: DenseClip, masks: Sequence[np.ndarray]) -> np.ndarray:
    """float32 ``[M, D]``: per mask (bool ``[H, W]`` original frame) the mean dense feature over its pixels, each
    pixel taking the feature of the grid cell its centre falls in. Empty masks give zeros."""
    cells = pixel_cell_index(features.resize, features.patch)
    flat = features.dense.reshape(-1, features.dense.shape[-1])
    out = np.zeros((len(masks), flat.shape[1]), np.float32)
    for i, m in enumerate(masks):
        counts = np.bincount(cells[np.asarray(m, bool)], minlength=len(flat)).astype(np.float32)
        if counts.sum() > 0:
            out[i] = counts @ flat / counts.sum()
    return out


def label_auto_masks(
    auto_masks: Sequence[Mapping[str, Any]], features: DenseClip, text: np.ndarray, classes: Sequence[int],
    cfg: FmbsegAutoMasksParams,
) -> list[PseudoMask]:
    """Stage 1.2: SAM automatic-generator records (dicts with 'segmentation' bool ``[H, W]``, 'predicted_iou',
    'stability_score', 'point_coords'; made with ``cfg.amg()``) → masks whose area is within
    [``cfg.min_area_fraction``, ``cfg.max_area_fraction``] of the image, each
    labelled with the detected class (among ``classes``) most similar to its mean dense feature. Order kept."""
    classes = list(classes)
    h, w = features.resize.orig_hw
    kept = [m for m in auto_masks
            if cfg.min_area_fraction * h * w <= int(np.asarray(m["segmentation"]).sum()) <= cfg.max_area_fraction * h * w]
    if not kept or not classes:
        return []
    means = _unit(mask_mean_features(features, [m["segmentation"] for m in kept]))
    sims = means @ np.asarray(text, np.float32)[classes].T  # [M, len(classes)]
    out = []
    for m, row in zip(kept, sims, strict=True):
        j = int(row.argmax())
        out.append(PseudoMask(
            stage=STAGE_12, class_index=int(classes[j]), mask=np.asarray(m["segmentation"], bool),
            score=float(m.get("predicted_iou", 0.0)), similarity=float(row[j]),
            points_xy=np.asarray(m.get("point_coords", np.zeros((0, 2))), np.float64).reshape(-1, 2),
            stability=float(m.get("stability_score", -1.0)),
        ))
    return out


def mask_rows(image_id: str, vocab: Vocabulary, masks: Sequence[PseudoMask]) -> list[dict[str, Any]]:
    """Rows of schemas.fmbseg.PSEUDO_MASKS (RLE via pycocotools), mask_index in the given order."""
    rows = []
    for i, m in enumerate(masks):
        rle = encode_rle(m.mask)
        rows.append({
            "image_id": image_id, "mask_index": i, "stage": m.stage, "class_index": m.class_index,
            "class_name": vocab.classes[m.class_index], **rle_row_fields(rle),
            "area": m.area, "bbox": rle_bbox(rle), "score": float(m.score),
            "similarity": float(m.similarity), "points_xy": [[float(x), float(y)] for x, y in m.points_xy],
            "multimask_index": int(m.multimask_index), "stability": float(m.stability),
        })
    return rows


# ----------------------------------------------------------------------------------------------------- merge
def paint_order(masks: Sequence[PseudoMask], precedence: str) -> list[int]:
    """Indices of ``masks`` in painting order: later ones overwrite earlier ones, so the LAST has precedence.

    - ``stage11_first`` (the shipped setting): any Stage 1.1 pixel beats Stage 1.2 (1.2 fills what 1.1 left, as the paper
      uses it: complementary masks for small objects and missed instances);
    - ``stage12_first``: the reverse;
    - ``confidence``: higher SAM predicted IoU wins whatever the stage (ties: Stage 1.1).
    Within equal keys the higher predicted IoU wins, then the smaller mask (detail on top of wholes), then the
    earlier mask.
    """
    if precedence not in PRECEDENCES:
        raise ValueError(f"unknown precedence {precedence!r}; known: {PRECEDENCES}")

    def key(i: int) -> tuple:
        m = masks[i]
        is11 = m.stage == STAGE_11
        stage_rank = {"stage11_first": is11, "stage12_first": not is11, "confidence": 0}[precedence]
        return (stage_rank, m.score, is11, -m.area, -i)

    return sorted(range(len(masks)), key=key)


def merge_label_map(
    hw: tuple[int, int], masks: Sequence[PseudoMask], cfg: FmbsegLabelsParams
) -> tuple[np.ndarray, np.ndarray]:
    """(label uint8 ``[H, W]`` with 255 = unlabelled, source uint8 ``[H, W]``: 0 none, 11 = Stage 1.1, 12 = 1.2),
    painted in ``paint_order(masks, cfg.precedence)``."""
    label = np.full(hw, UNLABELLED, np.uint8)
    source = np.zeros(hw, np.uint8)
    for i in paint_order(masks, cfg.precedence):
        m = masks[i].mask
        if m.shape != tuple(hw):
            raise ValueError(f"mask {i} is {m.shape}, the image is {hw}")
        label[m] = masks[i].class_index
        source[m] = 11 if masks[i].stage == STAGE_11 else 12
    return label, source


def label_region_rows(image_id: str, vocab: Vocabulary, label: np.ndarray, source: np.ndarray) -> list[dict]:
    """Rows of schemas.fmbseg.LABEL_REGIONS: one per class present in the merged map (ascending class index)."""
    rows = []
    for c in np.unique(label):
        if c == UNLABELLED:
            continue
        region = label == c
        rle = encode_rle(region)
        rows.append({
            "image_id": image_id, "class_index": int(c), "class_name": vocab.classes[int(c)],
            **rle_row_fields(rle),
            "area": int(region.sum()), "bbox": rle_bbox(rle),
            "pixels_stage11": int((region & (source == 11)).sum()),
            "pixels_stage12": int((region & (source == 12)).sum()),
        })
    return rows


def label_map_meta(image_id: str, vocab: Vocabulary, label: np.ndarray, precedence: str) -> dict[str, Any]:
    """The label-map sample's JSON record (schemas.fmbseg.LABEL_MAP_META)."""
    present = [int(c) for c in np.unique(label) if c != UNLABELLED]
    return {
        "image_id": image_id, "height": int(label.shape[0]), "width": int(label.shape[1]),
        "vocabulary": vocab.name, "vocabulary_digest": vocab.digest, "unlabelled": UNLABELLED,
        "class_indices": present, "class_names": [vocab.classes[c] for c in present],
        "labelled_pixels": int((label != UNLABELLED).sum()), "precedence": precedence,
    }


def class_table(vocab: Vocabulary) -> dict[str, Any]:
    """The label value → class name table stored beside the label maps (JSON)."""
    return {"vocabulary": vocab.name, "digest": vocab.digest, "unlabelled": UNLABELLED,
            "classes": [{"index": i, "name": c, "prompts": list(p)}
                        for i, (c, p) in enumerate(zip(vocab.classes, vocab.prompts, strict=True))]}


# ----------------------------------------------------------------------------------------------------- image labels
@dataclass
class ImageLabels:
    """Image-level class names keyed by ingest image_id, source basename and full source path (as GT captions)."""

    by_id: dict[str, list[str]] = field(default_factory=dict)
    by_basename: dict[str, list[str]] = field(default_factory=dict)
    by_path: dict[str, list[str]] = field(default_factory=dict)

    def lookup(self, image_id: str, source: str) -> list[str] | None:
        """The image's class names (None when the file does not list the image)."""
        base = source.rsplit("::", 1)[-1].replace("\\", "/").rsplit("/", 1)[-1]
        for table, key in ((self.by_id, image_id), (self.by_basename, base), (self.by_path, source)):
            if key in table:
                return list(table[key])
        return None


def load_image_labels(path: str) -> ImageLabels:
    """Parquet with key columns among ``image_id``, ``file_name`` (basename), ``path`` (full source) and either
    ``class_name`` (one row per label) or ``class_names`` (list of strings per image)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    names = set(table.column_names)
    keys = [k for k in ("image_id", "file_name", "path") if k in names]
    value = "class_names" if "class_names" in names else "class_name" if "class_name" in names else None
    if not keys or value is None:
        raise ValueError(f"{path}: image labels need a key column (image_id|file_name|path) and class_name or "
                         f"class_names; found {sorted(names)}")
    out = ImageLabels()
    targets = {"image_id": out.by_id, "file_name": out.by_basename, "path": out.by_path}
    for row in table.to_pylist():
        labels = row[value] if value == "class_names" else [row[value]]
        labels = [str(v).strip() for v in (labels or []) if v is not None and str(v).strip()]
        for k in keys:
            if row[k] is not None:
                key = str(row[k]).rsplit("/", 1)[-1] if k == "file_name" else str(row[k])
                bucket = targets[k].setdefault(key, [])
                bucket.extend(v for v in labels if v not in bucket)
    return out
