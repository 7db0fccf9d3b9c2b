"""Shared SAM image embeddings: one Luigi task per shard encodes every ingested image once; the SAM stages of both
branches (USE ``UseBoxMasksShard``, FMbSeg ``FmbsegQueryMasksShard`` and ``FmbsegAutoMasksShard``) read the stored
embedding instead of running SAM's image encoder again (``[sam_embeddings] share``; off = each stage encodes).

Disk: float16 [1, 256, 64, 64] = 2 MiB per image (≈236 GB for COCO's 118k images; float32 doubles it). Precision:
float16 keeps ~3 significant digits, finer than the bf16 autocast SAM runs in on a GPU; on a CPU (float32) masks
can differ from an unshared run by pixels whose logit is within ~1e-3 of the threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from pseudoseg.models.registry import load_role, model_identity
from pseudoseg.models.roles import SamImageEmbedding
from pseudoseg.pipeline.core.artifacts import ShardOutput
from pseudoseg.pipeline.core.overlap import HostCopy, Outcome
from pseudoseg.pipeline.features.params import SamEmbeddingsParams, SamSharingParams
from pseudoseg.pipeline.features.sam_embeddings import ForwardLookup, embedding_sample, iter_sam_embeddings
from pseudoseg.schemas.features import SAM_EMBEDDINGS
from pseudoseg.tasks.engine.base import (
    ProgressReporter,
    ShardTask,
    model_settings,
    reject,
    stage_params,
    stage_wrapper,
)
from pseudoseg.tasks.engine.image_errors import REJECTED, ArtifactMismatchError
from pseudoseg.tasks.engine.throughput import behind, manifest_order, read_ahead
from pseudoseg.tasks.stages.catalog import declare
from pseudoseg.tasks.stages.chained import ChainedShardTask


def sam_sharing() -> SamSharingParams:
    """``[sam_embeddings] share``: whether the SAM stages read the stored embeddings (read once per settings state)."""
    return stage_params(SamSharingParams)


class SamEmbeddingsShard(ChainedShardTask):
    """SAM's image-encoder output for every image of the shard (``sam.npy`` in a WebDataset tar, spooled)."""

    stage = "sam_embeddings"
    params_type, roles = SamEmbeddingsParams, ("segmenter",)

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        """Images decoded and resized ahead (``[throughput]``), ``[sam_embeddings] batch_size`` per encoder forward,
        the features copied to the host, checked and serialised behind the loop; tar members and rows in manifest
        order."""
        segmenter = load_role("segmenter", model_settings())
        identity, cfg = model_identity("segmenter", model_settings()), self.params
        sources = self.sources()
        progress.start(len(sources))
        rows, rejects = [], []
        batch: list[tuple[str, np.ndarray, Any]] = []

        def serialise(image_id: str, embedding: SamImageEmbedding, features: HostCopy) -> tuple[dict, dict] | None:
            array = features.numpy()
            if not np.isfinite(array).all():
                return None
            sample, record = embedding_sample(image_id, array, embedding.original_size,
                                              embedding.input_size, identity, cfg)
            SAM_EMBEDDINGS.table([record])  # the sample's JSON obeys the contract too
            return sample, record

        def deliver(image_id: str, outcome: Outcome) -> None:
            errors.write_sample(image_id, outcome, tar, rows, "nonfinite_embedding", "SAM's image encoder returned NaN/inf")

        def flush() -> None:
            if not batch:
                return
            embeddings = errors.run_batch(
                [image_id for image_id, _, _ in batch],
                lambda: segmenter.embed_batch([rgb for _, rgb, _ in batch], [p for _, _, p in batch]),
                lambda k: segmenter.embed_batch([batch[k][1]], [batch[k][2]])[0])
            for (image_id, _, _), embedding in zip(batch, embeddings, strict=True):
                if embedding is not REJECTED:
                    post.submit(image_id, serialise, image_id, embedding, HostCopy(embedding.features.float()))
            batch.clear()

        with self.tar_spool() as tar, self.image_errors(rejects) as errors, behind(deliver) as post:
            for image_id, rgb, prepared in self.decoded(errors, progress, segmenter.prepare):
                batch.append((image_id, rgb, prepared))
                if len(batch) >= cfg.batch_size:
                    flush()
            flush()
        rejects.sort(key=manifest_order(sources))
        return self.finish(SAM_EMBEDDINGS, rows, rejects, len(sources), tar=tar.path)


SamEmbeddings = declare(stage_wrapper(SamEmbeddingsShard),
                        makes="SAM image encoding per image, shared by the USE and FMbSeg SAM stages",
                        counts="images", rows_are="embeddings", contract=SAM_EMBEDDINGS)


EmbedFn = Callable[[str, np.ndarray], SamImageEmbedding | None]


class UsesSamEmbeddings(ChainedShardTask):
    """Base of the SAM stages: requires the shard's ``SamEmbeddingsShard`` when sharing is on (its hash then enters
    this stage's hash) and hands out embeddings by image id."""

    def requires(self) -> dict[str, ShardTask]:
        deps = super().requires()
        if sam_sharing().share:
            deps["sam"] = SamEmbeddingsShard(shard=self.shard, **self.common())
        return deps

    def no_embedding_rejects(self, image_id: str, units: Iterable[str]) -> list[dict[str, str]]:
        """The reject rows of an image the embedding stage rejected: one per unit of this stage's input."""
        return [reject(image_id, unit, self.stage, NO_EMBEDDING, NO_EMBEDDING_DETAIL) for unit in units]

    def sam_embedder(self, segmenter) -> EmbedFn:
        """(image_id, rgb) → the image's SAM embedding: the stored one (None if the embedding stage rejected the
        image), or ``segmenter.embed(rgb)`` when sharing is off. Ask in manifest order (the stored order)."""
        if not sam_sharing().share:
            return lambda image_id, rgb: segmenter.embed(rgb)
        stored = {r["image_id"] for r in self.read("sam", SAM_EMBEDDINGS)}
        lookup = ForwardLookup(read_ahead(iter_sam_embeddings(self.path("sam", "tar"))))

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
