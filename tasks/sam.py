"""Shared SAM image embeddings: one Luigi task per shard encodes every ingested image once; the SAM stages of both
branches (USE ``BoxMaskShard``, FMbSeg ``QueryPointMaskShard`` and ``AutoMaskLabelShard``) read the stored
embedding instead of running SAM's image encoder again (``[sam_embeddings] share``; off = each stage encodes).

Disk: float16 [1, 256, 64, 64] = 2 MiB per image (≈236 GB for COCO's 118k images; float32 doubles it). Precision:
float16 keeps ~3 significant digits, finer than the bf16 autocast SAM runs in on a GPU; on a CPU (float32) masks
can differ from an unshared run by pixels whose logit is within ~1e-3 of the threshold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import luigi
import numpy as np
import torch

from models.registry import load_role
from models.roles import SamImageEmbedding
from pipeline.artifacts import ShardOutput
from pipeline.sam_embeddings import DTYPES, ForwardLookup, embedding_sample, iter_sam_embeddings
from schemas.features import SAM_EMBEDDINGS
from tasks.base import (
    ChainedShardTask,
    ProgressReporter,
    ShardTask,
    StageWrapper,
    model_identity,
    model_settings,
    reject,
)
from tasks.image_errors import REJECTED, ArtifactMismatchError


class sam_embeddings(luigi.Config):  # noqa: N801 — section [sam_embeddings] of luigi.cfg
    share = luigi.BoolParameter(default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                description="encode each image once and share it between the SAM stages")
    dtype = luigi.ChoiceParameter(choices=DTYPES, default="float16", description="stored embedding dtype")


class SamEmbedShard(ChainedShardTask):
    """SAM's image-encoder output for every image of the shard (``sam.npy`` in a WebDataset tar, spooled)."""

    stage = "sam_embeddings"

    def content_params(self) -> dict[str, Any]:
        return {**self.upstream_params(), "segmenter": model_identity("segmenter", model_settings()),
                "dtype": sam_embeddings().dtype}

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        segmenter = load_role("segmenter", model_settings())
        identity, dtype = model_identity("segmenter", model_settings()), sam_embeddings().dtype
        sources = self.sources()
        progress.start(len(sources))
        rows, rejects = [], []

        def encode(rgb: np.ndarray) -> tuple[SamImageEmbedding, np.ndarray]:
            embedding = segmenter.embed(rgb)
            return embedding, embedding.features.detach().float().cpu().numpy()

        with self.tar_spool() as tar, self.image_errors(rejects) as errors:
            for i, (image_id, rgb, _meta) in enumerate(self.ingested(errors)):
                progress.step(i)
                encoded = errors.run(image_id, encode, rgb)
                if encoded is REJECTED:
                    continue
                embedding, features = encoded
                if not np.isfinite(features).all():
                    rejects.append(reject(image_id, sources[image_id], self.stage, "nonfinite_embedding",
                                          "SAM's image encoder returned NaN/inf"))
                    continue
                sample, record = embedding_sample(image_id, features, embedding.original_size,
                                                  embedding.input_size, identity, dtype)
                SAM_EMBEDDINGS.table([record])  # the sample's JSON obeys the contract too
                tar.write(sample)
                rows.append(record)
        return self.finish(SAM_EMBEDDINGS, rows, rejects, len(sources), tar=tar.path)


class SamEmbeddings(StageWrapper):
    shard_task = SamEmbedShard


EmbedFn = Callable[[str, np.ndarray], SamImageEmbedding | None]


class UsesSamEmbeddings(ChainedShardTask):
    """Base of the SAM stages: requires the shard's ``SamEmbedShard`` when sharing is on (its hash then enters
    this stage's hash) and hands out embeddings by image id."""

    def requires(self) -> dict[str, ShardTask]:
        deps = super().requires()
        if sam_embeddings().share:
            deps["sam"] = SamEmbedShard(shard=self.shard, **self.common())
        return deps

    def sam_embedder(self, segmenter) -> EmbedFn:
        """(image_id, rgb) → the image's SAM embedding: the stored one (None if the embedding stage rejected the
        image), or ``segmenter.embed(rgb)`` when sharing is off. Ask in manifest order (the stored order)."""
        if not sam_embeddings().share:
            return lambda image_id, rgb: segmenter.embed(rgb)
        stored = {r["image_id"] for r in self.read("sam", SAM_EMBEDDINGS)}
        lookup = ForwardLookup(iter_sam_embeddings(self.path("sam", "tar")))

        def get(image_id: str, rgb: np.ndarray) -> SamImageEmbedding | None:
            if image_id not in stored:
                return None
            features, record = lookup.get(image_id)
            if (record["height"], record["width"]) != tuple(rgb.shape[:2]):
                raise ArtifactMismatchError(f"{image_id}: stored SAM embedding is of a {record['height']}x{record['width']} "
                                 f"image, the ingested image is {rgb.shape[0]}x{rgb.shape[1]}")
            return SamImageEmbedding(features=torch.from_numpy(features), original_size=(record["height"],
                                     record["width"]), input_size=(record["input_height"], record["input_width"]))

        return get


NO_EMBEDDING = "no_sam_embedding"
NO_EMBEDDING_DETAIL = "the sam_embeddings stage rejected this image (see its rejects)"
