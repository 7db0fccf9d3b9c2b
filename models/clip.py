"""CLIP image/text encoder with dense MaskCLIP patch features (transformers `CLIPModel`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models._hf import autocast, hf_load, l2_normalize, resolve_device, to_numpy
from models.roles import ClipEncoder, ClipImageFeatures

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"


class HFClipEncoder(ClipEncoder):
    """`CLIPModel` + `AutoTokenizer` + `AutoImageProcessor` (mean/std only) from one hub id or folder."""

    def __init__(self, model_id: str = DEFAULT_CLIP, *, device: str = "auto", key: str = "clip") -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.device = resolve_device(device)
        self.source = model_id
        load = dict(role="CLIP", key=key, hub_id=DEFAULT_CLIP)
        # float32 weights whatever the checkpoint stores; CUDA speed comes from autocast.
        self.model = hf_load(CLIPModel.from_pretrained, model_id, dtype=torch.float32, **load).to(self.device).eval()
        self.tokenizer = hf_load(AutoTokenizer.from_pretrained, model_id, **load)
        processor = hf_load(AutoImageProcessor.from_pretrained, model_id, **load)
        vision = self.model.config.vision_config
        self.patch_size = int(vision.patch_size)
        self.image_size = int(vision.image_size)
        self.embed_dim = int(self.model.config.projection_dim)
        self._rescale = float(getattr(processor, "rescale_factor", 1 / 255))
        self._mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(processor.image_std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._max_text = int(self.model.config.text_config.max_position_embeddings)

    def pixel_values(self, images: np.ndarray) -> torch.Tensor:
        """uint8 RGB [B, S, S, 3] → normalised float32 [B, 3, S, S] on the model's device."""
        images = np.asarray(images)
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3) or images.dtype != np.uint8:
            raise ValueError(f"CLIP expects uint8 [B, {s}, {s}, 3] crops, got {images.dtype} {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float()
        return (x * self._rescale - self._mean) / self._std

    @torch.inference_mode()
    def encode_image(self, images: np.ndarray) -> ClipImageFeatures:
        """images: uint8 RGB [B, S, S, 3], S == image_size (crops already cut by the caller).

        Returns cls float32 [B, D] (the usual projected image embedding) and patch float32 [B, S/p, S/p, D]
        (MaskCLIP: last block's layer_norm1(input) → v_proj → out_proj → post_layernorm → visual_projection,
        skipping query/key, the residual and the MLP); both L2-normalised. patch[b, i, j] = row i, column j.
        """
        vm = self.model.vision_model
        last = vm.encoder.layers[-1]
        captured: dict[str, torch.Tensor] = {}

        def grab_input(_module, args, kwargs):
            # The input hidden states of the last block, whichever way the encoder passes them.
            captured["x"] = args[0] if args else kwargs["hidden_states"]

        handle = last.register_forward_pre_hook(grab_input, with_kwargs=True)
        try:
            with autocast(self.device):
                out = vm(pixel_values=self.pixel_values(images))
                cls = self.model.visual_projection(out.pooler_output)
                x = last.layer_norm1(captured["x"][:, 1:, :])
                dense = last.self_attn.out_proj(last.self_attn.v_proj(x))
                dense = self.model.visual_projection(vm.post_layernorm(dense))
        finally:
            handle.remove()
        b, n, d = dense.shape
        side = self.image_size // self.patch_size
        assert n == side * side, (n, side)
        patch = l2_normalize(dense).reshape(b, side, side, d)
        return ClipImageFeatures(cls=to_numpy(l2_normalize(cls)), patch=to_numpy(patch))

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """texts: N strings (e.g. "a photo of a dog.") → float32 [N, D] projected, L2-normalised embeddings."""
        tok = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self._max_text, return_tensors="pt"
        ).to(self.device)
        with autocast(self.device):
            out = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            emb = self.model.text_projection(out.pooler_output)
        return to_numpy(l2_normalize(emb))
