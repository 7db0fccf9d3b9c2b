"""The batched image loop of the model stages, written once (``BatchedImageStage.produce``).

One shard's loop: its images decoded (and prepared) ahead (``tasks.engine.throughput.decoded_images``, each image
stepping the progress), each turned into the stage's input (``image_input``, skipped when None), gathered into a
batch until ``batch_full``, the batch run through the model (``run_batch``) with ``ImageErrors.run_batch``'s
batch-then-one-image fallback, each image's result finished in the loop (``finish_image``), which may hand work to
a thread behind the loop (``LoopState.submit``, delivered in order by ``deliver``). Per-image errors become reject
rows for the image's ``counted_items``; rejects are sorted into manifest order where work behind the loop (or a batch redone
image by image) can make an image's rejects land late (``sort_rejects``).

A stage writes ``prepare`` (its models and upstream rows, in a ``LoopState``), ``run_batch`` and ``finish_image``,
and, where it needs them, the other hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from pseudoseg.pipeline.core.artifacts import ShardOutput, TarSpool
from pseudoseg.pipeline.core.overlap import Behind, Outcome
from pseudoseg.schemas import Contract
from pseudoseg.tasks.engine.base import ProgressReporter
from pseudoseg.tasks.engine.image_errors import REJECTED, ImageErrors
from pseudoseg.tasks.engine.throughput import behind, manifest_order
from pseudoseg.tasks.stages.chained import ChainedShardTask


@dataclass(kw_only=True)
class LoopState:
    """One shard's loop: what ``prepare`` read (stages subclass it with their models and upstream rows), what the
    loop collects (``rows``, ``rejects``), and the tar and the thread behind the loop while it runs."""

    sources: dict[str, str]  # image_id → source of the shard's images, in manifest order
    in_count: int  # what in/ok/rejected count, in (``counted_items`` of each image)
    total: int  # images the progress counts
    batch_size: int = 1  # images (or what ``batch_full`` counts) per ``run_batch``
    prepare_image: Callable[[np.ndarray], Any] | None = None  # runs ahead of the loop, beside the decoding
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, str]] = field(default_factory=list)
    tar: TarSpool | None = None  # set while the loop runs, for a stage that ``writes_tar``
    post: Behind | None = None  # set while the loop runs, for a stage that ``works_behind``

    def submit(self, image_id: str, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` behind the loop; the stage's ``deliver`` gets its Outcome, in submission order."""
        if self.post is None:
            raise RuntimeError("work submitted behind the loop of a stage that does not declare works_behind")
        self.post.submit(image_id, fn, *args)


S = TypeVar("S", bound=LoopState)


@dataclass
class LoopImage:
    """One image in the loop: its id, pixels, what ``prepare_image`` made of them ahead, and the stage's ``data``
    (e.g. its boxes)."""

    image_id: str
    rgb: np.ndarray | None
    prepared: Any = None
    data: Any = None


class BatchedImageStage(ChainedShardTask, Generic[S]):
    """A stage whose shard is one batched loop over its images (module docstring)."""

    contract: ClassVar[Contract]  # the rows' contract
    writes_tar: ClassVar[bool] = False  # a WebDataset tar spooled while the loop runs (``LoopState.tar``)
    works_behind: ClassVar[bool] = False  # post-processing on a thread behind the loop (``LoopState.submit``)
    sort_rejects: ClassVar[bool] = False  # rejects in manifest order of their images at the end

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        state = self.prepare()
        progress.start(state.total)
        with self.spooled(state), self.image_errors(state.rejects, partial(self.counted_items, state)) as errors, \
                self.behind_loop(state, errors):
            for image, result in self.results(state, errors, progress):
                self.finish_image(state, image, result)
        if self.sort_rejects:
            state.rejects.sort(key=manifest_order(state.sources))
        return self.shard_output(state)

    # ------------------------------------------------------------------------------------ what a stage writes
    def prepare(self) -> S:
        """The shard's models, upstream rows and counts."""
        raise NotImplementedError

    def run_batch(self, state: S, images: list[LoopImage]) -> list[Any]:
        """One result per image of a batch (a model forward)."""
        raise NotImplementedError

    def finish_image(self, state: S, image: LoopImage, result: Any) -> None:
        """What becomes of one image's result, in the loop's thread: rows and rejects, or work submitted behind."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ hooks with a default
    def counted_items(self, state: S, image_id: str) -> Sequence[str]:
        """REJECTS sources of what ``in_count`` counts of one image (its counted items): by default the image's source."""
        return [state.sources[image_id]]

    def image_input(self, state: S, image: LoopImage) -> LoopImage | None:
        """The image as the batch takes it (None: skipped), under per-image error handling."""
        return image

    def batch_full(self, state: S, batch: list[LoopImage]) -> bool:
        return len(batch) >= state.batch_size

    def parts(self, state: S, batch: list[LoopImage]) -> list[list[int]]:
        """The batch's images (indices) per ``run_batch`` call: by default all in one."""
        return [list(range(len(batch)))]

    def deliver(self, state: S, errors: ImageErrors, image_id: str, outcome: Outcome) -> None:
        """An image's work behind the loop, in order: by default its (rows, reject rows)."""
        errors.collect(image_id, outcome, state.rows)

    def shard_output(self, state: S) -> ShardOutput:
        """The shard's rows, rejects and tar (a stage writing other files overrides it)."""
        files = {"tar": state.tar.path} if state.tar is not None else {}
        return self.finish(self.contract, state.rows, state.rejects, state.in_count, **files)

    # --------------------------------------------------------------------------------------- the loop
    def loop_images(self, state: S, errors: ImageErrors, progress: ProgressReporter) -> Iterator[LoopImage]:
        """The shard's images decoded ahead, each as ``image_input`` makes it (skipped: None or rejected). (Not
        ``images``: that is a Luigi parameter.)"""
        for image_id, rgb, prepared in self.decoded(errors, progress, state.prepare_image):
            image = errors.run(image_id, self.image_input, state, LoopImage(image_id, rgb, prepared))
            if image is not None and image is not REJECTED:
                yield image

    def results(self, state: S, errors: ImageErrors,
                progress: ProgressReporter) -> Iterator[tuple[LoopImage, Any]]:
        """(image, result) of every image not rejected, in manifest order, batch after batch."""
        batch: list[LoopImage] = []
        for image in self.loop_images(state, errors, progress):
            batch.append(image)
            if self.batch_full(state, batch):
                yield from self.flush(state, errors, batch)
        yield from self.flush(state, errors, batch)

    def flush(self, state: S, errors: ImageErrors, batch: list[LoopImage]) -> Iterator[tuple[LoopImage, Any]]:
        """The batch's results (``parts`` by ``parts``, each redone image by image when it fails); empties it."""
        if not batch:
            return
        results: dict[int, Any] = {}
        for part in self.parts(state, batch):
            images = [batch[k] for k in part]
            found = errors.run_batch([image.image_id for image in images], partial(self.run_batch, state, images),
                                     partial(self.run_one, state, images))
            results.update(zip(part, found, strict=True))
        for k, image in enumerate(batch):
            if results[k] is not REJECTED:
                yield image, results[k]
        batch.clear()

    def run_one(self, state: S, images: list[LoopImage], k: int) -> Any:
        return self.run_batch(state, [images[k]])[0]

    @contextmanager
    def spooled(self, state: S) -> Iterator[None]:
        """The shard's tar while the loop runs, for a stage that ``writes_tar`` (removed on an error)."""
        if not self.writes_tar:
            yield
            return
        with self.tar_spool() as tar:
            state.tar = tar
            yield

    def behind_loop(self, state: S, errors: ImageErrors) -> Any:
        """The thread behind the loop (``[throughput]``), for a stage that ``works_behind``; drained on leaving."""
        if not self.works_behind:
            return nullcontext()
        state.post = behind(partial(self.deliver, state, errors))
        return state.post
