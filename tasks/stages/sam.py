"""Shared SAM image embeddings: one Luigi task per shard encodes every ingested image once; the SAM stages of both
branches (USE ``UseBoxMasksShard``, FMbSeg ``FmbsegQueryMasksShard`` and ``FmbsegAutoMasksShard``) read the stored
embedding instead of running SAM's image encoder again (``[sam_embeddings] share``; off = each stage encodes).

Disk: float16 [1, 256, 64, 64] = 2 MiB per image (≈236 GB for COCO's 118k images; float32 doubles it). Precision:
float16 keeps ~3 significant digits, finer than the bf16 autocast SAM runs in on a GPU; on a CPU (float32) masks
can differ from an unshared run by pixels whose logit is within ~1e-3 of the threshold.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from pseudoseg.models.registry import load_role, model_identity
from pseudoseg.models.roles import SamImageEmbedding, Segmenter
from pseudoseg.pipeline.core.overlap import HostCopy, Outcome
from pseudoseg.pipeline.features.params import SamEmbeddingsParams, SamSharingParams
from pseudoseg.pipeline.features.sam_embeddings import ForwardLookup, embedding_sample, iter_sam_embeddings
from pseudoseg.schemas.features import SAM_EMBEDDINGS
from pseudoseg.tasks.engine.base import (
    ShardTask,
    model_settings,
    reject,
    stage_params,
    stage_wrapper,
)
from pseudoseg.tasks.engine.image_errors import ArtifactMismatchError, ImageErrors
from pseudoseg.tasks.engine.throughput import read_ahead
from pseudoseg.tasks.stages.catalog import declare
from pseudoseg.tasks.stages.chained import ChainedShardTask
from pseudoseg.tasks.stages.loop import BatchedImageStage, LoopImage, LoopState


def sam_sharing() -> SamSharingParams:
    """``[sam_embeddings] share``: whether the SAM stages read the stored embeddings (read once per settings state)."""
    return stage_params(SamSharingParams)


@dataclass(kw_only=True)
class EmbeddingsState(LoopState):
    cfg: SamEmbeddingsParams
    segmenter: Segmenter
    identity: str  # the segmenter's model identity, recorded per embedding


class SamEmbeddingsShard(BatchedImageStage[EmbeddingsState]):
    """SAM's image-encoder output for every image of the shard (``sam.npy`` in a WebDataset tar, spooled).

    Images decoded and resized ahead (``[throughput]``), ``[sam_embeddings] batch_size`` per encoder forward, the
    features copied to the host, checked and serialised behind the loop; tar members and rows in manifest order."""

    stage = "sam_embeddings"
    contract, writes_tar, works_behind, sort_rejects = SAM_EMBEDDINGS, True, True, True
    params_type, roles = SamEmbeddingsParams, ("segmenter",)

    def prepare(self) -> EmbeddingsState:
        segmenter, sources = load_role("segmenter", model_settings()), self.sources()
        return EmbeddingsState(sources=sources, in_count=len(sources), total=len(sources),
                               batch_size=self.params.batch_size, prepare_image=segmenter.prepare, cfg=self.params,
                               segmenter=segmenter, identity=model_identity("segmenter", model_settings()))

    def run_batch(self, state: EmbeddingsState, images: list[LoopImage]) -> list[SamImageEmbedding]:
        return state.segmenter.embed_batch([image.rgb for image in images], [image.prepared for image in images])

    def finish_image(self, state: EmbeddingsState, image: LoopImage, embedding: SamImageEmbedding) -> None:
        state.submit(image.image_id, self.serialise, state, image.image_id, embedding,
                     HostCopy(embedding.features.float()))

    def serialise(self, state: EmbeddingsState, image_id: str, embedding: SamImageEmbedding,
                  features: HostCopy) -> tuple[dict, dict] | None:
        """Behind the loop: the tar sample and row (None: non-finite features)."""
        array = features.numpy()
        if not np.isfinite(array).all():
            return None
        sample, record = embedding_sample(image_id, array, embedding.original_size, embedding.input_size,
                                          state.identity, state.cfg)
        SAM_EMBEDDINGS.table([record])  # the sample's JSON obeys the contract too
        return sample, record

    def deliver(self, state: EmbeddingsState, errors: ImageErrors, image_id: str, outcome: Outcome) -> None:
        errors.write_sample(image_id, outcome, state.tar, state.rows, "nonfinite_embedding",
                            "SAM's image encoder returned NaN/inf")


SamEmbeddings = declare(stage_wrapper(SamEmbeddingsShard),
                        makes="SAM image encoding per image, shared by the USE and FMbSeg SAM stages",
                        counts="images", rows_are="embeddings", contract=SAM_EMBEDDINGS)


class SamEmbedder:
    """(image_id, rgb) → the image's SAM embedding: the stored one (None if the embedding stage rejected the image)
    when ``lookup`` reads the stored embeddings (ask in manifest order, the stored order), else
    ``segmenter.embed(rgb)``."""

    def __init__(self, segmenter: Segmenter, stored: set[str] | None = None,
                 lookup: ForwardLookup | None = None) -> None:
        self.segmenter, self.stored, self.lookup = segmenter, stored or set(), lookup

    def __call__(self, image_id: str, rgb: np.ndarray) -> SamImageEmbedding | None:
        if self.lookup is None:
            return self.segmenter.embed(rgb)
        if image_id not in self.stored:
            return None
        features, record = self.lookup.get(image_id)
        if (record["height"], record["width"]) != tuple(rgb.shape[:2]):
            raise ArtifactMismatchError(f"{image_id}: stored SAM embedding is of a {record['height']}x{record['width']} "
                             f"image, the ingested image is {rgb.shape[0]}x{rgb.shape[1]}")
        return SamImageEmbedding(features=torch.from_numpy(features), original_size=(record["height"],
                                 record["width"]), input_size=(record["input_height"], record["input_width"]))


class UsesSamEmbeddings(ChainedShardTask):
    """Base of the SAM stages: requires the shard's ``SamEmbeddingsShard`` when sharing is on (its hash then enters
    this stage's hash) and hands out embeddings by image id."""

    def requires(self) -> dict[str, ShardTask]:
        deps = super().requires()
        if sam_sharing().share:
            deps["sam"] = SamEmbeddingsShard(shard=self.shard, **self.common())
        return deps

    def no_embedding_rejects(self, image_id: str, counted_items: Iterable[str]) -> list[dict[str, str]]:
        """The reject rows of an image the embedding stage rejected: one per counted item of this stage."""
        return [reject(image_id, item, self.stage, NO_EMBEDDING, NO_EMBEDDING_DETAIL) for item in counted_items]

    def sam_embedder(self, segmenter: Segmenter) -> SamEmbedder:
        """The stored embeddings of this shard's images when sharing is on, else ``segmenter``'s encoder."""
        if not sam_sharing().share:
            return SamEmbedder(segmenter)
        stored = {r["image_id"] for r in self.read("sam", SAM_EMBEDDINGS)}
        return SamEmbedder(segmenter, stored, ForwardLookup(read_ahead(iter_sam_embeddings(self.path("sam", "tar")))))


NO_EMBEDDING = "no_sam_embedding"
NO_EMBEDDING_DETAIL = "the sam_embeddings stage rejected this image (see its rejects)"
