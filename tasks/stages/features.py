"""Feature caches and text embeddings for the trainable heads, one Luigi task per shard (text of classes: one per
dataset):

IngestShard ──→ FeaturesShard(purpose=use)     frozen CLIP + DINOv2 blocks, USE square   (stage features_use)
            └─→ FeaturesShard(purpose=fmbseg)  frozen DINOv2 tokens, aspect kept        (stage features_fmbseg)
UseSegmentsShard → UseTextShard            CLIP text of every distinct phrase and expression (use_text)
TextClasses                                CLIP text of every vocabulary class      (stage text_classes)

Disk (defaults, ViT-L/14 CLIP-336 and DINOv2-L, width 1024, float16): USE 336² → 24×24 grid, CLIP blocks 7/15/23
+ DINOv2 blocks 22/23 = 5 × 576 × 1024 × 2 B + CLS ≈ 5.91 MB/image; FMbSeg DINOv2 last block at short side 336
(640×480 → 24×32 grid) ≈ 1.58 MB/image; a 118,287-image COCO run ≈ 699 GB + 186 GB < the 1 TB budget
(``pipeline.features.cache.DISK_BUDGET_BYTES``). The paper's choice (all 24 CLIP blocks + last 6 DINOv2) would be
30 blocks ≈ 35.4 MB/image ≈ 4.2 TB: set ``[features_use] clip_blocks = all`` / ``dino_blocks = last:6`` for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import luigi
import numpy as np

from pseudoseg.models.registry import load_role, model_identity
from pseudoseg.models.training.params import TrainUseParams
from pseudoseg.pipeline.core.artifacts import ShardOutput, StageDir, atomic_write_bytes
from pseudoseg.pipeline.core.overlap import Outcome
from pseudoseg.pipeline.core.params import StageParams
from pseudoseg.pipeline.core.vocabularies import class_text_embeddings, load_templates, load_vocabulary
from pseudoseg.pipeline.features.cache import (
    PURPOSES,
    embed_texts,
    encode_fmbseg_batch,
    encode_use,
    feature_sample,
    finite,
    fmbseg_input,
    resolve_blocks,
    text_rows,
    text_templates,
    use_input_sides,
    use_inputs,
)
from pseudoseg.pipeline.features.params import FeaturesFmbsegParams, FeaturesUseParams, UseTextParams
from pseudoseg.pipeline.use.pairs import text_pool
from pseudoseg.schemas import REJECTS, SEGMENTS
from pseudoseg.schemas.features import FEATURE_CACHE, TEXT_EMBEDDINGS
from pseudoseg.tasks.engine.base import (
    DatasetTask,
    ProgressReporter,
    ShardTask,
    StageWrapper,
    model_settings,
    stage_params,
    stage_wrapper,
    uses_gpu,
)
from pseudoseg.tasks.engine.image_errors import ImageErrors
from pseudoseg.tasks.stages.catalog import declare
from pseudoseg.tasks.stages.fmbseg import detect_params
from pseudoseg.tasks.stages.loop import BatchedImageStage, LoopImage, LoopState
from pseudoseg.tasks.stages.use import UseSegmentsShard

PURPOSE_PARAMS = {"use": FeaturesUseParams, "fmbseg": FeaturesFmbsegParams}


TEXT_BATCH = 256  # texts per CLIP text-encoder call


@dataclass(kw_only=True)
class FeaturesState(LoopState):
    encode: Callable[..., list[tuple[dict[str, np.ndarray], dict[str, Any]]]]  # (images, prepared=) → per image
    forward_size: int  # images per encoder forward ([features_*] batch_size)


class FeaturesShard(BatchedImageStage[FeaturesState]):
    """Frozen-encoder tokens of one shard (float16 .npy in a WebDataset tar, the record per image in JSON and
    Parquet, ``feature_bytes`` = disk cost per image); ``purpose`` picks the configuration (use | fmbseg).

    A window of images is grouped by input size (FMbSeg keeps the aspect: only equal sizes share a forward), at most
    ``batch_size`` per forward; the arrays are checked and serialised behind the loop, in manifest order."""

    purpose = luigi.ChoiceParameter(choices=PURPOSES, default="use")
    contract, writes_tar, works_behind, sort_rejects = FEATURE_CACHE, True, True, True

    @property
    def stage(self) -> str:  # type: ignore[override]
        return f"features_{self.purpose}"

    def params_source(self) -> type[StageParams]:
        return PURPOSE_PARAMS[self.purpose]

    def _specs(self) -> dict[str, str]:
        cfg = self.params
        return {"clip_blocks": cfg.clip_blocks if self.purpose == "use" else "none", "dino_blocks": cfg.dino_blocks}

    def _needs(self) -> tuple[bool, bool]:
        specs = self._specs()
        use_clip = specs["clip_blocks"].strip().lower() not in ("", "none")
        # the USE square defaults to CLIP's native size, so CLIP is read even for DINOv2-only features then
        return use_clip or (self.purpose == "use" and self.params.input_size == 0), \
            specs["dino_blocks"].strip().lower() not in ("", "none")

    def model_roles(self) -> tuple[str, ...]:
        need_clip, need_dino = self._needs()
        return ("clip",) * need_clip + ("dense",) * need_dino

    def content_params(self) -> dict[str, Any]:
        return {**super().content_params(), "purpose": self.purpose, "dtype": "float16"}

    def prepare(self) -> FeaturesState:
        sources, cfg = self.sources(), self.params
        encode, prepare_image = self.encoder()
        # a window of images is grouped by input size (FMbSeg keeps the aspect: only equal sizes share a forward)
        window = cfg.batch_size if self.purpose == "use" else 4 * cfg.batch_size
        return FeaturesState(sources=sources, in_count=len(sources), total=len(sources), batch_size=window,
                             prepare_image=prepare_image, encode=encode, forward_size=cfg.batch_size)

    def encoder(self) -> tuple[Callable[..., list], Callable[[np.ndarray], Any]]:
        """(the batch encoder, the per-image preparation ahead of it) of this purpose's models and blocks."""
        settings, cfg, specs = model_settings(), self.params, self._specs()
        need_clip, need_dino = self._needs()
        clip = load_role("clip", settings) if need_clip else None
        dense = load_role("dense", settings) if need_dino else None
        blocks_clip = specs["clip_blocks"].strip().lower() not in ("", "none")
        if blocks_clip and not hasattr(clip, "encode_image_blocks"):
            raise ValueError(f"the CLIP adapter of preset {settings.preset!r} ({type(clip).__name__}) cannot return "
                             "block tokens (encode_image_blocks); set [features_use] clip_blocks = none")
        clip_layers = resolve_blocks(specs["clip_blocks"], clip.vision_layers) if blocks_clip else ()
        dino_layers = resolve_blocks(specs["dino_blocks"], dense.num_layers) if dense is not None else ()
        dino_name = model_identity("dense", settings) if need_dino else ""
        if self.purpose != "use":
            return (partial(encode_fmbseg_batch, dense=dense, dino_layers=dino_layers, short_side=cfg.short_side,
                            max_long_side=cfg.max_long_side, dino_name=dino_name),
                    partial(fmbseg_input, patch_size=dense.patch_size, short_side=cfg.short_side,
                            max_long_side=cfg.max_long_side))
        size = cfg.input_size or clip.image_size
        sides = use_input_sides(clip=clip, dense=dense, clip_layers=clip_layers, dino_layers=dino_layers,
                                input_size=size)
        return (partial(encode_use, clip=clip, dense=dense, clip_layers=clip_layers, dino_layers=dino_layers,
                        input_size=size, clip_name=model_identity("clip", settings) if need_clip else "",
                        dino_name=dino_name),
                partial(use_inputs, sides=sides))

    def parts(self, state: FeaturesState, batch: list[LoopImage]) -> list[list[int]]:
        """Same-size groups (USE: one square for all; FMbSeg, aspect kept: one per input size, in order), at most
        ``forward_size`` images per forward."""
        groups = self.size_groups(batch) if self.purpose != "use" else [list(range(len(batch)))]
        return [group[c : c + state.forward_size] for group in groups for c in range(0, len(group), state.forward_size)]

    @staticmethod
    def size_groups(batch: list[LoopImage]) -> list[list[int]]:
        by_size: dict[tuple[int, ...], list[int]] = {}
        for k, image in enumerate(batch):
            by_size.setdefault(image.prepared[1].shape, []).append(k)
        return list(by_size.values())

    def run_batch(self, state: FeaturesState, images: list[LoopImage]) -> list:
        return state.encode([image.rgb for image in images], prepared=[image.prepared for image in images])

    def finish_image(self, state: FeaturesState, image: LoopImage, encoded: tuple) -> None:
        state.submit(image.image_id, self.serialise, image.image_id, *encoded)

    @staticmethod
    def serialise(image_id: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> tuple | None:
        """Behind the loop: the tar sample and row (None: non-finite features)."""
        if not finite(arrays):
            return None
        sample, record = feature_sample(image_id, arrays, meta)
        FEATURE_CACHE.table([record])  # the sample's JSON obeys the contract too
        return sample, record

    def deliver(self, state: FeaturesState, errors: ImageErrors, image_id: str, outcome: Outcome) -> None:
        errors.write_sample(image_id, outcome, state.tar, state.rows, "nonfinite_features",
                            "an encoder returned NaN/inf features")


class UseTextShard(ShardTask):
    """CLIP text embeddings of every distinct text of one shard's USE segments — noun phrases and referring
    expressions, the paper stores both (use-paper §3.1) — as the mean over the 4 templates of §4.2; each text once
    within the shard (``pipeline.use.pairs.text_pool``; the trainer deduplicates across shards)."""

    stage = "use_text"

    def requires(self) -> dict[str, ShardTask]:
        return {"segments": UseSegmentsShard(shard=self.shard, **self.common())}

    params_type, roles = UseTextParams, ("clip",)

    def upstream_params(self) -> dict[str, str]:
        return {"segments": self.requires()["segments"].stage_dir.hash}

    def content_params(self) -> dict[str, Any]:
        return {**super().content_params(), "templates": list(text_templates(self.params.text_templates)),
                "texts": "phrase+expression", "schema": TEXT_EMBEDDINGS.tag}

    @property
    def resources(self) -> dict[str, int]:  # type: ignore[override]
        return {"gpu": 1} if uses_gpu(model_settings()) else {}

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        name = self.params.text_templates
        path = self.requires()["segments"].stage_dir.shard_path(self.shard, "parquet")
        pool = text_pool(SEGMENTS.read_parquet(path).to_pylist())
        texts = [t for t, _, _ in pool]
        progress.start(1)
        emb = embed_texts(load_role("clip", model_settings()), texts, text_templates(name), TEXT_BATCH) \
            if texts else np.zeros((0, 0), np.float32)
        rows = text_rows(texts, emb, kind="segment_text", template_set=name, as_phrase=[p for _, p, _ in pool],
                         as_expression=[x for _, _, x in pool])
        output = ShardOutput(in_count=len(texts), ok_count=len(texts), rejected_count=0)
        output.add_table("parquet", TEXT_EMBEDDINGS, TEXT_EMBEDDINGS.table(rows))
        output.add_table("rejects.parquet", REJECTS, REJECTS.table([]))
        return output


class TextClasses(DatasetTask):
    """CLIP text embeddings of a vocabulary's classes (``pipeline.core.vocabularies.class_text_embeddings``: prompt
    names × templates, averaged per class — the function Evaluate uses too), one Parquet row per class in
    label-value order. Defaults: ``[fmbseg] vocabulary`` / ``templates``, i.e. the classes the pseudo-label maps
    index; ``[fmbseg] templates`` is also the template set Evaluate prompts FMbSeg's benchmark classes with."""

    vocabulary = luigi.Parameter(default="", description="built-in name or .txt path; '' = [fmbseg] vocabulary")
    templates = luigi.Parameter(default="", description="template set; '' = [fmbseg] templates")

    def spec(self) -> tuple[str, str]:
        return self.vocabulary or detect_params().vocabulary, self.templates or detect_params().templates

    @property
    def stage_dir(self) -> StageDir:
        vocab_spec, templates = self.spec()
        vocab = load_vocabulary(vocab_spec)
        params = {"clip": model_identity("fmbseg_clip", model_settings()), "vocabulary": vocab.name,
                  "vocabulary_digest": vocab.digest, "template_set": templates,
                  "templates": list(load_templates(templates)), "schema": TEXT_EMBEDDINGS.tag}
        return StageDir(self.root, self.dataset, "text_classes", params)

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir.path / "text.parquet"))

    def run(self) -> None:
        vocab_spec, templates = self.spec()
        vocab = load_vocabulary(vocab_spec)
        emb = class_text_embeddings(load_role("fmbseg_clip", model_settings()), vocab, load_templates(templates))
        rows = text_rows(list(vocab.classes), emb, kind="class", template_set=templates,
                         class_indices=range(len(vocab)))
        stage_dir = self.stage_dir
        stage_dir.write_params()
        atomic_write_bytes(stage_dir.path / "text.parquet", TEXT_EMBEDDINGS.to_parquet_bytes(TEXT_EMBEDDINGS.table(rows)))


@declare(makes="frozen CLIP + DINOv2 tokens for the USE head", counts="images", rows_are="images", contract=FEATURE_CACHE,
         full_dag=True)
class FeaturesUse(StageWrapper):
    """All shards of the USE feature cache (CLIP + DINOv2 blocks on one square grid)."""

    shard_task = FeaturesShard

    def requires(self) -> list[ShardTask]:
        return [FeaturesShard(purpose="use", shard=i, **self.common()) for i in range(self.shard_count)]

    def wanted_by_full_dag(self) -> bool:
        """Only when the USE head trains from the cache ([train_use] features = online encodes in its loop)."""
        return stage_params(TrainUseParams).features == "cache"


@declare(makes="frozen DINOv2 tokens for the alignment block", counts="images", rows_are="images",
         contract=FEATURE_CACHE, full_dag=True)
class FeaturesFmbseg(StageWrapper):
    """All shards of the FMbSeg feature cache (DINOv2 tokens, aspect kept)."""

    shard_task = FeaturesShard

    def requires(self) -> list[ShardTask]:
        return [FeaturesShard(purpose="fmbseg", shard=i, **self.common()) for i in range(self.shard_count)]


UseText = declare(stage_wrapper(UseTextShard), makes="CLIP text embeddings of every segment phrase and expression",
                  counts="texts", rows_are="texts", contract=TEXT_EMBEDDINGS, full_dag=True)
TextClasses = declare(TextClasses, makes="CLIP text embeddings of the vocabulary's classes", counts="classes",
                      rows_are="classes", contract=TEXT_EMBEDDINGS, full_dag=True)
