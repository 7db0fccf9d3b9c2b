"""The two trainers as dataset-level Luigi tasks over the cached shards:

FeaturesShard(use) + UseSegmentsShard + UseTextShard  →  TrainUse   (use-paper §3.2, §4.2)
IngestShard + UseSegmentsShard + UseTextShard             →  TrainUse   ([train_use] features = online)
FeaturesShard(fmbseg) + FmbsegLabelsShard + TextClasses →  TrainAlignment (fmbseg-paper §3.3, §4.1)

TrainUse's ``features``: ``cache`` reads the frozen CLIP/DINOv2 tokens of the feature cache (each image squashed
to one square, computed once: cheap epochs, disk-bound); ``online`` runs the frozen encoders inside the training
loop on the paper's augmented crops (random 0.5–2× rescale + 560² crop, use-paper §4.2; masks through the same
``pipeline.core.transforms.ScaleCrop``): the paper's setting, one CLIP + DINOv2 forward per image per epoch (GPU).

Output ``<out>/<dataset>/train_use|train_alignment/<hash>/``: ``model.pt`` (the Luigi target, written last),
``metrics.jsonl``, ``loss.png``, ``checkpoints/epoch-NNNN.pt``, ``_meta/params.json`` — see ``models.training.trainer.train``. The
hash covers the input stages' hashes and every setting that changes the weights; a rerun after a crash finds the
same folder and resumes from its last epoch checkpoint, reproducing an uninterrupted run (on CPU bit for bit).
The torch datasets are in ``models.training.datasets``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import luigi
import numpy as np
import torch

from pseudoseg.models.registry import load_role, model_identity
from pseudoseg.models.training.datasets import AlignmentDataset, UseOnlineDataset, UseSegmentDataset
from pseudoseg.models.training.heads import AlignmentBlock, USEHead
from pseudoseg.models.training.params import TrainAlignmentParams, TrainUseParams
from pseudoseg.models.training.trainer import (
    InputChangedError,
    InputCheck,
    TrainConfig,
    alignment_step,
    collate_alignment,
    collate_use,
    train,
    use_step,
)
from pseudoseg.pipeline.core.artifacts import StageDir
from pseudoseg.pipeline.core.transforms import PAD_VALUE
from pseudoseg.pipeline.core.vocabularies import load_vocabulary
from pseudoseg.pipeline.features.cache import (
    TarStore,
    encode_use_batch,
    read_features,
    resolve_blocks,
    text_matrix,
    use_grid,
)
from pseudoseg.pipeline.features.params import FeaturesUseParams
from pseudoseg.pipeline.use.params import TEXT_CHOICES
from pseudoseg.schemas import SEGMENTS
from pseudoseg.schemas.features import TEXT_EMBEDDINGS
from pseudoseg.tasks.engine.base import (
    CommittedTask,
    DatasetTask,
    StageSettings,
    model_settings,
    pseudoseg,
    redo,
    stage_params,
    uses_gpu,
    verify_inputs,
)
from pseudoseg.tasks.engine.failures import CorruptInput
from pseudoseg.tasks.engine.progress import report_status
from pseudoseg.tasks.stages.catalog import declare
from pseudoseg.tasks.stages.features import FeaturesShard, TextClasses, UseTextShard
from pseudoseg.tasks.stages.fmbseg import FmbsegLabelsShard
from pseudoseg.tasks.stages.ingest import IngestShard
from pseudoseg.tasks.stages.use import UseSegmentsShard


# ----------------------------------------------------------------------------------------------------- tasks
class TrainTask(StageSettings, DatasetTask):
    """A trainer over all shards of its inputs; ``stage_dir`` is the run's folder, ``model.pt`` its target. Its hash
    (``content_params``): the input stages' hashes and the trainer's params (all but the loader workers and the
    checkpoint retention, which change no weight)."""

    stage: str = ""

    def hashes(self) -> dict[str, str]:
        """Input stage hashes (one folder per stage: the hash does not depend on the shard)."""
        out = {}
        for name, task in sorted(self.requires().items()):
            first = task[0] if isinstance(task, list) else task
            out[name] = first.stage_dir.hash
        return out

    def upstream_params(self) -> dict[str, str]:
        return self.hashes()

    @property
    def stage_dir(self) -> StageDir:
        if self.shard_count == 0:
            raise ValueError(f"{self.stage}: the image source {self.images!r} lists no image to train on")
        return StageDir(self.root, self.dataset, self.stage, dict(self.content_params()))

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir.path / "model.pt"))

    @property
    def resources(self) -> dict[str, int]:  # type: ignore[override]
        return {"gpu": 1} if uses_gpu(model_settings()) else {}

    def shard_paths(self, name: str, suffix: str) -> list[str]:
        return [str(t.stage_dir.shard_path(t.shard, suffix)) for t in self.requires()[name]]

    def input_units(self) -> list[CommittedTask]:
        return [t for group in self.requires().values()
                for t in (group if isinstance(group, list) else [group]) if isinstance(t, CommittedTask)]

    def check_inputs(self) -> None:
        """Every input shard against its done.json before training, by size (missing or cut files are redone
        here); their content is checked by sha256 during the first epoch (``input_check``)."""
        mode = "size" if pseudoseg().verify == "sha256" else pseudoseg().verify
        verify_inputs(self, self.input_units(), mode=mode)

    def input_check(self) -> InputCheck | None:
        """``[pseudoseg] verify`` of every input file (sha256 by default), on the first epoch a run trains — in a
        thread beside it, whose reads overlap the epoch's (bench/results/verify_cost.json: the cost) — and sizes
        after each later epoch. Problems are keyed ``<unit>: <file>``."""
        mode = pseudoseg().verify
        if mode == "off":
            return None
        units = self.input_units()

        def problems(how: str) -> dict[str, str]:
            return {f"{u.describe()}: {name}": problem for u in units for name, problem in u.problems(how).items()}

        return InputCheck(full=lambda: problems(mode), quick=lambda: problems("size"))

    def fit(self, check: InputCheck | None) -> None:
        raise NotImplementedError

    def run(self) -> None:
        """Train (``fit``); an input that fails its check during training is redone like any corrupt input
        (quarantined with one WARNING line, produced again here) and training goes on from the last checkpoint
        before it — no checkpoint follows an epoch of unverified data. Failing again: CorruptInput, one line."""
        self.check_inputs()
        try:
            self.fit(self.input_check())
            return
        except InputChangedError as e:
            for unit in self.input_units():
                prefix = f"{unit.describe()}: "
                found = {k[len(prefix):]: v for k, v in e.problems.items() if k.startswith(prefix)}
                if found:
                    redo(self, unit, found, why="failed verification", mode=pseudoseg().verify)
        try:
            self.fit(self.input_check())
        except InputChangedError as e:
            raise CorruptInput(f"{self.stage}: {e}, again after its inputs were redone") from None


def _workers(requested: int) -> int:
    """DataLoader workers, at most one per CPU (never changes the numbers: items are seeded per index)."""
    return max(0, min(requested, os.cpu_count() or 1))


@declare(makes="train the USE segment-embedding head", counts="runs", rows_are="steps", full_dag=True)
class TrainUse(TrainTask):
    """USE segment-embedding head (``models.training.heads.USEHead``) on the USE segment–text pairs with the symmetric
    segment–text contrastive loss; AdamW + poly by default (use-paper §4.2). ``[train_use] features`` picks cached
    tokens or online encoding on augmented crops (module docstring); ``requires`` follows it."""

    stage = "train_use"
    params_type = TrainUseParams

    def requires(self) -> dict[str, list[luigi.Task]]:
        c, n = self.common(), self.shard_count
        deps: dict[str, list[luigi.Task]] = {"segments": [UseSegmentsShard(shard=i, **c) for i in range(n)],
                                             "text": [UseTextShard(shard=i, **c) for i in range(n)]}
        if self.params.features == "online":
            deps["images"] = [IngestShard(shard=i, **c) for i in range(n)]
        else:
            deps["features"] = [FeaturesShard(purpose="use", shard=i, **c) for i in range(n)]
        return deps

    def config(self) -> TrainConfig:
        cfg = self.params
        return TrainConfig.use_paper(cfg, grad_clip=cfg.grad_clip or None, seed=cfg.seed,
                                     num_workers=_workers(cfg.num_workers), keep_checkpoints=cfg.keep_checkpoints,
                                     device=model_settings().device)

    def online_spec(self) -> dict[str, Any]:
        """What the online features depend on (the cache mode has them in the feature cache's hash instead)."""
        cfg, fu, settings = self.params, stage_params(FeaturesUseParams), model_settings()
        clip_blocks = fu.clip_blocks.strip().lower() not in ("", "none")
        need_clip = clip_blocks or (not cfg.augment and fu.input_size == 0)  # the squash defaults to CLIP's size
        need_dino = fu.dino_blocks.strip().lower() not in ("", "none")
        spec: dict[str, Any] = {"clip": model_identity("clip", settings) if need_clip else "",
                                "dense": model_identity("dense", settings) if need_dino else "",
                                "clip_blocks": fu.clip_blocks if clip_blocks else "none",
                                "dino_blocks": fu.dino_blocks if need_dino else "none", "augment": cfg.augment}
        if cfg.augment:
            spec.update(crop_size=cfg.crop_size, scale_range=[cfg.scale_min, cfg.scale_max], pad_value=PAD_VALUE)
        else:
            spec["input_size"] = fu.input_size
        return spec

    def content_params(self) -> dict[str, Any]:
        params = dict(super().content_params())
        if self.params.features == "online":
            params["online"] = self.online_spec()
        return params

    def fit(self, check: InputCheck | None) -> None:
        cfg, stage_dir = self.params, self.stage_dir
        stage_dir.write_params()
        report_status(self, "indexing segments and texts")
        segments: dict[str, list[dict]] = defaultdict(list)
        for path in self.shard_paths("segments", "parquet"):
            for row in SEGMENTS.read_parquet(path).to_pylist():
                segments[row["image_id"]].append(row)
        text_index, text_emb = text_matrix([TEXT_EMBEDDINGS.read_parquet(p) for p in self.shard_paths("text", "parquet")])
        kinds, hashes = TEXT_CHOICES[cfg.texts], self.hashes()
        metadata: dict[str, Any] = {"segments": hashes["segments"], "text_embeddings": hashes["text"],
                                    "text_kinds": cfg.texts, "features": cfg.features}
        encode = None
        if cfg.features == "online":
            dataset, dims, encode = self._online(segments, text_index, text_emb, kinds, metadata)
        else:
            features = TarStore(self.shard_paths("features", "tar"))
            dataset = UseSegmentDataset(features, segments, text_index, text_emb, seed=cfg.seed, kinds=kinds)
            if len(dataset) == 0:
                raise ValueError(f"{self.stage}: no image has both cached features and a segment with a text")
            meta, _ = read_features(features, dataset.items[0][0], names=())
            dims = {"clip": (meta["clip_patches_shape"][-1], len(meta["clip_layers"])) if meta["clip_layers"] else (0, 0),
                    "dino": (meta["dino_patches_shape"][-1], len(meta["dino_layers"])) if meta["dino_layers"] else (0, 0)}
            metadata.update({"feature_cache": hashes["features"],
                             "models": {"clip": meta["clip_model"], "dense": meta["dino_model"]},
                             "clip_layers": meta["clip_layers"], "dino_layers": meta["dino_layers"],
                             "grid": [meta["grid_height"], meta["grid_width"]], "resize": meta["resize"],
                             "input_hw": {"clip": meta["clip_input_hw"], "dino": meta["dino_input_hw"]}})
        metadata.update({"images": len(dataset), "texts": len(text_index)})
        torch.manual_seed(cfg.seed)
        head = USEHead(clip_dim=dims["clip"][0], clip_blocks=dims["clip"][1], dino_dim=dims["dino"][0],
                       dino_blocks=dims["dino"][1], embed_dim=int(text_emb.shape[1]), width=cfg.width,
                       use_cls=cfg.use_cls)
        report_status(self, f"training on {len(dataset)} images ({cfg.features} features)")
        train(head, use_step(cfg, encode=encode), dataset, self.config(), stage_dir.path,
              resume=True, metadata=metadata, collate_fn=collate_use, input_check=check)

    def _online(self, segments: dict[str, list[dict]], text_index: dict[str, int], text_emb: np.ndarray,
                kinds: tuple[str, ...], metadata: dict[str, Any]):
        """(UseOnlineDataset, head input dims, the encode function of use_step) for features = online."""
        cfg, settings, spec = self.params, model_settings(), self.online_spec()
        fu = stage_params(FeaturesUseParams)
        clip = load_role("clip", settings) if spec["clip"] else None
        dense = load_role("dense", settings) if spec["dense"] else None
        if spec["clip_blocks"] != "none" and not hasattr(clip, "encode_image_blocks"):
            raise ValueError(f"the CLIP adapter of preset {settings.preset!r} ({type(clip).__name__}) cannot return "
                             "block tokens (encode_image_blocks); set [features_use] clip_blocks = none")
        clip_layers = resolve_blocks(spec["clip_blocks"], clip.vision_layers) if spec["clip_blocks"] != "none" else ()
        dino_layers = resolve_blocks(spec["dino_blocks"], dense.num_layers) if dense is not None else ()
        size = cfg.crop_size if cfg.augment else (fu.input_size or clip.image_size)
        grid = use_grid(size, clip.patch_size if clip_layers else dense.patch_size)

        def encode(images: list[np.ndarray]) -> dict[str, np.ndarray]:
            return encode_use_batch(images, clip=clip, dense=dense, clip_layers=clip_layers, dino_layers=dino_layers,
                                    input_size=size)

        dataset = UseOnlineDataset(TarStore(self.shard_paths("images", "tar")), segments, text_index, text_emb,
                                   seed=cfg.seed, kinds=kinds, grid=grid, crop=size if cfg.augment else 0,
                                   scale_range=(cfg.scale_min, cfg.scale_max))
        if len(dataset) == 0:
            raise ValueError(f"{self.stage}: no ingested image has a segment with a text")
        probe = encode([np.zeros((size, size, 3), np.uint8)])  # the head's input widths
        dims = {p: (probe[f"{p}_patches"].shape[-1], probe[f"{p}_patches"].shape[1]) if f"{p}_patches" in probe
                else (0, 0) for p in ("clip", "dino")}
        metadata.update({"ingest": self.hashes()["images"], "online": spec,
                         "models": {"clip": spec["clip"], "dense": spec["dense"]},
                         "clip_layers": list(clip_layers), "dino_layers": list(dino_layers), "grid": [grid, grid],
                         "resize": "scale_crop" if cfg.augment else "squash", "input_size": size})
        return dataset, dims, encode


@declare(makes="train the FMbSeg alignment block", counts="runs", rows_are="steps", full_dag=True)
class TrainAlignment(TrainTask):
    """FMbSeg alignment block (``models.training.heads.AlignmentBlock``) from DINOv2 tokens to the CLIP text space, on the
    Stage-1 pseudo-label maps with TSupCon against the vocabulary's class text embeddings; SGD + cosine, batch 5
    images, 10 epochs by default (fmbseg-paper §4.1)."""

    stage = "train_alignment"
    params_type = TrainAlignmentParams

    def requires(self) -> dict[str, Any]:
        c, n = self.common(), self.shard_count
        return {"features": [FeaturesShard(purpose="fmbseg", shard=i, **c) for i in range(n)],
                "labels": [self.label_task()(shard=i, **c) for i in range(n)],
                "text": TextClasses(**c)}

    def label_task(self) -> type[luigi.Task]:
        """Both label sources write the same artifact layout (label PNGs + classes.json + LABEL_REGIONS)."""
        from pseudoseg.tasks.stages.car_labels import CarLabelsShard

        return CarLabelsShard if self.params.label_source == "car" else FmbsegLabelsShard

    def config(self) -> TrainConfig:
        cfg = self.params
        return TrainConfig.alignment_paper(cfg, grad_clip=cfg.grad_clip or None, seed=cfg.seed,
                                           num_workers=_workers(cfg.num_workers),
                                           keep_checkpoints=cfg.keep_checkpoints, device=model_settings().device)

    def fit(self, check: InputCheck | None) -> None:
        cfg, stage_dir = self.params, self.stage_dir
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
                    "input": {k: v for k, v in dataclasses.asdict(self.requires()["features"][0].params).items()
                              if k in ("short_side", "max_long_side")} | {"resize": meta["resize"]},
                    "images": len(dataset.ids)}
        report_status(self, f"training on {len(dataset.ids)} images")
        step = alignment_step(protos, cfg)
        train(block, step, dataset, self.config(), stage_dir.path, resume=True, metadata=metadata,
              collate_fn=collate_alignment, input_check=check)
