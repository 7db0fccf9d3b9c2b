"""How a model stage keeps its accelerator busy (section ``[throughput]`` of luigi.cfg): images are read and decoded
ahead of the model loop by a small thread pool, results are post-processed behind it (``pipeline.core.overlap``).
None of these settings changes a byte of any output (tests/tasks/test_throughput.py), so none is part of a stage hash.
Batch sizes, which can change float rounding, live with their stage's settings and are hashed there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import luigi
import numpy as np

from pseudoseg.pipeline.core.ingest import decode_stored, iter_ingested_samples
from pseudoseg.pipeline.core.overlap import Behind, Outcome, prefetch
from pseudoseg.tasks.engine.image_errors import REJECTED, ImageErrors
from pseudoseg.tasks.engine.params import IntParameter

T = TypeVar("T")


class throughput(luigi.Config):  # noqa: N801 — section [throughput] of luigi.cfg
    prefetch_images = IntParameter(default=8, ge=0, description="images read and decoded ahead of the model "
                                   "loop; 0 = decode in the loop")
    decode_threads = IntParameter(default=2, ge=1, description="threads decoding (and preparing) images ahead")
    post_behind = IntParameter(default=8, ge=0, description="images post-processed behind the model loop "
                               "(masks → RLE, features → float16 .npy); 0 = in the loop")
    post_threads = IntParameter(default=1, ge=1, description="threads post-processing behind the loop")


def decoded_images(errors: ImageErrors, tar_path: str, prepare: Callable[[np.ndarray], Any] | None = None
                   ) -> Iterator[tuple[str, np.ndarray, Any]]:
    """``(image_id, rgb uint8 [H, W, 3], prepared)`` for every image of an ingest shard tar, in manifest order,
    read and decoded ``[throughput] prefetch_images`` ahead by ``decode_threads`` threads; ``prepare(rgb)`` (e.g. a
    model's resize, or None) runs there too. An image whose decoding or preparation raises a per-image error becomes
    reject rows through ``errors`` (as ``ImageErrors.images``) and is skipped; anything else is raised here."""
    cfg = throughput()

    def work(sample: tuple[str, bytes, dict]) -> tuple[np.ndarray, Any]:
        rgb = decode_stored(sample[1])
        return rgb, (prepare(rgb) if prepare is not None else None)

    samples = iter_ingested_samples(tar_path)
    for (image_id, _data, _meta), outcome in prefetch(samples, work, ahead=cfg.prefetch_images,
                                                      threads=cfg.decode_threads, name="decode"):
        result = errors.run(image_id, outcome.get)
        if result is not REJECTED:
            yield image_id, result[0], result[1]


def read_ahead(stream: Iterable[T], *, name: str = "read") -> Iterator[T]:
    """The items of ``stream`` (e.g. stored embeddings or features being loaded from a tar), iterated by a background
    thread ``[throughput] prefetch_images`` items ahead of the caller; an error of the stream is raised in order."""
    for item, _ in prefetch(stream, _nothing, ahead=throughput().prefetch_images, threads=1, name=name):
        yield item


def _nothing(_item: Any) -> None:
    return None


def behind(deliver: Callable[[Any, Outcome], None], *, name: str = "post") -> Behind:
    """``pipeline.core.overlap.Behind`` with this section's depth and threads."""
    cfg = throughput()
    return Behind(deliver, depth=cfg.post_behind, threads=cfg.post_threads, name=name)


def manifest_order(sources: dict[str, str]) -> Callable[[dict[str, Any]], int]:
    """Sort key putting reject rows in manifest order of their images (a stable sort keeps each image's own order):
    with work behind the loop, an image's late rejects must not land after a later image's early ones."""
    position = {image_id: i for i, image_id in enumerate(sources)}
    return lambda row: position.get(row["image_id"], len(position))
