"""Synthetic inputs the benchmarks share, drawn from a seeded generator so every run measures the same data:
photo-like images and boxes, minimal PNGs and image lists, the trainers' caches at real sizes, random-init models
at real sizes saved as real weights are, COCO-like captions; and dropping files from the page cache (cold reads)."""

from __future__ import annotations

import os
from pathlib import Path

# COCO-like captions (the USE branch's ground-truth captions and the grounder's queries)
CAPTIONS = (
    "A man riding a brown horse on the beach next to the water.",
    "Two dogs are playing with a ball in the green grass of a park.",
    "A red bus is parked on the street in front of a tall building.",
    "A woman sitting on a wooden bench holding a cup of coffee.",
    "A cat lying on a sofa beside a lamp in the living room.",
    "People walking on the road near a train station at night.",
    "A plate of food on a table with a glass of water and a book.",
    "A small boat on the lake with trees and a mountain behind it.",
)




def check_size(size: str) -> str:
    """``size``, a benchmark's model size: "real" (what ``make bench`` measures) or "tiny" (the test suite's tiny
    models and reduced settings: the same code path in seconds, for smoke runs)."""
    if size not in ("real", "tiny"):
        raise ValueError(f"size must be 'real' or 'tiny', got {size!r}")
    return size


def photo(rng, hw: tuple[int, int] = (480, 640), kernel: int = 15):  # noqa: ANN001, ANN201 — numpy Generator, uint8 image
    """A random uint8 RGB image of ``hw`` blurred by a ``kernel``-sized Gaussian (photo-like frequencies)."""
    import cv2
    import numpy as np

    return cv2.GaussianBlur(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), (kernel, kernel), 0)


def random_boxes(rng, n: int):  # noqa: ANN001, ANN201 — numpy Generator, float32 [n, 4]
    """``n`` random xyxy boxes of 20-240 px sides inside a 640x480 image."""
    import numpy as np

    xy0 = rng.uniform([0, 0], [560, 400], size=(n, 2))
    wh = rng.uniform(20, 240, size=(n, 2))
    return np.concatenate([xy0, np.minimum(xy0 + wh, [640, 480])], axis=1).astype(np.float32)


def drop_page_cache(paths: list[str]) -> None:
    """Drop each file's pages from the page cache (posix_fadvise DONTNEED): the next read goes to the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def tiny_png(rgb) -> bytes:  # noqa: ANN001 — uint8 [H, W, 3]
    """A minimal PNG (no encoder library): 100k of them in seconds."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def image_lists(folder: Path, sizes: list[int], side: int = 8) -> dict[int, Path]:
    """max(sizes) distinct random side×side PNGs (1,000 per subfolder) and one .txt list per size (the first n)."""
    import numpy as np

    rng = np.random.default_rng(0)
    names = []
    for i in range(max(sizes)):
        sub = folder / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img_{i:07d}.png").write_bytes(tiny_png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
        names.append(f"{i // 1000:04d}/img_{i:07d}.png")
    lists = {}
    for n in sizes:
        lists[n] = folder / f"list-{n}.txt"
        lists[n].write_text("\n".join(names[:n]) + "\n")
    return lists


def synthetic_training_caches(root: Path, *, n_use: int, n_align: int, shards: int, image_hw=(480, 640),
                              segments: int = 8, clip=(3, 24, 24, 1024), dino_use=(2, 24, 24, 1024),
                              dino_align=(1, 24, 32, 1024), seed: int = 0) -> dict:
    """Feature caches, label maps and segments in the exact on-disk format the trainers read (``feature_sample``
    written by ``TarSpool``, PNG label maps, SEGMENTS-like rows with compressed RLEs), at the default real sizes:
    USE = CLIP L/14-336 blocks 7/15/23 + DINOv2-L last 2 on the 24×24 grid (5.9 MB/image); FMbSeg = DINOv2-L last
    block at short side 336 of a 480×640 image (24×32, 1.6 MB/image). Random values; ellipse segments."""
    import cv2
    import numpy as np

    from pseudoseg.pipeline.core.artifacts import TarSpool
    from pseudoseg.pipeline.core.images import encode_png
    from pseudoseg.pipeline.core.masks import encode_rle, rle_area
    from pseudoseg.pipeline.features.cache import feature_sample

    rng = np.random.default_rng(seed)
    hh, ww = image_hw

    def meta(purpose: str, grid: tuple[int, int], parts: dict) -> dict:
        m = {"purpose": purpose, "height": hh, "width": ww, "resize": "squash", "grid_height": grid[0],
             "grid_width": grid[1]}
        for p in ("clip", "dino"):
            shape = parts.get(p)
            m.update({f"{p}_model": p if shape else "", f"{p}_patch_size": 14 if shape else 0, f"{p}_input_hw": [],
                      f"{p}_layers": list(range(shape[0])) if shape else [],
                      f"{p}_patches_shape": list(shape) if shape else [],
                      f"{p}_cls_shape": [shape[0], shape[-1]] if shape else []})
        return m

    def write(kind: str, n: int, make) -> list[str]:
        per, paths = -(-n // shards), []
        for s in range(shards):
            target = root / kind / f"shard-{s:06d}.tar"
            with TarSpool(target) as spool:
                for i in range(s * per, min(n, (s + 1) * per)):
                    spool.write(make(i))
            spool.path.rename(target)
            paths.append(str(target))
        return paths

    def arrays(parts: dict) -> dict:
        out = {}
        for p, shape in parts.items():
            out[f"{p}_patches"] = rng.standard_normal(shape, np.float32)
            out[f"{p}_cls"] = rng.standard_normal((shape[0], shape[-1]), np.float32)
        return out

    use_parts, align_parts = {"clip": clip, "dino": dino_use}, {"dino": dino_align}
    use = write("use", n_use, lambda i: feature_sample(f"u{i:06d}", arrays(use_parts),
                                                        meta("use", clip[1:3], use_parts))[0])
    align = write("align", n_align, lambda i: feature_sample(f"a{i:06d}", arrays(align_parts),
                                                              meta("fmbseg", dino_align[1:3], align_parts))[0])

    def label(i: int) -> dict:
        lab = np.full(image_hw, 255, np.uint8)
        for _ in range(6):
            y, x = rng.integers(0, hh - 40), rng.integers(0, ww - 40)
            lab[y : y + rng.integers(40, 240), x : x + rng.integers(40, 320)] = rng.integers(0, 171)
        return {"__key__": f"a{i:06d}", "png": encode_png(lab)}

    labels = write("labels", n_align, label)
    texts = [f"text {k}" for k in range(200)]
    rows: dict[str, list[dict]] = {}
    for i in range(n_use):
        rows[f"u{i:06d}"] = []
        for s in range(segments):
            m = np.zeros(image_hw, np.uint8)
            cv2.ellipse(m, (int(rng.integers(0, ww)), int(rng.integers(0, hh))),
                        (int(rng.integers(10, 200)), int(rng.integers(10, 160))), 0, 0, 360, 1, -1)
            rle = encode_rle(m.astype(bool))
            t = rng.choice(len(texts), 2, replace=False)
            rows[f"u{i:06d}"].append({"segment_id": s, "height": hh, "width": ww, "rle_counts": rle["counts"],
                                      "area": rle_area(rle),
                                      "texts": [{"phrase": texts[t[0]], "expression": texts[t[1]]}]})
    return {"use": use, "align": align, "labels": labels, "segments": rows,
            "text_index": {t: k for k, t in enumerate(texts)},
            "text_emb": rng.standard_normal((len(texts), 768)).astype(np.float32)}



def save_clip_b16(out: str | Path):  # noqa: ANN201 — the CLIPImageProcessor
    """CLIP ViT-B/16 at random init (transformers' CLIPConfig defaults, vision patch 16, 224) with its processor
    (the offline tiny tokenizer) saved to ``out`` as real weights are; returns the image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pseudoseg.models.adapters.tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_clip_tokenizer

    tok = build_clip_tokenizer()
    config = CLIPConfig(text_config=dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                        vision_config=dict(patch_size=16))
    CLIPModel(config).eval().save_pretrained(out)
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(out)
    return processor


def save_grounder(out: str | Path, short_side: int, *, spread_text: bool = False) -> None:
    """Grounding DINO at random init with transformers' default config (Swin-T, BERT-base width, 6+6 layers, 900
    queries) and its processor (images at ``short_side``, longest edge 5/3 of it; the offline tiny BERT tokenizer)
    saved to ``out``. ``spread_text``: random text features saturate every token probability at 1, so the last
    text-enhancer norm is scaled down (weight 0.03) to spread them."""
    import torch
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    from pseudoseg.models.adapters import tiny

    bert = tiny.build_bert_tokenizer()
    grounder = GroundingDinoForObjectDetection(GroundingDinoConfig(text_config=BertConfig(vocab_size=len(bert))))
    if spread_text:
        with torch.no_grad():
            norm = grounder.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after
            norm.weight.fill_(0.03)
            norm.bias.zero_()
    grounder.eval().save_pretrained(out)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(
        size={"shortest_edge": short_side, "longest_edge": short_side * 5 // 3}, image_mean=tiny.IMAGENET_MEAN,
        image_std=tiny.IMAGENET_STD), tokenizer=bert).save_pretrained(out)
