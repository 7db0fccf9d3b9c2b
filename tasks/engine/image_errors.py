"""Per-image errors of a shard's loop: which exceptions are one image's fault (→ reject rows for that image, the
shard goes on) and which fail the shard. Every stage that loops over images runs each image's work through
``ImageErrors``.

Policy. An exception raised while ONE image is decoded or processed becomes reject rows for that image — its
counted items: the image itself, or its captions / boxes / classes where a stage counts those — when it is
  - ``ImageRejected`` (a stored payload that does not decode, is too small, ...) → reason = its code;
  - ``ValueError``, ``RuntimeError``, ``ArithmeticError``, ``IndexError``, ``cv2.error`` (shape / size / numeric
    faults an odd image provokes in a model or in pipeline/ code) → reason ``image_error``, detail
    ``Type: message`` (the traceback goes to the log).
Everything else fails the shard (Luigi retries it; the end-of-run table reports it): programming errors
(TypeError, AttributeError, KeyError, NameError, AssertionError, ImportError, ...), OSError (I/O: transient, or the
machine's), MemoryError and (CUDA) out-of-memory, NotImplementedError, RecursionError, and this project's errors
that mean a missing model, a broken artifact or a bad setting (ModelUnavailableError, SchemaError,
AccountingError, ArtifactMismatchError, VocabularyError, CaptionFileError, JSON / Arrow errors of stored files),
though several of them subclass ValueError / RuntimeError. Last, when EVERY image of a shard (at least 2) fails
with an ``image_error``, the fault is systematic (a bug, a broken model), not the images': the shard fails with
``SystematicImageErrors``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from pseudoseg.pipeline.core.artifacts import AccountingError
from pseudoseg.pipeline.core.images import ImageRejected
from pseudoseg.pipeline.core.ingest import decode_stored, iter_ingested_samples
from pseudoseg.pipeline.core.vocabularies import VocabularyError
from pseudoseg.pipeline.use.captions import CaptionFileError
from pseudoseg.tasks.engine.failures import PERMANENT_ERRORS

logger = logging.getLogger("luigi-interface.pseudoseg")

IMAGE_ERROR = "image_error"


class ArtifactMismatchError(ValueError):
    """Two stored artifacts of one image disagree (e.g. a SAM embedding of another size): a broken artifact, never
    the image's fault, so it fails the shard."""


PER_IMAGE_ERRORS: tuple[type[BaseException], ...] = (ImageRejected, ValueError, RuntimeError, ArithmeticError,
                                                     IndexError, cv2.error)
SHARD_ERRORS: tuple[type[BaseException], ...] = (
    MemoryError, NotImplementedError, RecursionError, AccountingError, VocabularyError, CaptionFileError,
    ArtifactMismatchError, json.JSONDecodeError, pa.ArrowException, *PERMANENT_ERRORS,
)


def per_image_reason(exc: BaseException) -> str | None:
    """The reject reason when ``exc`` is one image's fault; None when it must fail the shard (module docstring)."""
    if isinstance(exc, ImageRejected):
        return exc.code
    torch = sys.modules.get("torch")
    if isinstance(exc, SHARD_ERRORS) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return None
    return IMAGE_ERROR if isinstance(exc, PER_IMAGE_ERRORS) else None


def is_per_image_error(exc: BaseException) -> bool:
    """Whether ``exc`` is one image's fault (``per_image_reason``): e.g. a batch that raised it is redone alone."""
    return per_image_reason(exc) is not None


class SystematicImageErrors(RuntimeError):
    """Every image of a shard failed: not bad images but a bug or a broken model. The shard fails."""


REJECTED = object()  # what ImageErrors.run returns for an image it turned into reject rows


class ImageErrors:
    """One shard loop's per-image error handling: ``run`` (one image's work) and ``images`` (decode each stored
    image) turn a per-image error (``per_image_reason``) into ``reject`` rows, appended to ``rejects``, for every
    item ``counted_items(image_id)`` names (the REJECTS ``source`` values the stage counts in ``in_count`` for that
    image), and re-raise anything else. Use as a context manager: leaving it checks the every-image-failed rule.

    Do an image's work inside ``run`` and append its rows after it returned: rows of a failed image never land."""

    def __init__(self, stage: str, rejects: list[dict[str, str]],
                 counted_items: Callable[[str], Sequence[str]]) -> None:
        self.stage, self.rejects, self.counted_items = stage, rejects, counted_items
        self.attempted: set[str] = set()
        self.failed: dict[str, BaseException] = {}  # image_error failures (not ImageRejected) by image id

    def run(self, image_id: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or REJECTED when it raised a per-image error (rows already in ``rejects``)."""
        self.attempted.add(image_id)
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            reason = per_image_reason(exc)
            if reason is None:
                raise
            self._reject(image_id, reason, exc)
            return REJECTED

    def run_batch(self, ids: Sequence[str], batch_fn: Callable[[], list[Any]],
                  one_fn: Callable[[int], Any]) -> list[Any]:
        """``batch_fn()`` (one result per id); when it raises a per-image error, which image is to blame is
        unknown, so each is redone alone with ``one_fn(index)`` under ``run`` (REJECTED where that fails too)."""
        self.attempted.update(ids)
        try:
            return list(batch_fn())
        except Exception as exc:
            reason = per_image_reason(exc)
            if reason is None:
                raise
            if len(ids) == 1:
                self._reject(ids[0], reason, exc)
                return [REJECTED]
            logger.warning("%s: a batch of %d images failed (%s); redoing them one by one", self.stage, len(ids),
                           _error_text(exc))
        return [self.run(image_id, one_fn, i) for i, image_id in enumerate(ids)]

    def sample_of(self, image_id: str, outcome: Any, reason: str, detail: str) -> Any:
        """The (sample, record) an image's serialiser made behind the model loop (``outcome.get()``), or None when
        the image was rejected: its serialiser raised a per-image error, or returned None (non-finite model
        output: one ``reason`` row per counted item, with ``detail``)."""
        result = self.run(image_id, outcome.get)
        if result is REJECTED:
            return None
        if result is None:
            self.rejects.extend({"image_id": image_id, "source": item, "stage": self.stage, "reason": reason,
                                 "detail": detail} for item in self.counted_items(image_id))
        return result

    def write_sample(self, image_id: str, outcome: Any, tar: Any, rows: list[dict[str, Any]], reason: str,
                     detail: str) -> None:
        """The delivery of a stage that writes one tar sample and one row per image: ``sample_of`` the image's
        outcome, written to ``tar`` and ``rows`` unless the image was rejected."""
        result = self.sample_of(image_id, outcome, reason, detail)
        if result is not None:
            tar.write(result[0])
            rows.append(result[1])

    def collect(self, image_id: str, outcome: Any, rows: list[dict[str, Any]]) -> None:
        """Append the (rows, reject rows) an image's work made behind the model loop (``outcome.get()``) to
        ``rows`` and ``rejects``, unless that work raised a per-image error (then its reject rows are there)."""
        result = self.run(image_id, outcome.get)
        if result is not REJECTED:
            rows.extend(result[0])
            self.rejects.extend(result[1])

    def images(self, tar_path: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        """(image_id, rgb uint8 [H, W, 3], meta) of an ingest shard tar in manifest order, each decoded under
        ``run``; an image that does not decode becomes reject rows and is skipped."""
        for image_id, data, meta in iter_ingested_samples(tar_path):
            rgb = self.run(image_id, decode_stored, data)
            if rgb is not REJECTED:
                yield image_id, rgb, meta

    def _reject(self, image_id: str, reason: str, exc: BaseException) -> None:
        detail = exc.detail if isinstance(exc, ImageRejected) else _error_text(exc)
        items = list(self.counted_items(image_id))
        logger.warning("%s: image %s rejected as %s (%d rows): %s", self.stage, image_id, reason, len(items),
                       detail, exc_info=reason == IMAGE_ERROR)
        self.rejects.extend({"image_id": image_id, "source": item, "stage": self.stage, "reason": reason,
                             "detail": detail} for item in items)
        if reason == IMAGE_ERROR:
            self.failed[image_id] = exc

    def __enter__(self) -> ImageErrors:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None and len(self.attempted) >= 2 and set(self.failed) == self.attempted:
            first = next(iter(self.failed.values()))
            raise SystematicImageErrors(f"{self.stage}: all {len(self.attempted)} images of the shard failed "
                                        f"(first: {_error_text(first)}): a bug or a broken model, not bad "
                                        "images") from first


def _error_text(exc: BaseException) -> str:
    """``Type: message`` for a reject detail: one line, no object addresses (reruns stay byte-identical), short."""
    msg = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc)).strip().replace("\n", " ")
    msg = msg.encode("utf-8", "backslashreplace").decode("utf-8")
    return (f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__)[:300]
