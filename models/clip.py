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
        self.vision_layers = int(vision.num_hidden_layers)  # blocks of the vision tower (encode_image_blocks)
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
    def encode_image_blocks(self, images: np.ndarray, layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of several vision-tower blocks (the USE head's multi-level CLIP features, use-paper §3.2).

        images: uint8 RGB [B, H, W, 3], H and W multiples of patch_size; image_size × image_size is the native
        input, other sizes interpolate the position embeddings (bicubic, transformers' interpolate_pos_encoding).
        layers: 0-based block indices, negative from the end. Each block's raw output (residual stream: no
        post_layernorm, no projection), width C = the vision hidden size — not the joint space of encode_image.
        Returns (cls float32 [B, L, C], patches float32 [B, L, H/p, W/p, C]); patches[b, l, i, j] = row i, col j.
        """
        images = np.asarray(images)
        p, n_layers = self.patch_size, self.vision_layers
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or images.shape[1] % p \
                or images.shape[2] % p:
            raise ValueError(f"CLIP blocks expect uint8 [B, H, W, 3] with H, W multiples of {p}, got "
                             f"{images.dtype} {images.shape}")
        idx = [int(i) + n_layers if int(i) < 0 else int(i) for i in layers]
        if not idx or any(not 0 <= i < n_layers for i in idx):
            raise ValueError(f"layers must be block indices in [-{n_layers}, {n_layers}), got {list(layers)}")
        b, h, w, _ = images.shape
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float()
        x = (x * self._rescale - self._mean) / self._std
        with autocast(self.device):
            out = self.model.vision_model(pixel_values=x, output_hidden_states=True,
                                          interpolate_pos_encoding=(h, w) != (self.image_size,) * 2)
        # hidden_states[0] is the (pre-layernormed) embedding output, hidden_states[i + 1] the output of block i.
        tokens = torch.stack([out.hidden_states[i + 1].float() for i in idx], dim=1)  # [B, L, 1 + h*w, C]
        patches = tokens[:, :, 1:, :].reshape(b, len(idx), h // p, w // p, -1)
        return to_numpy(tokens[:, :, 0, :]), to_numpy(patches)

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

    def gradcam(self, image_crop: np.ndarray, text_embeddings: np.ndarray, *, layer: int = -2,
                attention_layers: int = 0) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Grad-CAM class activation maps (CaR's mask proposal generator, car-paper §3.3; as CLIP-ES).

        image_crop: uint8 RGB [S, S, 3] (S == image_size); text_embeddings: float [T, D] L2-normalised (the queries,
        then any background queries: they share the softmax). Score of text t = softmax over the T texts of
        logit_scale · cos(image, text)[t]; its gradient w.r.t. the patch tokens of block `layer`'s output gives
        per-channel weights (mean over patches); map = ReLU(Σ_c weight_c · token_c), divided by its max.
        Returns float32 [T, S/p, S/p] in [0, 1]; [t, i, j] = row i, column j of the crop's patch grid.
        attention_layers > 0: also returns the patch-to-patch attention [N, N] (N = (S/p)², row-major like the maps)
        averaged over the heads of the last `attention_layers` blocks, from the same forward pass (CLIP-ES CAA).
        """
        x = self.pixel_values(np.asarray(image_crop)[None])
        text = torch.as_tensor(np.asarray(text_embeddings, np.float32), device=self.device)
        with torch.enable_grad():
            out = self.model.vision_model(pixel_values=x, output_hidden_states=True)
            feats = out.hidden_states[layer]  # [1, 1 + N, C], the output of block `layer`
            feats.retain_grad()
            img = l2_normalize(self.model.visual_projection(out.pooler_output))
            probs = torch.softmax(self.model.logit_scale.exp() * img @ l2_normalize(text).T, dim=-1)[0]
            side = self.image_size // self.patch_size
            maps = []
            for t in range(len(text)):
                feats.grad = None
                probs[t].backward(retain_graph=t + 1 < len(text))
                tokens, grad = feats[0, 1:].detach().float(), feats.grad[0, 1:].float()
                cam = torch.relu(tokens @ grad.mean(0))
                maps.append((cam / cam.max().clamp_min(1e-12)).reshape(side, side))
        maps = to_numpy(torch.stack(maps)) if maps else np.zeros((0, side, side), np.float32)
        if attention_layers <= 0:
            return maps
        with torch.no_grad():
            attention = self._patch_attention(out.hidden_states, attention_layers)
        return maps, to_numpy(attention)

    def _patch_attention(self, hidden_states: Sequence[torch.Tensor], last: int) -> torch.Tensor:
        """Mean over heads and the last `last` blocks of softmax(q·kᵀ · scale), patches only: float32 [N, N].

        Computed from each block's input (hidden_states[i] feeds block i) through its layer_norm1, q_proj, k_proj:
        the attention implementation (sdpa) does not return weights, and switching it to eager would slow every
        other call."""
        layers = self.model.vision_model.encoder.layers
        total = None
        for i in range(max(0, len(layers) - last), len(layers)):
            block = layers[i]
            x = block.layer_norm1(hidden_states[i].float())[0]  # [1 + N, C]
            attn = block.self_attn
            heads, dim = attn.num_heads, attn.head_dim
            q = attn.q_proj(x).reshape(-1, heads, dim).transpose(0, 1)
            k = attn.k_proj(x).reshape(-1, heads, dim).transpose(0, 1)
            weights = torch.softmax((q @ k.transpose(1, 2)) * attn.scale, dim=-1).mean(0)  # [1 + N, 1 + N]
            total = weights if total is None else total + weights
        return (total / min(last, len(layers)))[1:, 1:].float()
