"""Per-image stage timings with the papers' model sizes at random init (``bench/gpu.sh`` on a GPU machine), or with
the tiny test models (``--size tiny``: the same code path, a CPU dry run).

Real sizes (the architectures of the README's *Real weights*, random weights, built once per run, loaded back
through the adapters' own ``from_pretrained`` / SAM code): CLIP ViT-L/14-336 (FMbSeg dense features, USE cache,
text), CaR's f = CLIP ViT-B/16 and g = ViT-L/14, DINOv2-L/14, Grounding DINO-B (Swin-B + BERT-base), SAM ViT-H.
Tokenizers are the offline tiny ones (text towers keep their real width and depth; vocabularies are small).
Every stage runs on one 640×480 image, all stages interleaved (``bench.timing.compare``), CUDA synchronised
before each clock read; ``outside_model_share`` comes from one extra synced pass under ``ForwardTimer``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.fixtures import photo, random_boxes
from bench.timing import ForwardTimer, compare, time_call

# transformers configs of the real backbones (openai/clip-vit-large-patch14-336, -base-patch16, -large-patch14,
# facebook/dinov2-large, IDEA-Research/grounding-dino-base)
CLIP_L = dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
              text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
              projection_dim=768)
CLIP_B = dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
              text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
              projection_dim=512)
REAL_CLIPS = {"clip": (CLIP_L, 336, 14), "cam_clip": (CLIP_B, 224, 16), "classifier_clip": (CLIP_L, 224, 14)}


def _build_clip(out: Path, spec: dict, image_size: int, patch: int, device: str) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pseudoseg.models.adapters.tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_clip_tokenizer

    tok = build_clip_tokenizer()
    config = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **spec["text"]),
                        vision_config=dict(image_size=image_size, patch_size=patch, **spec["vision"]),
                        projection_dim=spec["projection_dim"])
    with torch.device(device):
        CLIPModel(config).eval().save_pretrained(out)
    proc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(out)


def _build_dino(out: Path, device: str) -> None:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from pseudoseg.models.adapters.tiny import IMAGENET_MEAN, IMAGENET_STD

    config = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                          image_size=518)
    with torch.device(device):
        Dinov2Model(config).eval().save_pretrained(out)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(out)


def _build_grounder(out: Path, device: str) -> None:
    """Grounding DINO-B at random init: Swin-B (384) backbone, BERT-base text encoder, d_model 256, 6+6 layers, 900
    queries (transformers' defaults), images at 800/1333."""
    from pseudoseg.models.adapters.tiny import save_grounding_dino

    save_grounding_dino(out, backbone=dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                                           window_size=12, image_size=384, out_indices=[2, 3, 4]),
                        text=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072),
                        model={}, edges=(800, 1333), device=device)


def load_models(size: str, root: Path, device: str = "auto") -> dict[str, Any]:
    """{role: adapter} of every model role a stage benchmark needs, ``size`` "real" or "tiny", on ``device``."""
    import torch

    from pseudoseg.models.adapters.clip import HFClipEncoder
    from pseudoseg.models.adapters.dense import HFDinoEncoder
    from pseudoseg.models.adapters.grounder import HFGroundingDino
    from pseudoseg.models.adapters.segmenter import SAM_ARCHS, SamSegmenter, build_sam_arch
    from pseudoseg.models.adapters.tiny import SAM_TINY_CHECKPOINT, ensure_tiny

    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    torch.manual_seed(0)
    if size == "tiny":
        folder = {r: str(ensure_tiny(r, root)) for r in ("clip", "cam_clip", "classifier_clip", "dense", "grounder",
                                                         "segmenter")}
        sam = build_sam_arch(SAM_ARCHS["tiny"], str(Path(folder["segmenter"]) / SAM_TINY_CHECKPOINT))
    elif size == "real":
        folder = {}
        for role, (spec, image_size, patch) in REAL_CLIPS.items():
            folder[role] = str(root / role)
            _build_clip(Path(folder[role]), spec, image_size, patch, dev)
        folder["dense"], folder["grounder"] = str(root / "dense"), str(root / "grounder")
        _build_dino(Path(folder["dense"]), dev)
        _build_grounder(Path(folder["grounder"]), dev)
        sam = build_sam_arch(SAM_ARCHS["vit_h"], checkpoint=None)  # on the CPU: SAM uses torch.Tensor(list)
    else:
        raise ValueError(f"size must be 'real' or 'tiny', got {size!r}")
    return {"clip": HFClipEncoder(folder["clip"], device=dev), "cam_clip": HFClipEncoder(folder["cam_clip"], device=dev),
            "classifier_clip": HFClipEncoder(folder["classifier_clip"], device=dev),
            "dense": HFDinoEncoder(folder["dense"], device=dev), "grounder": HFGroundingDino(folder["grounder"], device=dev),
            "sam": SamSegmenter(sam, device=dev)}


def bench_stages(size: str = "tiny", repeats: int = 5, warmup: int = 1, use_batch: int = 8) -> dict:
    """Seconds per stage call on one 640×480 image (module docstring); ``use_features`` encodes ``use_batch``
    images per call (its per-image figure is reported too)."""
    import cv2
    import torch

    from pseudoseg.pipeline.core.vocabularies import load_templates, load_vocabulary
    from pseudoseg.pipeline.features.cache import encode_fmbseg, encode_use, resolve_blocks
    from pseudoseg.pipeline.fmbseg import pseudo_labels as F
    from pseudoseg.pipeline.fmbseg.params import (
        FmbsegAutoMasksParams,
        FmbsegDenseParams,
        FmbsegQueryMasksParams,
    )

    real = size == "real"
    with tempfile.TemporaryDirectory() as tmp:
        models, build = time_call(lambda: load_models(size, Path(tmp)))
    clip, f, g, dino, grounder, sam = (models[k] for k in ("clip", "cam_clip", "classifier_clip", "dense",
                                                            "grounder", "sam"))
    rng = np.random.default_rng(0)
    rgb = photo(rng)
    dense_cfg = FmbsegDenseParams() if real else dataclasses.replace(FmbsegDenseParams(), short_side=112)
    vocab = load_vocabulary("coco_stuff171")
    text = F.class_text_embeddings(clip, vocab, load_templates("single"))
    dense = F.clip_dense_features(clip, rgb, dense_cfg)
    embedding = sam.embed(rgb)
    boxes = random_boxes(rng, 20)
    amg = dataclasses.replace(FmbsegAutoMasksParams(), points_per_side=32 if real else 4).amg()
    clip_layers = resolve_blocks("every:8", clip.vision_layers)
    dino_use = resolve_blocks("last:2", dino.num_layers)
    batch = [rgb] * use_batch
    pf = f.patch_size
    car_image = cv2.resize(rgb, (640 // pf * pf, 480 // pf * pf))
    fg = f.encode_text([f"a clean origami {c}." for c in ("cat", "dog", "person")])
    bg = f.encode_text([f"a clean origami {c}." for c in ("ground", "sky", "wall")])
    crops = np.stack([cv2.resize(rgb, (g.image_size, g.image_size))] * 10)
    caption = "a cat sitting on a red chair next to a wooden table with a cup of coffee."
    stages = {
        "clip_dense": lambda: F.clip_dense_features(clip, rgb, dense_cfg),
        "sam_embed": lambda: sam.embed(rgb),
        "sam_boxes_20": lambda: sam.predict(embedding, boxes_xyxy=boxes, multimask=True),
        "stage11_5_classes": lambda: F.query_point_masks(sam, embedding, dense, text, list(range(5)),
                                                         FmbsegQueryMasksParams()),
        "stage12_automatic": lambda: sam.automatic_masks(rgb, embedding=embedding, **amg),
        "dino_fmbseg": lambda: encode_fmbseg(rgb, dense=dino, dino_layers=(dino.num_layers - 1,),
                                             short_side=336 if real else 56),
        f"use_features_batch{use_batch}": lambda: encode_use(batch, clip=clip, dense=dino, clip_layers=clip_layers,
                                                             dino_layers=dino_use, input_size=clip.image_size),
        "grounding": lambda: grounder.ground(rgb, caption, box_threshold=0.05, text_threshold=0.25),
        "car_gradcam_f": lambda: f.gradcam(car_image, fg, bg),
        "car_classifier_g_10": lambda: g.encode_image_car(crops),
    }
    timings = compare(stages, repeats=repeats, warmup=warmup)
    shares = {}
    for name, fn in stages.items():
        with ForwardTimer() as fwd:
            _, t = time_call(fn)
        shares[name] = round(1 - fwd.total / t["wall_s"], 4) if t["wall_s"] > 0 else None
    _, text_t = time_call(lambda: F.class_text_embeddings(clip, vocab, load_templates("single")))
    out = {"size": size, "device": str(sam.device), "autocast": "bf16" if sam.device.type == "cuda" else "off",
           "models": ("CLIP L/14-336, CaR f B/16 + g L/14, DINOv2-L, Grounding DINO-B (Swin-B), SAM ViT-H; random init"
                      if real else "tiny test models"),
           "build_and_load_s": round(build["wall_s"], 2), "image_hw": [480, 640], "working_short_side": dense_cfg.short_side,
           "crops": len(dense.windows), "repeats": repeats, "warmup": warmup,
           "text_embeddings_171_classes_s": round(text_t["wall_s"], 4), "stages": {}}
    for name, t in timings.items():
        row = {"median_s": t["wall_s"]["median"], "min_s": t["wall_s"]["min"], "cpu_median_s": t["cpu_s"]["median"],
               "outside_model_share": shares[name], "wall_s": t["wall_s"]["all"]}
        if name.startswith("use_features"):
            row["per_image_median_s"] = round(t["wall_s"]["median"] / use_batch, 6)
        out["stages"][name] = row
    if torch.cuda.is_available():
        out["cuda_max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


BENCHMARK = bench_stages
