"""The two trainers as dataset-level Luigi tasks over the cached shards:

FeatureCacheShard(use) + SegmentNMSShard + UseTextEmbeddingShard  →  TrainUSEHead   (use-paper §3.2, §4.2)
FeatureCacheShard(fmbseg) + PseudoLabelShard + ClassTextEmbeddings →  TrainAlignment (fmbseg-paper §3.3, §4.1)

Output ``<out>/<dataset>/train_use|train_alignment/<hash>/``: ``model.pt`` (the Luigi target, written last),
``metrics.jsonl``, ``loss.png``, ``checkpoints/epoch-NNNN.pt``, ``params.json`` — see ``models.training.train``. The
hash covers the input stages' hashes and every setting that changes the weights; a rerun after a crash finds the
same folder and resumes from its last epoch checkpoint, reproducing an uninterrupted run (on CPU bit for bit).
The datasets below only wire stored pieces to the models' functions (mask pooling weights, patch labels); the
random choices per item come from ``pipeline.feature_cache.sample_rng`` (seed, epoch, index).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import luigi
import numpy as np
import torch
from torch.utils.data import Dataset

from models.heads import AlignmentBlock, USEHead, mask_pooling_weights
from models.training import (
    TrainConfig,
    alignment_step,
    collate_alignment,
    collate_use,
    train,
    use_step,
)
from pipeline.artifacts import StageDir
from pipeline.feature_cache import TarStore, crop_cells, read_features, sample_rng, text_matrix
from pipeline.images import decode_label_png
from pipeline.masks import decode_rle
from pipeline.transforms import patch_labels
from pipeline.vocabularies import UNLABELLED, load_vocabulary
from schemas import SEGMENTS
from schemas.features import TEXT_EMBEDDINGS
from tasks.base import DatasetTask, model_settings, uses_gpu
from tasks.features import ClassTextEmbeddings, FeatureCacheShard, UseTextEmbeddingShard
from tasks.fmbseg import PseudoLabelShard
from tasks.use import SegmentNMSShard


class train_use(luigi.Config):  # noqa: N801 — section [train_use] of luigi.cfg (use-paper §4.2)
    lr = luigi.FloatParameter(default=1e-3)
    weight_decay = luigi.FloatParameter(default=0.01)
    poly_power = luigi.FloatParameter(default=0.9)
    epochs = luigi.IntParameter(default=5)
    batch_size = luigi.IntParameter(default=32, description="images per batch (all their segments)")
    grad_clip = luigi.FloatParameter(default=0.0, description="max grad norm; 0 = off")
    width = luigi.IntParameter(default=256, description="per-part width of the head (LLN outputs, CLS)")
    use_cls = luigi.BoolParameter(default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    logit_scale = luigi.FloatParameter(default=30.0, description="the paper's temperature 30 (multiplies)")
    dedup = luigi.BoolParameter(default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                description="identical texts of one batch are not negatives of each other")
    seed = luigi.IntParameter(default=0)
    num_workers = luigi.IntParameter(default=4, description="DataLoader workers (not a content parameter)")
    keep_checkpoints = luigi.IntParameter(default=2)


class train_alignment(luigi.Config):  # noqa: N801 — section [train_alignment] (fmbseg-paper §4.1)
    label_source = luigi.ChoiceParameter(choices=["fmbseg", "car"], default="fmbseg",
                                         description="pseudo-label maps: FMbSeg Stage 1 or CaR (car_labels)")
    lr = luigi.FloatParameter(default=0.01)
    momentum = luigi.FloatParameter(default=0.9)
    weight_decay = luigi.FloatParameter(default=1e-4)
    min_lr = luigi.FloatParameter(default=0.0)
    epochs = luigi.IntParameter(default=10)
    batch_size = luigi.IntParameter(default=5, description="images per batch")
    grad_clip = luigi.FloatParameter(default=0.0, description="max grad norm; 0 = off")
    variant = luigi.ChoiceParameter(choices=AlignmentBlock.VARIANTS, default="block")
    width = luigi.IntParameter(default=0, description="0 = the DINOv2 width")
    num_heads = luigi.IntParameter(default=8)
    mlp_ratio = luigi.FloatParameter(default=4.0)
    dropout = luigi.FloatParameter(default=0.0)
    temperature = luigi.FloatParameter(default=1.0, description="TSupCon temperature; 1 = Eq. 1-4 as written (plain "
                                       "dot products), 0.1 = SupCon's usual value (faster, see alignment_step)")
    anchor_positive = luigi.BoolParameter(default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                          description="Eq. 4 as printed: the anchor is one of its own positives; "
                                          "false = SupCon's P(i) without it")
    label_mode = luigi.ChoiceParameter(choices=["majority", "centre"], default="majority")
    dino_block = luigi.IntParameter(default=-1, description="which stored DINOv2 block (index into its layers)")
    crop_patches = luigi.IntParameter(default=0, description="random crop of the patch grid per item; 0 = whole")
    repeats = luigi.IntParameter(default=1, description="passes over each image per epoch (tiny datasets)")
    seed = luigi.IntParameter(default=0)
    num_workers = luigi.IntParameter(default=4, description="DataLoader workers (not a content parameter)")
    keep_checkpoints = luigi.IntParameter(default=2)


# ----------------------------------------------------------------------------------------------------- datasets
class UseSegmentDataset(Dataset):
    """One item per image with segments: its cached features, the segments' pooling weights at the feature grid
    (``mask_pooling_weights`` of the original-size masks: the grid spans the whole image) and, per segment, one of
    its expressions drawn for this epoch (use-paper §3.2). Items follow ``collate_use``'s sample format."""

    def __init__(self, features: TarStore, segments: dict[str, list[dict]], text_index: dict[str, int],
                 text_emb: np.ndarray, seed: int) -> None:
        self.features, self.text_emb, self.seed, self.epoch = features, text_emb, seed, 0
        self.items: list[tuple[str, list[tuple[dict, list[int]]]]] = []
        for image_id in features.keys():
            segs = []
            for s in sorted(segments.get(image_id, []), key=lambda r: r["segment_id"]):
                ids = sorted({text_index[t["expression"]] for t in s["texts"] if t["expression"] in text_index})
                if ids and s["area"] > 0:
                    segs.append(({"size": [s["height"], s["width"]], "counts": s["rle_counts"]}, ids))
            if segs:
                self.items.append((image_id, segs))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id, segs = self.items[i]
        meta, arrays = read_features(self.features, image_id)
        masks = np.stack([decode_rle(rle) for rle, _ in segs])
        weights = mask_pooling_weights(masks, (meta["grid_height"], meta["grid_width"]))
        rng = sample_rng(self.seed, self.epoch, i)
        ids = np.array([opts[int(rng.integers(len(opts)))] for _, opts in segs], np.int64)
        return {**{k: torch.from_numpy(v) for k, v in arrays.items()}, "weights": weights,
                "text_emb": torch.from_numpy(self.text_emb[ids]), "text_ids": torch.from_numpy(ids)}


class AlignmentDataset(Dataset):
    """One item per (image with a pseudo-label map, repeat): the image's DINOv2 tokens [gh, gw, C] of one stored
    block and its patch labels (``patch_labels`` of the original-size map at the token grid; −1 = ignore),
    optionally a random crop of the grid. Items follow ``collate_alignment``'s sample format."""

    def __init__(self, features: TarStore, labels: TarStore, *, block: int, mode: str, crop: int, repeats: int,
                 seed: int) -> None:
        self.features, self.labels = features, labels
        self.block, self.mode, self.crop, self.repeats, self.seed, self.epoch = block, mode, crop, repeats, seed, 0
        self.ids = [k for k in features.keys() if k in labels]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids) * max(1, self.repeats)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.ids[i % len(self.ids)]
        _, arrays = read_features(self.features, image_id, names=("dino_patches",))
        tokens = arrays["dino_patches"][self.block]  # [gh, gw, C]
        labels = patch_labels(decode_label_png(self.labels.read(image_id, "png")), tokens.shape[:2], self.mode,
                              void=UNLABELLED)
        if self.crop > 0:
            rows, cols = crop_cells(tokens.shape[:2], self.crop, sample_rng(self.seed, self.epoch, i))
            tokens, labels = tokens[rows, cols], labels[rows, cols]
        return {"tokens": torch.from_numpy(np.ascontiguousarray(tokens)), "labels": torch.from_numpy(labels)}


# ----------------------------------------------------------------------------------------------------- tasks
class TrainTask(DatasetTask):
    """A trainer over all shards of its inputs; ``stage_dir`` is the run's folder, ``model.pt`` its target."""

    stage: str = ""

    def hashes(self) -> dict[str, str]:
        """Input stage hashes (one folder per stage: the hash does not depend on the shard)."""
        out = {}
        for name, task in sorted(self.requires().items()):
            first = task[0] if isinstance(task, list) else task
            out[name] = first.stage_dir.hash
        return out

    def train_params(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def stage_dir(self) -> StageDir:
        if self.shard_count == 0:
            raise ValueError(f"{self.stage}: the image source {self.images!r} lists no image to train on")
        return StageDir(self.root, self.dataset, self.stage, {**self.hashes(), **self.train_params()})

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir.path / "model.pt"))

    @property
    def resources(self) -> dict[str, int]:  # type: ignore[override]
        return {"gpu": 1} if uses_gpu(model_settings()) else {}

    def shard_paths(self, name: str, suffix: str) -> list[str]:
        return [str(t.stage_dir.shard_path(t.shard, suffix)) for t in self.requires()[name]]


def _workers(requested: int) -> int:
    """DataLoader workers, at most one per CPU (never changes the numbers: items are seeded per index)."""
    return max(0, min(requested, os.cpu_count() or 1))


def _content(config: TrainConfig) -> dict[str, Any]:
    """TrainConfig fields that change the weights (device, workers and checkpoint retention do not)."""
    fields = {k: v for k, v in config.__dict__.items() if k not in ("num_workers", "device", "keep_checkpoints")}
    return dict(sorted(fields.items()))


class TrainUSEHead(TrainTask):
    """USE segment-embedding head (``models.heads.USEHead``) on the USE segment–text pairs with the symmetric
    segment–text contrastive loss; AdamW + poly by default (use-paper §4.2)."""

    stage = "train_use"

    def requires(self) -> dict[str, list[luigi.Task]]:
        c, n = self.common(), self.shard_count
        return {"features": [FeatureCacheShard(purpose="use", shard=i, **c) for i in range(n)],
                "segments": [SegmentNMSShard(shard=i, **c) for i in range(n)],
                "text": [UseTextEmbeddingShard(shard=i, **c) for i in range(n)]}

    def config(self) -> TrainConfig:
        cfg = train_use()
        return TrainConfig.use_paper(
            lr=cfg.lr, weight_decay=cfg.weight_decay, poly_power=cfg.poly_power, epochs=cfg.epochs,
            batch_size=cfg.batch_size, grad_clip=cfg.grad_clip or None, seed=cfg.seed,
            num_workers=_workers(cfg.num_workers), keep_checkpoints=cfg.keep_checkpoints,
            device=model_settings().device)

    def train_params(self) -> dict[str, Any]:
        cfg = train_use()
        return {"train": _content(self.config()), "head": {"width": cfg.width, "use_cls": cfg.use_cls},
                "loss": {"logit_scale": cfg.logit_scale, "dedup": cfg.dedup}}

    def run(self) -> None:
        cfg, stage_dir = train_use(), self.stage_dir
        stage_dir.write_params()
        self.set_status_message("indexing features, segments and texts")
        features = TarStore(self.shard_paths("features", "tar"))
        segments: dict[str, list[dict]] = defaultdict(list)
        for path in self.shard_paths("segments", "parquet"):
            for row in SEGMENTS.read_parquet(path).to_pylist():
                segments[row["image_id"]].append(row)
        text_index, text_emb = text_matrix([TEXT_EMBEDDINGS.read_parquet(p) for p in self.shard_paths("text", "parquet")])
        dataset = UseSegmentDataset(features, segments, text_index, text_emb, seed=cfg.seed)
        if len(dataset) == 0:
            raise ValueError(f"{self.stage}: no image has both cached features and a segment with an embedded text")
        meta, _ = read_features(features, dataset.items[0][0], names=())
        torch.manual_seed(cfg.seed)
        head = USEHead(
            clip_dim=meta["clip_patches_shape"][-1] if meta["clip_layers"] else 0,
            clip_blocks=len(meta["clip_layers"]),
            dino_dim=meta["dino_patches_shape"][-1] if meta["dino_layers"] else 0,
            dino_blocks=len(meta["dino_layers"]), embed_dim=int(text_emb.shape[1]), width=cfg.width,
            use_cls=cfg.use_cls)
        hashes = self.hashes()
        metadata = {"feature_cache": hashes["features"], "segments": hashes["segments"],
                    "text_embeddings": hashes["text"], "models": {"clip": meta["clip_model"], "dense": meta["dino_model"]},
                    "clip_layers": meta["clip_layers"], "dino_layers": meta["dino_layers"],
                    "grid": [meta["grid_height"], meta["grid_width"]], "resize": meta["resize"],
                    "input_hw": {"clip": meta["clip_input_hw"], "dino": meta["dino_input_hw"]},
                    "images": len(dataset), "texts": len(text_index)}
        self.set_status_message(f"training on {len(dataset)} images")
        train(head, use_step(cfg.logit_scale, cfg.dedup), dataset, self.config(), stage_dir.path, resume=True,
              metadata=metadata, collate_fn=collate_use)


class TrainAlignment(TrainTask):
    """FMbSeg alignment block (``models.heads.AlignmentBlock``) from DINOv2 tokens to the CLIP text space, on the
    Stage-1 pseudo-label maps with TSupCon against the vocabulary's class text embeddings; SGD + cosine, batch 5
    images, 10 epochs by default (fmbseg-paper §4.1)."""

    stage = "train_alignment"

    def requires(self) -> dict[str, Any]:
        c, n = self.common(), self.shard_count
        return {"features": [FeatureCacheShard(purpose="fmbseg", shard=i, **c) for i in range(n)],
                "labels": [self.label_task()(shard=i, **c) for i in range(n)],
                "text": ClassTextEmbeddings(**c)}

    @staticmethod
    def label_task() -> type[luigi.Task]:
        """Both label sources write the same artifact layout (label PNGs + classes.json + LABEL_REGIONS)."""
        from tasks.car_labels import CaRLabelShard

        return CaRLabelShard if train_alignment().label_source == "car" else PseudoLabelShard

    def config(self) -> TrainConfig:
        cfg = train_alignment()
        return TrainConfig.alignment_paper(
            lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, min_lr=cfg.min_lr, epochs=cfg.epochs,
            batch_size=cfg.batch_size, grad_clip=cfg.grad_clip or None, seed=cfg.seed,
            num_workers=_workers(cfg.num_workers), keep_checkpoints=cfg.keep_checkpoints,
            device=model_settings().device)

    def train_params(self) -> dict[str, Any]:
        cfg = train_alignment()
        return {"train": _content(self.config()),
                "head": {"variant": cfg.variant, "width": cfg.width, "num_heads": cfg.num_heads,
                         "mlp_ratio": cfg.mlp_ratio, "dropout": cfg.dropout},
                "loss": {"temperature": cfg.temperature, "anchor_positive": cfg.anchor_positive},
                "data": {"label_source": cfg.label_source, "label_mode": cfg.label_mode, "dino_block": cfg.dino_block,
                         "crop_patches": cfg.crop_patches, "repeats": cfg.repeats}}

    def run(self) -> None:
        cfg, stage_dir = train_alignment(), self.stage_dir
        stage_dir.write_params()
        text_task = self.requires()["text"]
        vocab_spec, template_set = text_task.spec()
        vocab = load_vocabulary(vocab_spec)
        text = sorted(TEXT_EMBEDDINGS.read_parquet(text_task.output().path).to_pylist(), key=lambda r: r["class_index"])
        protos = np.asarray([r["embedding"] for r in text], np.float32)  # [K, D], row k = label value k
        for path in self.shard_paths("labels", "classes.json"):
            found = json.loads(Path(path).read_text())["digest"]
            if found != vocab.digest:
                raise ValueError(f"{path}: pseudo labels of vocabulary digest {found}, class text embeddings of "
                                 f"{vocab.name} ({vocab.digest}): they must use the same vocabulary")
        features = TarStore(self.shard_paths("features", "tar"))
        dataset = AlignmentDataset(features, TarStore(self.shard_paths("labels", "tar")), block=cfg.dino_block,
                                   mode=cfg.label_mode, crop=cfg.crop_patches, repeats=cfg.repeats, seed=cfg.seed)
        if len(dataset) == 0:
            raise ValueError(f"{self.stage}: no image has both cached DINOv2 tokens and a pseudo-label map")
        meta, _ = read_features(features, dataset.ids[0], names=())
        torch.manual_seed(cfg.seed)
        block = AlignmentBlock(meta["dino_patches_shape"][-1], protos.shape[1], variant=cfg.variant,
                               width=cfg.width or None, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                               dropout=cfg.dropout)
        hashes = self.hashes()
        metadata = {"feature_cache": hashes["features"], "pseudo_labels": hashes["labels"],
                    "text_embeddings": hashes["text"], "vocabulary": vocab.name, "vocabulary_digest": vocab.digest,
                    "class_names": [r["text"] for r in text], "template_set": template_set,
                    "dense": meta["dino_model"], "dino_layer": meta["dino_layers"][cfg.dino_block],
                    "input": {k: v for k, v in self.requires()["features"][0].content_params().items()
                              if k in ("short_side", "max_long_side")} | {"resize": meta["resize"]},
                    "images": len(dataset.ids)}
        self.set_status_message(f"training on {len(dataset.ids)} images")
        step = alignment_step(protos, cfg.temperature, anchor_positive=cfg.anchor_positive)
        train(block, step, dataset, self.config(), stage_dir.path, resume=True, metadata=metadata,
              collate_fn=collate_alignment)
