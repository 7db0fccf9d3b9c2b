"""The base of every stage after ingest: a shard task reading its shard of the ingest stage and of its upstream
stages. Its own module (not ``tasks.base``) because it requires ``tasks.ingest.IngestShard``, which is built on
``tasks.base``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, ClassVar

import numpy as np

from pseudoseg.pipeline.core.artifacts import ShardOutput
from pseudoseg.pipeline.core.ingest import iter_ingested_images
from pseudoseg.schemas import MANIFEST, REJECTS, Contract
from pseudoseg.tasks.engine.base import GPU, ProgressReporter, ShardTask, model_settings, uses_gpu
from pseudoseg.tasks.engine.image_errors import ImageErrors
from pseudoseg.tasks.engine.throughput import decoded_images
from pseudoseg.tasks.stages.ingest import IngestShard


class ChainedShardTask(ShardTask):
    """A stage reading its shard of the ingest stage and of the ``upstreams`` shard tasks (by name).

    The stage hash covers every upstream hash (``upstream_params``), so the DAG stays content-addressed."""

    upstreams: ClassVar[dict[str, type[ShardTask]]] = {}
    uses_model: ClassVar[bool] = True  # model stages take one unit of [resources] gpu when CUDA is used

    def requires(self) -> dict[str, ShardTask]:
        deps: dict[str, ShardTask] = {"ingest": IngestShard(shard=self.shard, **self.common())}
        deps.update({name: cls(shard=self.shard, **self.common()) for name, cls in self.upstreams.items()})
        return deps

    def upstream_params(self) -> dict[str, str]:
        return {name: task.stage_dir.hash for name, task in sorted(self.requires().items())}

    @property
    def resources(self) -> dict[str, int]:  # type: ignore[override]
        return {GPU: 1} if self.uses_model and uses_gpu(model_settings()) else {}

    def path(self, name: str, suffix: str) -> str:
        """File ``shard-N.<suffix>`` of upstream ``name`` ('ingest' or a key of ``upstreams``)."""
        return str(self.requires()[name].stage_dir.shard_path(self.shard, suffix))

    def read(self, name: str, contract: Contract) -> list[dict[str, Any]]:
        return contract.read_parquet(self.path(name, "parquet")).to_pylist()

    def sources(self) -> dict[str, str]:
        """image_id → source of every image accepted into this shard, in manifest order."""
        return {r["image_id"]: r["source"] for r in self.read("ingest", MANIFEST)}

    def ingested(self, errors: ImageErrors | None = None) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        """(image_id, rgb uint8 [H, W, 3], meta) of the shard's images; with ``errors``, an image that does not
        decode becomes reject rows and is skipped. (Not named ``images``: that is a Luigi parameter, and a method of
        the same name would hide it.)"""
        tar = self.path("ingest", "tar")
        return errors.images(tar) if errors is not None else iter(iter_ingested_images(tar))

    def decoded(self, errors: ImageErrors, progress: ProgressReporter,
                prepare: Callable[[np.ndarray], Any] | None = None) -> Iterator[tuple[str, np.ndarray, Any]]:
        """The per-shard image loop of every image stage: ``(image_id, rgb, prepare(rgb))`` of this shard's ingest
        tar, decoded (and prepared) ahead by ``tasks.throughput.decoded_images``, each image stepping ``progress``;
        an image that fails to decode becomes reject rows through ``errors``."""
        for i, item in enumerate(decoded_images(errors, self.path("ingest", "tar"), prepare)):
            progress.step(i)
            yield item

    def image_errors(self, rejects: list[dict[str, str]],
                     counted_items: Callable[[str], Sequence[str]] | None = None) -> ImageErrors:
        """Per-image error handling for this shard's loop (see ImageErrors); ``counted_items`` defaults to one reject row
        per image, with the image's source."""
        return ImageErrors(self.stage, rejects, counted_items if counted_items is not None else partial(image_source, self.sources()))

    def finish(self, contract: Contract, rows: list[dict], rejects: list[dict], in_count: int,
               **files: bytes) -> ShardOutput:
        """Rows + rejects (+ extra payloads: ``text_npy=`` → ``shard-N.text.npy``) with in = ok + rejected."""
        output = ShardOutput(in_count=in_count, ok_count=in_count - len(rejects), rejected_count=len(rejects))
        output.files.update({k.replace("_", "."): v for k, v in files.items()})
        output.add_table("parquet", contract, contract.table(rows))
        output.add_table("rejects.parquet", REJECTS, REJECTS.table(rejects))
        return output


def image_source(sources: dict[str, str], image_id: str) -> list[str]:
    """One reject row per image, with the image's source."""
    return [sources[image_id]]
