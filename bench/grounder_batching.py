"""Grounding DINO on the ~6 captions of one image: per caption, batched, and batched on one backbone forward
(bench/results/grounder_batching.json)."""

from __future__ import annotations

import os
import tempfile
import time

from bench.fixtures import CAPTIONS, check_size, photo, save_grounder


def bench_grounder_batching(captions: int = 6, short_side: int = 400, repeats: int = 2, size: str = "real") -> dict:
    """Grounding DINO with the ~6 captions of one COCO-like image (640x480): one call per caption (the old path),
    one batched call with the image repeated per caption (the backbone runs per caption), and one batched call
    reusing ONE backbone forward for all captions (`HFGroundingDino.ground_batch`, the stage's path). Real-size
    random-init model (transformers' GroundingDinoConfig defaults: Swin-T + BERT-base width, 6+6 layers, 900
    queries) at `short_side` (800 in the papers; smaller keeps the CPU run short), this machine's device, best of
    `repeats`. `backbone_share`: the backbone's part of one single-caption forward (what reuse saves per extra
    caption). Differences are against the per-caption outputs (box threshold 0: all 900 queries compared).
    `size` "tiny": the test suite's tiny Grounding DINO at its own input size (`short_side` unused; a smoke run)."""
    import numpy as np
    import torch

    from pseudoseg.models.adapters.grounder import HFGroundingDino
    from pseudoseg.models.adapters.tiny import ensure_tiny

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        if check_size(size) == "real":
            save_grounder(tmp, short_side)
        else:
            tmp = ensure_tiny("grounder", tmp)
        grounder = HFGroundingDino(tmp, device="auto")
    rng = np.random.default_rng(0)
    image = photo(rng)
    texts = [CAPTIONS[k % len(CAPTIONS)] for k in range(captions)]
    queries = [(0, t) for t in texts]
    kw = dict(box_threshold=0.0, text_threshold=0.25)
    backbone = {"s": 0.0}

    def pre(*_):
        sync()
        backbone["t"] = time.perf_counter()

    def post(*_):
        sync()
        backbone["s"] += time.perf_counter() - backbone["t"]

    swin = grounder.model.model.backbone.conv_encoder
    handles = [swin.register_forward_pre_hook(pre), swin.register_forward_hook(post)]

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(repeats):
            backbone["s"] = 0.0
            sync()
            t = time.perf_counter()
            out = fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best, out, backbone["s"]

    grounder.ground(image, texts[0], **kw)  # warm-up
    per_caption_s, single, single_backbone_s = timed(lambda: [grounder.ground(image, t, **kw) for t in texts])
    repeated_s, repeated, _ = timed(lambda: grounder.ground_batch([image], queries, reuse_backbone=False, **kw))
    reused_s, reused, _ = timed(lambda: grounder.ground_batch([image], queries, **kw))
    for h in handles:
        h.remove()

    def diff(batch) -> dict:
        pairs = list(zip(single, batch, strict=True))
        return {"max_abs_box_px": float(max(np.abs(a.boxes_xyxy - b.boxes_xyxy).max() for a, b in pairs)),
                "max_abs_token_prob": float(max(np.abs(a.token_probs - b.token_probs).max() for a, b in pairs)),
                "bitwise_equal": all(np.array_equal(a.token_probs, b.token_probs)
                                     and np.array_equal(a.boxes_xyxy, b.boxes_xyxy) for a, b in pairs)}

    return {"model": ("Grounding DINO, transformers defaults (Swin-T, BERT-base width, 6+6 layers, 900 queries), "
                      "random init" if size == "real" else "tiny test Grounding DINO"), "device": "cuda" if cuda else "cpu", "torch_threads": torch.get_num_threads(),
            "input_hw": list(grounder.pixel_values(image).shape[1:]), "captions": captions, "repeats": repeats,
            "per_caption_s": round(per_caption_s, 3), "batched_image_repeated_s": round(repeated_s, 3),
            "batched_backbone_once_s": round(reused_s, 3),
            "backbone_share": round(single_backbone_s / per_caption_s, 3),
            "speedup_backbone_once_vs_per_caption": round(per_caption_s / reused_s, 3),
            "speedup_image_repeated_vs_per_caption": round(per_caption_s / repeated_s, 3),
            "image_repeated_vs_per_caption": diff(repeated), "backbone_once_vs_per_caption": diff(reused),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


BENCHMARK = bench_grounder_batching
