"""What the model roles are, without loading any: the papers' default models (hub ids), SAM's architectures and
official checkpoints, and the one error a missing model raises. Imported by the settings, the registry and the
adapters alike; it imports no model library, so a command can check its settings before torch is loaded."""

from __future__ import annotations

from typing import Any

DEFAULT_CAPTIONER = "llava-hf/llava-1.5-7b-hf"
DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"  # USE (use-paper §4.1)
# FMbSeg (fmbseg-paper §4 "Implementation Details": ViT-L/14 for CLIP and DINOv2): Stage 1 and its text space.
DEFAULT_FMBSEG_CLIP = "openai/clip-vit-large-patch14"
# CaR (car-paper §4): mask proposal generator f = ViT-B/16, mask classifier g = ViT-L/14 (224 px).
DEFAULT_CAM_CLIP = "openai/clip-vit-base-patch16"
DEFAULT_CLASSIFIER_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dinov2-large"
DEFAULT_GROUNDER = "IDEA-Research/grounding-dino-tiny"  # Swin-T, as use-paper §4.1 states; -base (Swin-B) an option

SAM_ARCHS: dict[str, dict[str, Any]] = {
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=[7, 15, 23, 31]),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=[5, 11, 17, 23]),
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=[2, 5, 8, 11]),
    "tiny": dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1]),
}
SAM_CHECKPOINT_URLS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}


class ModelUnavailableError(RuntimeError):
    """A configured model (hub id, folder or checkpoint) cannot be loaded here; the message says how to fix it."""
