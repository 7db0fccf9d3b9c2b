"""SAM (segment-anything) as the `Segmenter` role: one image encoding, batched prompt decoding, automatic masks."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pseudoseg.models.adapters._hf import autocast, model_device, to_numpy
from pseudoseg.models.adapters.weights import load_state_strict, load_weights
from pseudoseg.models.catalog import SAM_ARCHS, SAM_CHECKPOINT_URLS, ModelUnavailableError  # noqa: F401 (re-exported)
from pseudoseg.models.roles import MaskPrediction, SamImageEmbedding, Segmenter, prompt_arrays


# `_build_sam` keyword arguments per image-encoder size; vit_* are the official ones (segment_anything.build_sam).
def build_sam_arch(arch: dict[str, Any], checkpoint: str | None):
    """`segment_anything.build_sam._build_sam(**arch, checkpoint=...)`; checkpoint None → random init."""
    from segment_anything.build_sam import _build_sam

    return _build_sam(**arch, checkpoint=checkpoint)


def load_sam(arch: dict[str, Any], checkpoint: str, *, key: str = "sam_checkpoint"):
    """Build SAM with `arch` (a `SAM_ARCHS` value) and load the state_dict `.pth` at `checkpoint` (real or tiny)."""
    path = Path(checkpoint).expanduser() if checkpoint else None
    if path is None or not path.is_file():
        urls = ", ".join(f"{k}: {v}" for k, v in SAM_CHECKPOINT_URLS.items())
        raise ModelUnavailableError(
            f"The SAM segmenter checkpoint '{checkpoint}' does not exist; it comes from the config key "
            f"`[models] {key} = {checkpoint}` (with `[models] sam_arch` naming its size). Download the official "
            f"checkpoint on a connected machine ({urls}), copy it to a local path here and set `[models] {key} = /path/to/file.pth` "
            f"(or set `[models] preset = tiny` for the offline random-init models)."
        )
    # Built empty, then filled by our own loader (segment-anything's `_build_sam` would torch.load it with the
    # torch default and load_state_dict without naming the file): weights only, every key accounted for.
    state = load_weights(path, what=f"SAM segmenter (`[models] {key}`)")
    sam = build_sam_arch(arch, None)
    load_state_strict(sam, state, path=path, what=f"SAM segmenter (`[models] {key}`)")
    return sam.eval()


class SamSegmenter(Segmenter):
    """SAM over segment-anything's own modules; prompts go through its `ResizeLongestSide` transform."""

    def __init__(self, sam, *, device: str = "auto", source: str = "") -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.device = model_device(device)
        self.sam = sam.to(self.device).eval()
        self.source = source
        self.transform = ResizeLongestSide(self.sam.image_encoder.img_size)

    @classmethod
    def from_checkpoint(cls, arch: str | dict[str, Any], checkpoint: str, *, device: str = "auto") -> SamSegmenter:
        """arch: a `SAM_ARCHS` name ('vit_h', 'vit_l', 'vit_b', 'tiny') or its dict; checkpoint: state_dict `.pth`."""
        if isinstance(arch, str):
            if arch not in SAM_ARCHS:
                raise ValueError(f"unknown sam_arch {arch!r}; known: {sorted(SAM_ARCHS)}")
            arch = SAM_ARCHS[arch]
        return cls(load_sam(arch, checkpoint), device=device, source=str(checkpoint))

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Host half of `SamPredictor.set_image` for one uint8 RGB image [H, W, 3]: ResizeLongestSide to 1024 →
        uint8 [h, w, 3]. Thread-safe: stages run it ahead of the model loop, beside the decoding."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"SAM expects uint8 RGB [H, W, 3], got {image.dtype} {image.shape}")
        return self.transform.apply_image(image)

    def embed(self, image: np.ndarray) -> SamImageEmbedding:
        """image: uint8 RGB [H, W, 3] → `SamImageEmbedding` (features [1, 256, 64, 64], original (H, W), input (h, w)).

        Same steps as `SamPredictor.set_image`: resize longest side to 1024, normalise, pad, encode.
        """
        return self.embed_batch([image])[0]

    @torch.inference_mode()
    def embed_batch(self, images: Sequence[np.ndarray], prepared: Sequence[np.ndarray] | None = None
                    ) -> list[SamImageEmbedding]:
        """`embed` of several images in ONE image-encoder forward (each is padded to 1024² by SAM's `preprocess`, so
        any sizes stack). prepared: their `prepare` outputs, if already computed. features[i] is a [1, 256, 64, 64]
        view of the batch output, on the device."""
        if not len(images):
            return []
        resized = list(prepared) if prepared is not None else [self.prepare(im) for im in images]
        inputs, sizes = [], []
        for r in resized:
            x = torch.as_tensor(r, device=self.device).permute(2, 0, 1).contiguous()[None]
            sizes.append(tuple(int(v) for v in x.shape[-2:]))
            inputs.append(self.sam.preprocess(x))
        with autocast(self.device):
            features = self.sam.image_encoder(torch.cat(inputs)).float()
        return [SamImageEmbedding(features=features[i : i + 1], original_size=(int(im.shape[0]), int(im.shape[1])),
                                  input_size=size) for i, (im, size) in enumerate(zip(images, sizes, strict=True))]

    def predict(self, embedding: SamImageEmbedding, *, multimask: bool = True, **prompts: Any) -> MaskPrediction:
        """All N prompts (`Segmenter.predict`'s keywords) in one batched decoder call, as
        `SamPredictor.predict_torch`. Returns logits float32 [N, M, H, W] (original size; > 0 is the mask), iou_pred
        [N, M], low_res_logits [N, M, 256, 256]; M = 3 if multimask else 1. Memory is N*M*H*W*4 bytes: callers with
        hundreds of prompts on large images pass them in chunks."""
        pred = self.predict_device(embedding, multimask=multimask, **prompts)
        return MaskPrediction(*(to_numpy(t) for t in (pred.logits, pred.iou_pred, pred.low_res_logits)))

    @torch.inference_mode()
    def predict_device(self, embedding: SamImageEmbedding, *, multimask: bool = True,
                       **prompts: Any) -> MaskPrediction:
        """`predict` with logits, iou_pred, low_res_logits left as float32 tensors on the segmenter's device (nothing
        copied to the host, no synchronisation), for callers that reduce the logits there."""
        boxes_xyxy, points_xy, point_labels = prompt_arrays(**prompts)
        size = embedding.original_size
        boxes = points = None
        if boxes_xyxy is not None:
            boxes = torch.as_tensor(self.transform.apply_boxes(boxes_xyxy, size), dtype=torch.float32,
                                    device=self.device)
        if points_xy is not None:
            coords = torch.as_tensor(self.transform.apply_coords(points_xy, size), dtype=torch.float32,
                                     device=self.device)
            points = (coords, torch.as_tensor(point_labels, dtype=torch.int, device=self.device))
        with autocast(self.device):
            sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
            low_res, iou = self.sam.mask_decoder(
                image_embeddings=embedding.features.to(self.device),
                image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        logits = self.sam.postprocess_masks(low_res.float(), embedding.input_size, embedding.original_size)
        return MaskPrediction(logits=logits, iou_pred=iou.float(), low_res_logits=low_res.float())

    def automatic_masks(self, image: np.ndarray, *, embedding: SamImageEmbedding | None = None,
                        **params: Any) -> list[dict]:
        """`SamAutomaticMaskGenerator(sam, **params).generate(image)` on uint8 RGB [H, W, 3].

        params: points_per_side, points_per_batch, pred_iou_thresh, stability_score_thresh, min_mask_region_area,
        crop_n_layers, ... (output_mode is forced to 'binary_mask'). Dicts as documented on `Segmenter`:
        'segmentation' bool [H, W], 'bbox' XYWH pixels, 'point_coords' [[x, y]], 'predicted_iou', ...
        embedding: this image's `embed` output (e.g. from the shared SAM embedding stage): the whole-image crop
        then skips the image encoder (crops of crop_n_layers > 0 are still encoded).
        """
        from segment_anything import SamAutomaticMaskGenerator

        image = np.asarray(image)
        params = {**params, "output_mode": "binary_mask"}
        generator = SamAutomaticMaskGenerator(self.sam, **params)
        if embedding is not None:
            if tuple(embedding.original_size) != tuple(image.shape[:2]):
                raise ValueError(f"SAM embedding of a {embedding.original_size} image given for a "
                                 f"{image.shape[:2]} image")
            generator.predictor = _embedded_predictor_class()(self.sam, embedding)
        # No autocast here: segment-anything's amg helpers convert tensors to numpy, which bf16 cannot do.
        with torch.inference_mode():
            return generator.generate(np.asarray(image))


@functools.cache
def _embedded_predictor_class() -> type:
    """Built on first use: importing segment_anything costs ~1.5 s (torchvision)."""
    from segment_anything import SamPredictor

    class EmbeddedPredictor(SamPredictor):
        """A `SamPredictor` that answers `set_image` of the full image with a precomputed embedding (the automatic
        generator calls set_image once per crop; other crops are encoded as usual)."""

        def __init__(self, sam, embedding: SamImageEmbedding) -> None:
            super().__init__(sam)
            self.embedding = embedding

        def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
            if tuple(image.shape[:2]) != tuple(self.embedding.original_size):
                super().set_image(image, image_format)
                return
            self.reset_image()
            self.original_size = tuple(self.embedding.original_size)
            self.input_size = tuple(self.embedding.input_size)
            self.features = self.embedding.features.to(self.device, torch.float32)
            self.is_image_set = True

    return EmbeddedPredictor
