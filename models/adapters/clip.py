"""CLIP image/text encoder with dense MaskCLIP patch features (transformers `CLIPModel`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pseudoseg.models.adapters._hf import HFAdapter, autocast, l2_normalize, to_numpy
from pseudoseg.models.catalog import (
    DEFAULT_CLIP,
)
from pseudoseg.models.roles import ClipEncoder, ClipImageFeatures

# CaR's official CLIP wrapper (clip_wrapper.CustomTransformer) tells text from images by the token count: a sequence
# of exactly 77 tokens (the text context) runs every block, anything else all but the last. An image of exactly 76
# patches (+ CLS) therefore runs every block, and Grad-CAM then repeats the last one on top (followed here).
OFFICIAL_TEXT_CONTEXT = 77
# CLIP-ES / CaR min-max scaling: (x - min) / (max + eps) (cam.py scale_cam_image).
CAM_EPS = 1e-15


class HFClipEncoder(HFAdapter, ClipEncoder):
    """`CLIPModel` + `AutoTokenizer` + `AutoImageProcessor` (mean/std only) from one hub id or folder."""

    def __init__(self, model_id: str = DEFAULT_CLIP, *, device: str = "auto", key: str = "clip",
                 hub_id: str = DEFAULT_CLIP) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        super().__init__(model_id, device, role="CLIP", key=key, hub_id=hub_id)
        # float32 weights whatever the checkpoint stores; CUDA speed comes from autocast.
        self.model = self.load_model(CLIPModel.from_pretrained, dtype=torch.float32).to(self.device).eval()
        self.tokenizer = self.load(AutoTokenizer.from_pretrained)
        self.use_image_processor(self.load(AutoImageProcessor.from_pretrained))
        vision = self.model.config.vision_config
        self.patch_size = int(vision.patch_size)
        self.image_size = int(vision.image_size)
        self.vision_layers = int(vision.num_hidden_layers)  # blocks of the vision tower (encode_image_blocks)
        self.embed_dim = int(self.model.config.projection_dim)
        self._max_text = int(self.model.config.text_config.max_position_embeddings)

    def pixel_values(self, images: np.ndarray) -> torch.Tensor:
        """uint8 RGB [B, S, S, 3] → normalised float32 [B, 3, S, S] on the model's device."""
        images = np.asarray(images)
        s = self.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3) or images.dtype != np.uint8:
            raise ValueError(f"CLIP expects uint8 [B, {s}, {s}, 3] crops, got {images.dtype} {images.shape}")
        return self.normalised(images)

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
        x = self.normalised(images)
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

    # ------------------------------------------------------------------------------------------ CaR (car-paper)
    def _tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + CLS embeddings with position embeddings resized BILINEARLY to the input's patch grid (any H, W
        multiples of p), then the pre-layernorm: the official CaR / CLIP-ES image stem (`upsample_position_embedding`),
        not transformers' bicubic `interpolate_pos_encoding`. As the official stem, the resized table (CLS row
        included, also at the native size) is rounded through float16 (`Parameter(embed.half())`) before it is
        added. Returns [B, 1 + h*w, C]."""
        emb = self.model.vision_model.embeddings
        b, _, height, width = pixel_values.shape
        gh, gw = height // self.patch_size, width // self.patch_size
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        pos = emb.position_embedding.weight
        side = int(round((pos.shape[0] - 1) ** 0.5))
        grid = pos[1:].T.reshape(1, -1, side, side)
        grid = torch.nn.functional.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        pos = torch.cat([pos[:1], grid.reshape(pos.shape[1], -1).T]).half().to(pos.dtype)
        tokens = torch.cat([emb.class_embedding.expand(b, 1, -1).to(patches.dtype), patches], dim=1) + pos
        return self.model.vision_model.pre_layrnorm(tokens)

    def _normalised(self, images: np.ndarray) -> torch.Tensor:
        images = np.asarray(images)
        p = self.patch_size
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or images.shape[1] % p \
                or images.shape[2] % p:
            raise ValueError(f"expected uint8 [B, H, W, 3] with H, W multiples of {p}, got {images.dtype} "
                             f"{images.shape}")
        return self.normalised(images)

    def _car_blocks(self, tokens: int) -> int:
        """Blocks the official CaR wrapper runs without gradient on `tokens` tokens: all but the last, or all of
        them when the count equals the text context (OFFICIAL_TEXT_CONTEXT)."""
        n = len(self.model.vision_model.encoder.layers)
        return n if tokens == OFFICIAL_TEXT_CONTEXT else n - 1

    @torch.inference_mode()
    def encode_image_car(self, images: np.ndarray, *, skip_last_block: bool = True) -> np.ndarray:
        """CaR's mask-classifier image embedding (car-paper g; official `CLIPWrapper.forward`): the CLS token
        after the vision blocks — all but the LAST one when `skip_last_block` (the official wrapper runs L-1
        blocks on images and never repeats the last one for this call; all L on a 76-patch input, see
        OFFICIAL_TEXT_CONTEXT) — post-layernorm, projected, L2-normalised.
        images: uint8 RGB [B, S, S, 3] (S = image_size). Returns float32 [B, D]."""
        x = self._normalised(images)
        layers = self.model.vision_model.encoder.layers
        with autocast(self.device):
            h = self._tokens(x)
            for block in layers[: self._car_blocks(h.shape[1]) if skip_last_block else len(layers)]:
                h = block(h, None)
            cls = self.model.visual_projection(self.model.vision_model.post_layernorm(h[:, 0]))
        return to_numpy(l2_normalize(cls))

    @property
    def logit_scale(self) -> float:
        """exp of the learned temperature (100 for OpenAI's CLIPs)."""
        return float(self.model.logit_scale.detach().exp())

    def gradcam(self, image: np.ndarray, fg_text: np.ndarray, bg_text: np.ndarray | None = None, *,
                attention_layers: int = 0) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Grad-CAM of CaR's mask proposal generator f exactly as the official code (CLIP-ES `CLIPCAM`).

        image: uint8 RGB [H, W, 3] with H, W multiples of patch_size (any aspect: position embeddings are resized
        bilinearly). fg_text [T, D], bg_text [B, D]: L2-normalised text embeddings (queries, background queries).
        Blocks 0..L-2 run without gradient (0..L-1 on a 76-patch image, OFFICIAL_TEXT_CONTEXT); the last block
        runs (again) with it. Image embedding = the MEAN of the post-layernormed patch tokens (not CLS), projected
        and normalised; score of text t = softmax over the T + B texts of logit_scale · cosine. Target layer: the
        last block's layer_norm1 output (car-paper App. B). map_t = ReLU(Σ_c mean_patches(∂score_t/∂A_c) · A_c)
        on the patch grid, min-max scaled TWICE as the official cam.py (per target layer, then again when the
        layers are aggregated; each (x - min) / (max + 1e-15)); a map that is then all zero is recomputed with the
        softmax over the fg texts only (as the official clipcam.py). Returns float32 [T, H/p, W/p]; with
        attention_layers > 0 also the patch-to-patch attention [N, N] (N = H/p · W/p, row-major as the maps)
        averaged over heads and the last `attention_layers` block applications (the official list: the no-grad
        blocks, then the last block's grad run).
        """
        x = self._normalised(np.asarray(image)[None])
        fg = torch.as_tensor(np.asarray(fg_text, np.float32), device=self.device)
        texts = fg if bg_text is None or len(bg_text) == 0 else \
            torch.cat([fg, torch.as_tensor(np.asarray(bg_text, np.float32), device=self.device)])
        vm, gh, gw = self.model.vision_model, x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        layers = vm.encoder.layers
        applied: list[tuple[int, torch.Tensor]] = []  # (block index, its input) of every block application
        with torch.no_grad(), autocast(self.device):
            h = self._tokens(x)
            for i in range(self._car_blocks(h.shape[1])):
                applied.append((i, h))
                h = layers[i](h, None)
        applied.append((len(layers) - 1, h))
        captured: dict[str, torch.Tensor] = {}

        def keep(_module, _args, output):
            captured["a"] = output

        handle = layers[-1].layer_norm1.register_forward_hook(keep)
        try:
            with torch.enable_grad(), autocast(self.device):
                out = layers[-1](h.detach().requires_grad_(), None)
                pooled = vm.post_layernorm(out)[:, 1:].mean(1)
                img = l2_normalize(self.model.visual_projection(pooled))
                logits = self.model.logit_scale.exp() * img @ l2_normalize(texts).T
                probs = torch.softmax(logits.float(), dim=-1)[0]
                act = captured["a"]
                maps = self._cams_of(probs[: len(fg)], act, gh, gw)
                if len(texts) > len(fg) and len(fg):
                    zero = maps.flatten(1).amax(1) == 0
                    if zero.any():  # official: a map that is all zero is redone with the fg texts only
                        fg_only = torch.softmax(logits[:, : len(fg)].float(), dim=-1)[0]
                        maps[zero] = self._cams_of(fg_only, act, gh, gw)[zero]
        finally:
            handle.remove()
        maps = to_numpy(maps)
        if attention_layers <= 0:
            return maps
        with torch.no_grad():
            attention = self._patch_attention(applied[-attention_layers:])
        return maps, to_numpy(attention)

    @staticmethod
    def _min_max(cams: torch.Tensor) -> torch.Tensor:
        """(x - min) / (max + 1e-15) per map [T, gh, gw] (cam.py scale_cam_image)."""
        cams = cams - cams.flatten(1).amin(1)[:, None, None]
        return cams / (cams.flatten(1).amax(1)[:, None, None] + CAM_EPS)

    @classmethod
    def _cams_of(cls, scores: torch.Tensor, act: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """Grad-CAM of each of T scalar scores w.r.t. the activation [1, 1 + N, C] (CLS dropped), all T gradients in
        one batched backward: channel weights = mean gradient over patches, ReLU of the weighted sum, then min-max
        scaled twice as the official cam.py (`compute_cam_per_layer`, then `aggregate_multi_layers` over the one
        target layer: ReLU, mean, scaled again). Returns [T, gh, gw]."""
        if len(scores) == 0:
            return torch.zeros((0, gh, gw), device=act.device)
        (grads,) = torch.autograd.grad(scores, act, grad_outputs=torch.eye(len(scores), device=scores.device),
                                       retain_graph=True, is_grads_batched=True)
        tokens, grads = act[0, 1:].detach().float(), grads[:, 0, 1:].float()  # [N, C], [T, N, C]
        cams = torch.relu(torch.einsum("nc,tc->tn", tokens, grads.mean(1))).reshape(-1, gh, gw)
        return cls._min_max(torch.relu(cls._min_max(cams)))

    def _patch_attention(self, applied: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Mean over heads and the given block applications (block index, its input) of softmax(q·kᵀ · scale),
        patches only: float32 [N, N].

        Computed from each block's input through its layer_norm1, q_proj, k_proj: the attention implementation
        (sdpa) does not return weights, and switching it to eager would slow every other call."""
        layers = self.model.vision_model.encoder.layers
        total = None
        for i, block_input in applied:
            block = layers[i]
            x = block.layer_norm1(block_input.float())[0]  # [1 + N, C]
            attn = block.self_attn
            heads, dim = attn.num_heads, attn.head_dim
            q = attn.q_proj(x).reshape(-1, heads, dim).transpose(0, 1)
            k = attn.k_proj(x).reshape(-1, heads, dim).transpose(0, 1)
            weights = torch.softmax((q @ k.transpose(1, 2)) * attn.scale, dim=-1).mean(0)  # [1 + N, 1 + N]
            total = weights if total is None else total + weights
        return (total / len(applied))[1:, 1:].float()
