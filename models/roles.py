"""Role interfaces the pipeline codes against, and the small frozen records they return.

Conventions at every boundary (stated again on each method):
- images: `np.ndarray` uint8 RGB, shape `[H, W, 3]` (row-major: H rows, W columns);
- boxes: `xyxy` float32 `[N, 4]` = (x0, y0, x1, y1) in pixels of the given image, x = column, y = row;
- points: `(x, y)` pixels, x = column, y = row — never (row, col);
- all returned arrays are numpy float32 on the host, whatever device the model ran on (except where a caller asks
  for device tensors: `Segmenter.predict_device`).
Batch methods (`Segmenter.embed_batch`, `Grounder.ground_batch`) return exactly what the one-item methods return for
each item, up to float rounding; their defaults here loop over the one-item methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


# ----------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Grounding:
    """Boxes a grounder found for one caption on one image.

    boxes_xyxy: float32 [N, 4], (x0, y0, x1, y1) pixels of the input image (x = column).
    scores: float32 [N], per box the max over text tokens of `token_probs` (the official box score).
    token_probs: float32 [N, T], per box the sigmoid probability of every text token of the tokenised caption.
    token_char_spans: T pairs `(start, end)`, character offsets into the caption passed to `ground`
        (`caption[start:end]` is the token's text); special/added tokens have `(-1, -1)`.
    text_threshold: the threshold the caller asked for; `token_mask()` applies it the official way.
    """

    boxes_xyxy: np.ndarray
    scores: np.ndarray
    token_probs: np.ndarray
    token_char_spans: tuple[tuple[int, int], ...]
    text_threshold: float = 0.25

    def token_mask(self) -> np.ndarray:
        """bool [N, T]: tokens above `text_threshold` that map to caption characters (the box's phrase tokens)."""
        real = np.array([s >= 0 for s, _ in self.token_char_spans], dtype=bool)
        return (self.token_probs > self.text_threshold) & real[None, :]


@dataclass(frozen=True)
class SamImageEmbedding:
    """One SAM image encoding, reusable for any number of prompt batches on the same image.

    features: torch.Tensor float [1, 256, 64, 64] on the segmenter's device (image-encoder output).
    original_size: (H, W) of the image given to `embed`.
    input_size: (h, w) of the image after SAM's ResizeLongestSide (longest side = 1024), before padding.
    """

    features: Any
    original_size: tuple[int, int]
    input_size: tuple[int, int]


@dataclass(frozen=True)
class MaskPrediction:
    """SAM decoder output for N prompts with M masks each (M = 3 if multimask else 1).

    logits: float32 [N, M, H, W] at the original image resolution; mask = logits > 0 (SAM's mask_threshold).
    iou_pred: float32 [N, M], SAM's predicted IoU per mask.
    low_res_logits: float32 [N, M, 256, 256], the decoder's raw output (SAM's padded 1024-square frame).
    """

    logits: np.ndarray
    iou_pred: np.ndarray
    low_res_logits: np.ndarray

    def masks(self, threshold: float = 0.0) -> np.ndarray:
        """bool [N, M, H, W]."""
        return self.logits > threshold


@dataclass(frozen=True)
class ClipImageFeatures:
    """cls: float32 [B, D], projected image embedding, L2-normalised.
    patch: float32 [B, h, w, D], dense MaskCLIP patch embeddings in the same joint space, L2-normalised;
        patch[b, i, j] covers rows i*p:(i+1)*p and columns j*p:(j+1)*p of the input crop (p = patch_size).
    """

    cls: np.ndarray
    patch: np.ndarray


@dataclass(frozen=True)
class DenseFeatures:
    """cls: float32 [B, L, C]; patches: float32 [B, L, h, w, C] (patch [i, j] = rows i*p.., columns j*p..);
    layers: the L block indices (0-based) the features come from, in the order of axis 1.
    """

    cls: np.ndarray
    patches: np.ndarray
    layers: tuple[int, ...]


@dataclass(frozen=True)
class Sampling:
    """How a captioner generates: at most `max_new_tokens` new tokens; temperature <= 0 → greedy, else sampled with
    `temperature`, `top_p`, `top_k` from a generator seeded with `seed`."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


# ----------------------------------------------------------------------------------------------------- roles
class Captioner(ABC):
    @abstractmethod
    def caption(self, images: Sequence[np.ndarray], prompt: str, sampling: Sampling) -> list[str]:
        """Caption each image (uint8 RGB [H, W, 3], sizes may differ) with the same `prompt`.

        Returns one string per image (only the newly generated text, stripped). Sampling is seeded: the same
        images in the same batch order with the same `sampling` give the same strings.
        """


class Grounder(ABC):
    max_text_tokens: int  # captions are cut to this many tokens (special tokens included; as officially, no [SEP] re-added)

    @abstractmethod
    def ground(self, image: np.ndarray, caption: str, *, box_threshold: float, text_threshold: float) -> Grounding:
        """Find boxes for the phrases of `caption` in `image` (uint8 RGB [H, W, 3]).

        Keeps boxes whose best token probability exceeds `box_threshold`; boxes are xyxy float32 pixels of
        `image` (x = column). See `Grounding` for the token axes.
        """

    def prepare(self, image: np.ndarray) -> Any:
        """Host-side preprocessing of one image for `ground_batch` (thread-safe: stages run it beside decoding,
        ahead of the model loop). Default: the image itself."""
        return image

    def ground_batch(self, images: Sequence[np.ndarray], queries: Sequence[tuple[int, str]], *, box_threshold: float,
                     text_threshold: float, batch_size: int | None = None,
                     prepared: Sequence[Any] | None = None) -> list[Grounding]:
        """`ground(images[i], caption)` for every query `(i, caption)`, in query order. A backend encodes each image
        once for all its captions and runs up to `batch_size` captions per forward (None: all); prepared: the
        images' `prepare` outputs, if computed ahead. The default loops over `ground`."""
        return [self.ground(images[i], caption, box_threshold=box_threshold, text_threshold=text_threshold)
                for i, caption in queries]

    @abstractmethod
    def count_tokens(self, caption: str) -> int:
        """Tokens (special tokens included) `ground` would feed the model for `caption`, before truncation to
        `max_text_tokens`; lets callers split long captions into windows that fit."""


def prompt_arrays(boxes_xyxy: np.ndarray | None = None, points_xy: np.ndarray | None = None,
                  point_labels: np.ndarray | None = None) -> tuple[np.ndarray | None, ...]:
    """`Segmenter.predict`'s prompts, checked and as arrays: boxes float32 [N, 4]; points float32 [N, P, 2] with
    their labels [N, P] (default all 1); at least one of the two, with the same N."""
    boxes = points = labels = None
    if boxes_xyxy is not None:
        boxes = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    if points_xy is not None:
        points = np.asarray(points_xy, dtype=np.float32)
        if points.ndim != 3 or points.shape[2] != 2:
            raise ValueError(f"points_xy must be [N, P, 2] (x, y), got {points.shape}")
        labels = np.ones(points.shape[:2]) if point_labels is None else np.asarray(point_labels)
        if labels.shape != points.shape[:2]:
            raise ValueError(f"point_labels must be [N, P] = {points.shape[:2]}, got {labels.shape}")
    if boxes is None and points is None:
        raise ValueError("predict needs boxes_xyxy and/or points_xy")
    if boxes is not None and points is not None and len(boxes) != len(points):
        raise ValueError(f"boxes ({len(boxes)}) and points ({len(points)}) must have the same N")
    return boxes, points, labels


class Segmenter(ABC):
    @abstractmethod
    def embed(self, image: np.ndarray) -> SamImageEmbedding:
        """Encode one uint8 RGB image [H, W, 3] once; the result serves any number of `predict` calls."""

    def prepare(self, image: np.ndarray) -> Any:
        """Host-side preprocessing of one image for `embed_batch` (thread-safe: stages run it beside decoding,
        ahead of the model loop). Default: the image itself."""
        return image

    def embed_batch(self, images: Sequence[np.ndarray], prepared: Sequence[Any] | None = None
                    ) -> list[SamImageEmbedding]:
        """`embed` of each image (one encoder forward for all where the model allows); prepared: `prepare` outputs."""
        return [self.embed(image) for image in images]

    @abstractmethod
    def predict(
        self,
        embedding: SamImageEmbedding,
        *,
        boxes_xyxy: np.ndarray | None = None,
        points_xy: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        multimask: bool = True,
    ) -> MaskPrediction:
        """Decode N prompts in one batched call.

        boxes_xyxy: float [N, 4], (x0, y0, x1, y1) pixels of the original image.
        points_xy: float [N, P, 2], (x, y) pixels of the original image (x = column); point_labels: int [N, P],
            1 = foreground, 0 = background. Boxes and points may be combined (same N).
        Returns `MaskPrediction` with M = 3 masks per prompt if multimask else 1.
        """

    def predict_device(self, embedding: SamImageEmbedding, *, multimask: bool = True,
                       **prompts: Any) -> MaskPrediction:
        """`predict` (same keyword arguments), with the arrays left where the model computed them: float32 torch
        tensors on its device, nothing copied to the host and no synchronisation, for callers that reduce the logits
        there (thresholds, stability) and copy only binary masks. Default: `predict` (numpy arrays)."""
        return self.predict(embedding, multimask=multimask, **prompts)

    @abstractmethod
    def automatic_masks(self, image: np.ndarray, *, embedding: SamImageEmbedding | None = None,
                        **params: Any) -> list[dict]:
        """SAM's automatic mask generator on a uint8 RGB image [H, W, 3] (embedding: this image's `embed`
        output, to skip re-encoding it).

        params: points_per_side, pred_iou_thresh, stability_score_thresh, min_mask_region_area, ... as
        `SamAutomaticMaskGenerator` (output_mode is always 'binary_mask'). Each dict has 'segmentation'
        (bool [H, W]), 'area', 'bbox' (x, y, w, h pixels, XYWH), 'predicted_iou', 'point_coords' ([[x, y]]),
        'stability_score', 'crop_box' (XYWH).
        """


class ClipEncoder(ABC):
    embed_dim: int  # D, joint image-text space
    patch_size: int  # p, pixels per patch side
    image_size: int  # S, the crop side the vision tower expects

    @abstractmethod
    def encode_image(self, images: np.ndarray) -> ClipImageFeatures:
        """images: uint8 RGB [B, S, S, 3] with S == image_size (the caller cuts and resizes crops).

        Returns cls float32 [B, D] and dense patch float32 [B, S/p, S/p, D], both L2-normalised.
        """

    @abstractmethod
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """texts: N strings → float32 [N, D] projected, L2-normalised text embeddings."""


class DenseEncoder(ABC):
    patch_size: int  # p
    hidden_size: int  # C
    num_layers: int  # number of transformer blocks

    @abstractmethod
    def encode(self, images: np.ndarray, layers: Sequence[int] | None = None) -> DenseFeatures:
        """images: uint8 RGB [B, H, W, 3] with H, W multiples of patch_size.

        layers: 0-based block indices (negative counts from the end); default only the last block. The last
        block's output gets the model's final layernorm (as `last_hidden_state`); other blocks are raw.
        Returns `DenseFeatures` with cls [B, L, C] and patches [B, L, H/p, W/p, C], float32.
        """
