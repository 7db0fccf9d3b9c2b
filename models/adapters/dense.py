"""DINOv2 dense patch features (transformers `Dinov2Model`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pseudoseg.models.adapters._hf import HFAdapter, autocast, to_numpy
from pseudoseg.models.catalog import DEFAULT_DINO
from pseudoseg.models.roles import DenseEncoder, DenseFeatures


class HFDinoEncoder(HFAdapter, DenseEncoder):
    """`Dinov2Model` + the mean/std of its `AutoImageProcessor`, from one hub id or folder."""

    def __init__(self, model_id: str = DEFAULT_DINO, *, device: str = "auto", key: str = "dino") -> None:
        from transformers import AutoImageProcessor, Dinov2Model

        super().__init__(model_id, device, role="DINOv2", key=key, hub_id=DEFAULT_DINO)
        self.model = self.load_model(Dinov2Model.from_pretrained, dtype=torch.float32).to(self.device).eval()
        self.use_image_processor(self.load(AutoImageProcessor.from_pretrained))
        self.patch_size = int(self.model.config.patch_size)
        self.hidden_size = int(self.model.config.hidden_size)
        self.num_layers = int(self.model.config.num_hidden_layers)

    def _layers(self, layers: Sequence[int] | None) -> tuple[int, ...]:
        if layers is None:
            return (self.num_layers - 1,)
        out = tuple(int(i) + self.num_layers if int(i) < 0 else int(i) for i in layers)
        bad = [i for i in out if not 0 <= i < self.num_layers]
        if bad or not out:
            raise ValueError(f"layers must be block indices in [-{self.num_layers}, {self.num_layers}), got {layers}")
        return out

    @torch.inference_mode()
    def encode(self, images: np.ndarray, layers: Sequence[int] | None = None) -> DenseFeatures:
        """images: uint8 RGB [B, H, W, 3], H and W multiples of patch_size (the caller resizes/crops).

        layers: 0-based block indices (negative from the end), default (num_layers - 1,). The last block gets the
        final layernorm (= `last_hidden_state`); earlier blocks are returned raw.
        Returns cls float32 [B, L, C] and patches float32 [B, L, H/p, W/p, C]; patches[b, l, i, j] = row i, col j.
        """
        images = np.asarray(images)
        p = self.patch_size
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"DINOv2 expects uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
        b, h, w, _ = images.shape
        if h % p or w % p:
            raise ValueError(f"H, W must be multiples of patch_size={p}, got {(h, w)}")
        idx = self._layers(layers)
        x = self.normalised(images)
        with autocast(self.device):
            out = self.model(pixel_values=x, output_hidden_states=True)
            # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of block i.
            feats = [
                out.last_hidden_state if i == self.num_layers - 1 else out.hidden_states[i + 1] for i in idx
            ]
        tokens = torch.stack([f.float() for f in feats], dim=1)  # [B, L, 1 + prefix + h*w, C]
        gh, gw = h // p, w // p
        patches = tokens[:, :, -gh * gw :, :].reshape(b, len(idx), gh, gw, -1)
        return DenseFeatures(cls=to_numpy(tokens[:, :, 0, :]), patches=to_numpy(patches), layers=idx)
