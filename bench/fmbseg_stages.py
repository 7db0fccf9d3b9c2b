"""FMbSeg Stage 1 per-image seconds, stage by stage, with real-size random-init CLIP and SAM
(bench/results/fmbseg_stages.json)."""

from __future__ import annotations

import dataclasses
import tempfile

from bench.fixtures import check_size, photo, save_clip_b16
from bench.timing import ForwardTimer, compare, time_call


def bench_fmbseg_stages(classes_11: int = 5, repeats: int = 3, arch: str = "vit_b", size: str = "real") -> dict:
    """FMbSeg Stage 1 per-image seconds on one 640x480 image with real-size random-init models on this machine:
    CLIP ViT-B/16 (transformers CLIPConfig defaults, vision patch 16, image 224; saved and loaded back through
    `HFClipEncoder` like real weights) and SAM vit_b (`_build_sam` vit_b dims), both seed 0.

    Stages as the Luigi tasks run them with luigi.cfg's [fmbseg] defaults (short side 672 → 672x896 working image,
    35 crops of 224 with stride 112; coco_stuff171 × "a photo of a {}."; top-5 points; 32x32 automatic grid):
    dense (crops → CLIP → stitch), detect (per image; the vocabulary's text embeddings are per shard and reported
    apart), sam_embed (SamEmbeddingsShard: SAM's encoder once per image, shared), 1.1 (one batched decode for
    `classes_11` class prompts), 1.2 (segment-anything's automatic generator on the shared embedding + mask
    labelling), merge (label map + region RLEs + PNG).
    `outside_model_share`: 1 - (time inside any torch module forward) / stage time — the pipeline's own cost
    (resizing, stitching, mask upsampling/thresholding, NMS, RLE...), from one extra pass under a synchronised
    ``ForwardTimer``. Random-init SAM predicts low IoUs, so the automatic generator keeps few masks; trained weights
    keep more and spend more time in RLE/NMS/labelling. Seconds: median of ``repeats`` interleaved runs after one
    warm-up pass in pipeline order. `size` "tiny": the test suite's tiny CLIP, a 112 short side and a 4x4 automatic
    grid (with ``arch="tiny"``: a smoke run in seconds).
    """
    import numpy as np
    import torch

    from pseudoseg.models.adapters.clip import HFClipEncoder
    from pseudoseg.models.adapters.segmenter import SAM_ARCHS, SamSegmenter, build_sam_arch
    from pseudoseg.models.adapters.tiny import ensure_tiny
    from pseudoseg.pipeline.core.images import encode_png
    from pseudoseg.pipeline.core.vocabularies import load_templates, load_vocabulary
    from pseudoseg.pipeline.fmbseg import pseudo_labels as F
    from pseudoseg.pipeline.fmbseg.params import (
        FmbsegAutoMasksParams,
        FmbsegDenseParams,
        FmbsegDetectParams,
        FmbsegLabelsParams,
        FmbsegQueryMasksParams,
    )

    check_size(size)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if size == "real":
            save_clip_b16(tmp)
        clip = HFClipEncoder(tmp if size == "real" else ensure_tiny("clip", tmp), device="auto")
    seg = SamSegmenter(build_sam_arch(SAM_ARCHS[arch], checkpoint=None), device="auto")
    rng = np.random.default_rng(0)
    rgb = photo(rng)
    vocab = load_vocabulary("coco_stuff171")
    # luigi.cfg's [fmbseg] defaults (short side 672, min_crops 1, top_k 5, SAM's automatic generator at 32 points per
    # side, area fractions 0.0005-0.9, stage11_first)
    dense_cfg, detect_cfg, query_cfg = FmbsegDenseParams(), FmbsegDetectParams(), FmbsegQueryMasksParams()
    auto_cfg, labels_cfg = FmbsegAutoMasksParams(), FmbsegLabelsParams()
    if size == "tiny":
        dense_cfg = dataclasses.replace(dense_cfg, short_side=112)
        auto_cfg = dataclasses.replace(auto_cfg, points_per_side=4)
    every_size = dataclasses.replace(auto_cfg, min_area_fraction=0.0, max_area_fraction=1.0)
    amg = auto_cfg.amg()

    classes = list(range(classes_11))
    # Random-init SAM keeps ~no automatic masks, so labelling + merge are also timed on 100 synthetic masks
    # (random rectangles, 0.1%-20% of the image): the pipeline's own per-mask cost with trained weights.
    synthetic = []
    for x0, y0, x1, y1 in rng.integers(0, [640, 480, 640, 480], size=(100, 4)):
        m = np.zeros((480, 640), bool)
        m[min(y0, y1) : max(y0, y1) + 25, min(x0, x1) : max(x0, x1) + 25] = True
        synthetic.append({"segmentation": m, "predicted_iou": 0.9, "stability_score": 0.96,
                          "point_coords": [[float(x0), float(y0)]]})
    # One pass in pipeline order: the outputs the later stages need (and everyone's warm-up).
    dense = F.clip_dense_features(clip, rgb, dense_cfg)
    text = F.class_text_embeddings(clip, vocab, load_templates("single"))
    det = F.detect_classes(dense.cls, text, detect_cfg)
    embedding = seg.embed(rgb)
    m11 = F.query_point_masks(seg, embedding, dense, text, classes, query_cfg)
    auto = seg.automatic_masks(rgb, embedding=embedding, **amg)
    m12 = F.label_auto_masks(auto, dense, text, classes, auto_cfg)
    m100 = F.label_auto_masks(synthetic, dense, text, classes, every_size)

    def merge(masks) -> bytes:
        label, source = F.merge_label_map(rgb.shape[:2], masks, labels_cfg)
        F.label_region_rows("x", vocab, label, source)
        F.mask_rows("x", vocab, masks)
        return encode_png(label)

    stages = {
        "dense": lambda: F.clip_dense_features(clip, rgb, dense_cfg),
        "text_embeddings_per_shard": lambda: F.class_text_embeddings(clip, vocab, load_templates("single")),
        "detect": lambda: F.detect_classes(dense.cls, text, detect_cfg),
        "sam_embed": lambda: seg.embed(rgb),  # SamEmbeddingsShard: once per image, shared
        "stage11": lambda: F.query_point_masks(seg, embedding, dense, text, classes, query_cfg),
        "stage12_generator": lambda: seg.automatic_masks(rgb, embedding=embedding, **amg),
        "stage12_labelling": lambda: F.label_auto_masks(auto, dense, text, classes, auto_cfg),
        "merge": lambda: merge(m11 + m12),
        "stage12_labelling_100_masks": lambda: F.label_auto_masks(synthetic, dense, text, classes, every_size),
        "merge_105_masks": lambda: merge(m11 + m100),
    }
    timings = compare(stages, repeats=repeats, warmup=0)  # the pass above was the warm-up
    results: dict = {}
    for name, fn in stages.items():
        with ForwardTimer() as fwd:  # one more, synced pass: time inside module forwards
            _, t = time_call(fn)
        med = timings[name]["wall_s"]["median"]
        share = 1 - fwd.total / t["wall_s"] if t["wall_s"] > 0 else 0.0
        results[name] = {"seconds": med, "min_s": timings[name]["wall_s"]["min"],
                         "cpu_s": timings[name]["cpu_s"]["median"], "model_forward_s": round(med * (1 - share), 4),
                         "outside_model_share": round(share, 4)}
    s12 = {k: results["stage12_generator"][k] + results["stage12_labelling"][k]
           for k in ("seconds", "model_forward_s")}
    results["stage12"] = {**{k: round(v, 4) for k, v in s12.items()},
                          "outside_model_share": round(1 - s12["model_forward_s"] / s12["seconds"], 4)}
    per_image = ("dense", "detect", "sam_embed", "stage11", "stage12", "merge")
    total = sum(results[k]["seconds"] for k in per_image)
    inside_total = sum(results[k]["model_forward_s"] for k in per_image)
    return {
        "models": f"{'CLIP ViT-B/16' if size == 'real' else 'tiny test CLIP'} + SAM {arch}, random init", "repeats": repeats, "device": str(seg.device),
        "torch_threads": torch.get_num_threads(), "image_hw": [480, 640],
        "working_hw": list(dense.resize.new_hw), "crops": len(dense.windows), "grid_hw": list(dense.windows.grid_hw),
        "vocabulary": f"{vocab.name} ({len(vocab)} classes)", "detected_classes": len(det.present),
        "stage11_classes": classes_11, "auto_masks_generated": len(auto), "auto_masks_labelled": len(m12),
        "stages": results,
        "per_image_total_s": round(total, 3),
        "per_image_outside_model_share": round(1 - inside_total / total, 4),
        "saved_by_shared_sam_embedding_s": results["sam_embed"]["seconds"],  # Stage 1.2 would re-encode
    }


BENCHMARK = bench_fmbseg_stages
