"""Whole-stage wall time against the time inside model forwards, per model stage, with real-size random-init
models (bench/results/stage_overhead.json)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from bench.fixtures import CAPTIONS, check_size, photo, save_clip_b16, save_grounder


def _stage_overhead_models(folder: Path, grounder_short_side: int) -> dict[str, str]:
    """Real-size random-init models (seed 0) written as real weights are, loaded back by the `real` preset: SAM
    vit_b, CLIP ViT-B/16 (224), DINOv2-S/14, Grounding DINO with transformers' default config (Swin-T, BERT-base
    width, 6+6 layers, 900 queries; text features scaled so token probabilities spread) at a reduced input size, LLaVA with a ViT-B/16 tower and an 8-block 1024-wide
    Llama. Tokenizers are the tiny ones (vocabulary size only changes the embedding tables)."""
    import torch
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
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
    clip_processor = save_clip_b16(paths["clip"])
    Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                             image_size=518)).eval().save_pretrained(paths["dino"])
    BitImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                      image_mean=tiny.IMAGENET_MEAN, image_std=tiny.IMAGENET_STD).save_pretrained(paths["dino"])
    save_grounder(paths["grounder"], grounder_short_side, spread_text=True)
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


def bench_stage_overhead(n_images: int = 16, repeats: int = 3, stages: str = "", size: str = "real") -> dict:
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
    list of stage names to time (empty: all; named, the untimed run makes only their inputs). `size` "tiny": the tiny test models (`[models] preset = tiny`) in place
    of the real-size ones, the same code path in seconds (a smoke run)."""
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

    check_size(size)
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
    factories = registry._PRESETS[size]
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
    saved_factories = dict(factories)
    try:
        if size == "real":
            paths = _stage_overhead_models(work / "models", grounder_short_side)
            models = {"preset": "real", "cache_dir": str(work / "models"), "sam_arch": "vit_b",
                      "sam_checkpoint": paths["sam_checkpoint"], "clip": paths["clip"], "dino": paths["dino"],
                      "grounder": paths["grounder"], "captioner": paths["captioner"], "keep_loaded": 8}
        else:
            models = {"preset": "tiny", "cache_dir": str(work / "models"), "keep_loaded": 8}
        images = work / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        annotations, entries = [], []
        for i in range(n_images):
            cv2.imwrite(str(images / f"img_{i:03d}.jpg"), photo(rng))
            entries.append({"id": i, "file_name": f"img_{i:03d}.jpg"})
            for k in range(2):
                annotations.append({"image_id": i, "caption": CAPTIONS[(i + k) % 8]})
        (work / "captions.json").write_text(json.dumps({"images": entries, "annotations": annotations}))
        values = {**settings, "use": {**settings["use"], "gt_captions": str(work / "captions.json")},
                  "models": models}
        for section, kv in values.items():
            if not cfg.has_section(section):
                cfg.add_section(section)
            for key, value in kv.items():
                cfg.set(section, key, str(value))
        common = {"images": str(images), "dataset": "bench", "out": str(work / "out")}
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
        registry.release_models()
        if stages:  # the untimed run: what the named stages need
            builds = [[tasks[name] for name in wanted]]
        else:  # every stage's inputs: both branches and both feature caches
            builds = [[UseSegments(**common), FmbsegLabels(**common)],
                      [FeaturesShard(purpose=p, shard=0, **common) for p in ("use", "fmbseg")]]
        for targets in builds:
            build = build_tasks(targets, local_scheduler=True, workers=1)
            assert build.scheduling_succeeded, build.summary_text
        counts = {}
        for name in wanted:
            record = json.loads(tasks[name].stage_dir.done_path(0).read_text())
            counts[name] = {k: record.get(k) for k in ("in_count", "ok_count", "rejected_count")}
        for role, factory in saved_factories.items():
            factories[role] = timed_factory(factory)
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
            factories.update(saved_factories)
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
            "models": ("random init, real sizes: SAM vit_b, CLIP ViT-B/16 (224), DINOv2-S/14, Grounding DINO "
                       f"(transformers defaults: Swin-T + BERT-base width, 6+6 layers, 900 queries) at short side "
                       f"{grounder_short_side}, LLaVA (ViT-B/16 tower + 8-block 1024-wide Llama)"
                       if size == "real" else "tiny test models (preset tiny)"),
            "device": "cuda" if cuda else "cpu", "torch_threads": torch.get_num_threads(),
            "images": f"{n_images} JPEG 480x640, one shard; 2 GT captions per image + 1 generated",
            "settings": settings, "repeats": repeats, "stages": results,
            "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
        }
    finally:
        registry.release_models()
        shutil.rmtree(work, ignore_errors=True)


BENCHMARK = bench_stage_overhead
