"""Trainable heads over frozen backbone features.

- `USEHead` (use-paper §3.2): multi-level CLIP + DINOv2 patch features merged by learned block weights (LLN per
  block, COMM-style), concatenated with the projected CLS tokens, mask-pooled per segment and projected to the
  CLIP text space.
- `AlignmentBlock` (fmbseg-paper §3.3, Table 2 left): maps frozen DINOv2 patch tokens to the CLIP text space with
  one pre-norm transformer block (or, for the ablation, a linear projection or an MLP).
- `mask_pooling_weights`: per-segment patch weights = area of the segment inside each patch.

Layouts (the same as `models.roles.DenseFeatures`): patch features [B, L, h, w, C] — L blocks of one backbone,
patch [i, j] covers rows i*p.. and columns j*p.. of the encoded image; CLS tokens [B, C] (or [B, L, C]: the last
block is used). Flattened patch index n = i * w + j (row-major) everywhere, also in pooling weights.
Every head keeps the keyword arguments it was built with in `.config`; `build_head(kind, config)` rebuilds it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pseudoseg.models.training.params import ALIGNMENT_VARIANTS

__all__ = ["mask_pooling_weights", "pool_segments", "BlockLLN", "USEHead", "AlignmentBlock", "build_head"]


# ------------------------------------------------------------------------------------------------ mask pooling
def _overlap_matrix(n_pixels: int, n_cells: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[n_cells, n_pixels]: length of pixel r ([r, r+1)) inside cell i ([i·n/c, (i+1)·n/c)), over the cell length."""
    size = n_pixels / n_cells
    r = torch.arange(n_pixels, dtype=torch.float64, device=device)
    lo = torch.arange(n_cells, dtype=torch.float64, device=device)[:, None] * size
    ov = (torch.minimum(r[None, :] + 1, lo + size) - torch.maximum(r[None, :], lo)).clamp_min(0)
    return (ov / size).to(dtype)


def mask_pooling_weights(
    masks: torch.Tensor | np.ndarray, grid: tuple[int, int], *, return_valid: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-patch pooling weights of each segment (use-paper §3.2, "segment embedding head").

    masks: bool [S, H, W] in the frame of the encoded image (the h×w patch grid spans the whole mask; H, W need
    not be multiples of h, w — pixels straddling a patch border count fractionally, by exact area).
    grid: (h, w) patch rows and columns.
    Returns float32 [S, h*w] (row-major patch index i*w + j): the fraction of each patch the segment covers,
    normalised to sum 1 over the patches. An empty mask gets an all-zero row (its pooled embedding is 0); with
    `return_valid=True` the bool [S] "mask not empty" flags come back too, so callers can drop such segments.
    """
    m = torch.as_tensor(masks)
    if m.ndim != 3:
        raise ValueError(f"masks must be [S, H, W], got {tuple(m.shape)}")
    h, w = int(grid[0]), int(grid[1])
    s, hh, ww = m.shape
    m = m.to(torch.float32)
    a_row = _overlap_matrix(hh, h, torch.float32, m.device)  # [h, H]
    a_col = _overlap_matrix(ww, w, torch.float32, m.device)  # [w, W]
    cover = torch.matmul(torch.matmul(a_row, m), a_col.T)  # [S, h, w], fraction of each patch covered
    cover = cover.reshape(s, h * w)
    total = cover.sum(1, keepdim=True)
    valid = total.squeeze(1) > 0
    weights = torch.where(total > 0, cover / total.clamp_min(1e-12), torch.zeros_like(cover))
    return (weights, valid) if return_valid else weights


def pool_segments(patch_map: torch.Tensor, weights: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """Weighted mean of patch features per segment.

    patch_map: float [B, N, F]; weights: float [S, N] (rows sum to 1, or 0 for empty masks); image_index: int [S],
    the image of the batch each segment belongs to. Returns [S, F]. Costs one [S, B·N] × [B·N, F] product.
    """
    b, n, _ = patch_map.shape
    if weights.shape[1] != n:
        raise ValueError(f"pooling weights have {weights.shape[1]} patches, the feature map {n}")
    full = weights.new_zeros(weights.shape[0], b, n)
    full[torch.arange(weights.shape[0], device=weights.device), image_index.long()] = weights
    return full.reshape(weights.shape[0], b * n).to(patch_map.dtype) @ patch_map.reshape(b * n, -1)


# ------------------------------------------------------------------------------------------------ USE head
class BlockLLN(nn.Module):
    """Σ_l α_l · LLN_l(x_l): one LayerNorm → Linear per input block, merged by learned block weights.

    x: [..., L, N, C] → [..., N, width]. α = softmax(block_logits), initialised uniform: the paper learns free
    scales α_i / β_i; the softmax keeps them a convex combination (positive, summing to 1) so the merged feature's
    scale does not drift, and any ratio between blocks stays reachable. Read them with `block_weights()`.
    """

    def __init__(self, n_blocks: int, in_dim: int, width: int) -> None:
        super().__init__()
        self.n_blocks, self.in_dim, self.width = n_blocks, in_dim, width
        self.ln_weight = nn.Parameter(torch.ones(n_blocks, in_dim))
        self.ln_bias = nn.Parameter(torch.zeros(n_blocks, in_dim))
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, per block
        self.weight = nn.Parameter(torch.empty(n_blocks, in_dim, width).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_blocks, width).uniform_(-bound, bound))
        self.block_logits = nn.Parameter(torch.zeros(n_blocks))

    def block_weights(self) -> torch.Tensor:
        return torch.softmax(self.block_logits, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] != self.n_blocks or x.shape[-1] != self.in_dim:
            raise ValueError(f"expected [..., {self.n_blocks}, N, {self.in_dim}], got {tuple(x.shape)}")
        x = F.layer_norm(x, (self.in_dim,)) * self.ln_weight[:, None, :] + self.ln_bias[:, None, :]
        y = torch.einsum("...lnc,lcw->...lnw", x, self.weight) + self.bias[:, None, :]
        return torch.einsum("...lnw,l->...nw", y, self.block_weights().to(y.dtype))


class USEHead(nn.Module):
    """USE segment-embedding head: z = [c̄, ĉ, d̄, d̂] per patch → mask pooling → Linear → joint space (D).

    clip_dim/clip_blocks: CLIP patch width Cc and number of blocks Lc given (paper: all 24); dino_dim/dino_blocks:
    DINOv2 width Cd and blocks Ld (paper: the last 6). A backbone with 0 blocks is left out (Table 4 ablation);
    use_cls=False drops the CLS parts (Table 5 ablation). CLS tokens get their own LayerNorm → Linear to `width`
    (clip_cls_dim / dino_cls_dim default to the patch widths; CLIP's projected image embedding fits too).
    Since the CLS tokens are the same for every patch of an image and pooling weights sum to 1, concatenating
    them after pooling equals pooling the concatenation; the head does the former (cheaper).
    Output: [S, embed_dim] unnormalised (the losses and `similarity` normalise).
    """

    def __init__(
        self, *, clip_dim: int, clip_blocks: int, dino_dim: int, dino_blocks: int, embed_dim: int,
        width: int = 256, use_cls: bool = True, clip_cls_dim: int | None = None, dino_cls_dim: int | None = None,
    ) -> None:
        super().__init__()
        if clip_blocks <= 0 and dino_blocks <= 0:
            raise ValueError("USEHead needs CLIP or DINOv2 blocks")
        self.config: dict[str, Any] = dict(
            clip_dim=clip_dim, clip_blocks=clip_blocks, dino_dim=dino_dim, dino_blocks=dino_blocks,
            embed_dim=embed_dim, width=width, use_cls=use_cls, clip_cls_dim=clip_cls_dim, dino_cls_dim=dino_cls_dim,
        )
        self.clip_lln = BlockLLN(clip_blocks, clip_dim, width) if clip_blocks > 0 else None
        self.dino_lln = BlockLLN(dino_blocks, dino_dim, width) if dino_blocks > 0 else None
        self.clip_cls = (nn.Sequential(nn.LayerNorm(clip_cls_dim or clip_dim), nn.Linear(clip_cls_dim or clip_dim, width))
                         if use_cls and clip_blocks > 0 else None)
        self.dino_cls = (nn.Sequential(nn.LayerNorm(dino_cls_dim or dino_dim), nn.Linear(dino_cls_dim or dino_dim, width))
                         if use_cls and dino_blocks > 0 else None)
        parts = sum(p is not None for p in (self.clip_lln, self.clip_cls, self.dino_lln, self.dino_cls))
        self.proj = nn.Linear(parts * width, embed_dim)

    @staticmethod
    def _flat(patches: torch.Tensor) -> torch.Tensor:
        """[B, L, h, w, C] → [B, L, h*w, C]."""
        if patches.ndim != 5:
            raise ValueError(f"patch features must be [B, L, h, w, C], got {tuple(patches.shape)}")
        b, n_blocks, h, w, c = patches.shape
        return patches.reshape(b, n_blocks, h * w, c)

    @staticmethod
    def _last_cls(cls: torch.Tensor) -> torch.Tensor:
        return cls[:, -1] if cls.ndim == 3 else cls

    def patch_map(
        self, clip_patches: torch.Tensor | None = None, dino_patches: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Merged patch features [B, N, P·width]: [c̄, d̄] for the backbones in use (same h×w grid required)."""
        out = []
        if self.clip_lln is not None:
            out.append(self.clip_lln(self._flat(clip_patches)))
        if self.dino_lln is not None:
            out.append(self.dino_lln(self._flat(dino_patches)))
        if len(out) == 2 and out[0].shape[1] != out[1].shape[1]:
            raise ValueError(f"CLIP and DINOv2 grids differ ({out[0].shape[1]} vs {out[1].shape[1]} patches); "
                             "encode both at the same grid (e.g. both patch-14 at the same crop size)")
        return torch.cat(out, dim=-1)

    def forward(
        self, *, weights: torch.Tensor, image_index: torch.Tensor, clip_patches: torch.Tensor | None = None,
        dino_patches: torch.Tensor | None = None, clip_cls: torch.Tensor | None = None,
        dino_cls: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Segment embeddings [S, embed_dim].

        clip_patches [B, Lc, h, w, Cc], dino_patches [B, Ld, h, w, Cd], clip_cls / dino_cls [B, C] or [B, L, C];
        weights [S, h*w] from `mask_pooling_weights`; image_index int [S] into the batch.
        """
        pooled = pool_segments(self.patch_map(clip_patches, dino_patches), weights, image_index)
        idx = image_index.long()
        parts, k = [], 0
        if self.clip_lln is not None:
            parts.append(pooled[:, k * self.clip_lln.width : (k + 1) * self.clip_lln.width])
            k += 1
            if self.clip_cls is not None:
                parts.append(self.clip_cls(self._last_cls(clip_cls))[idx])
        if self.dino_lln is not None:
            parts.append(pooled[:, k * self.dino_lln.width : (k + 1) * self.dino_lln.width])
            if self.dino_cls is not None:
                parts.append(self.dino_cls(self._last_cls(dino_cls))[idx])
        return self.proj(torch.cat(parts, dim=-1))

    def embed_masks(self, masks: torch.Tensor, **features: torch.Tensor) -> torch.Tensor:
        """Convenience for one image: masks bool [S, H, W] → [S, embed_dim] (features with B = 1)."""
        patches = features.get("clip_patches") if features.get("clip_patches") is not None else features["dino_patches"]
        weights = mask_pooling_weights(masks.to(patches.device), tuple(patches.shape[2:4]))
        return self(weights=weights, image_index=torch.zeros(len(weights), dtype=torch.long,
                                                             device=patches.device), **features)

    @staticmethod
    def similarity(seg_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [S, K] between segment and text embeddings."""
        return F.normalize(seg_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T


# ------------------------------------------------------------------------------------------------ alignment
class _PreNormBlock(nn.Module):
    """x + MHSA(LN(x)); x + MLP(LN(x)) — a standard ViT block."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(round(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, key_padding_mask=padding_mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class AlignmentBlock(nn.Module):
    """FMbSeg alignment module ℳ: DINOv2 patch tokens [B, N, C] → CLIP text space [B, N, D].

    variant "block" (the paper's choice): Linear(C → width) unless width == C, one pre-norm transformer block
    (multi-head self-attention over the patches of each image + MLP, residuals), LayerNorm, Linear(width → D).
    "linear": Linear(C → D). "mlp": Linear(C → width) → GELU → Linear(width → D). width defaults to C.
    Tokens may also come as a grid [B, h, w, C] (→ [B, h, w, D]). padding_mask: bool [B, N], True = padding
    (only "block" mixes patches, the others ignore it). No positional embedding is added: DINOv2's tokens carry it.
    """

    VARIANTS = ALIGNMENT_VARIANTS

    def __init__(self, in_dim: int, out_dim: int, *, variant: str = "block", width: int | None = None,
                 num_heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}")
        width = width or in_dim
        self.config: dict[str, Any] = dict(in_dim=in_dim, out_dim=out_dim, variant=variant, width=width,
                                           num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout)
        self.variant = variant
        if variant == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif variant == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, out_dim))
        else:
            if width % num_heads:
                raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
            self.in_proj = nn.Identity() if width == in_dim else nn.Linear(in_dim, width)
            self.block = _PreNormBlock(width, num_heads, mlp_ratio, dropout)
            self.norm = nn.LayerNorm(width)
            self.out_proj = nn.Linear(width, out_dim)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        grid = tokens.ndim == 4
        x = tokens.flatten(1, 2) if grid else tokens
        if x.ndim != 3:
            raise ValueError(f"tokens must be [B, N, C] or [B, h, w, C], got {tuple(tokens.shape)}")
        if self.variant == "block":
            x = self.out_proj(self.norm(self.block(self.in_proj(x), padding_mask)))
        else:
            x = self.net(x)
        return x.reshape(*tokens.shape[:-1], x.shape[-1]) if grid else x

    def predict_patches(self, tokens: torch.Tensor, text_protos: torch.Tensor,
                        padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine similarities [..., K] of every patch embedding with K text prototypes [K, D] (argmax = label)."""
        z = F.normalize(self(tokens, padding_mask).float(), dim=-1)
        return z @ F.normalize(text_protos.float(), dim=-1).T

    @torch.no_grad()
    def predict_label_map(self, tokens: torch.Tensor, text_protos: torch.Tensor, size: tuple[int, int],
                          mode: str = "bilinear") -> torch.Tensor:
        """Pixel labels int64 [B, H, W] for patch tokens [B, h, w, C] (fmbseg-paper §3.3 "Deployment").

        The patch similarities [B, K, h, w] are interpolated to size (H, W) — `mode` "bilinear" (the paper:
        "interpolate the similarities") or "nearest" — then the best text prototype wins per pixel.
        """
        if tokens.ndim != 4:
            raise ValueError(f"tokens must be a grid [B, h, w, C], got {tuple(tokens.shape)}")
        sim = self.predict_patches(tokens, text_protos).permute(0, 3, 1, 2)  # [B, K, h, w]
        kw = {"align_corners": False} if mode == "bilinear" else {}
        return F.interpolate(sim, size=tuple(size), mode=mode, **kw).argmax(1)


def build_head(kind: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild a head from its `.config` ("use" → USEHead, "alignment" → AlignmentBlock)."""
    if kind == "use":
        return USEHead(**config)
    if kind == "alignment":
        return AlignmentBlock(**config)
    raise ValueError(f"unknown head kind {kind!r}; expected 'use' or 'alignment'")


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

