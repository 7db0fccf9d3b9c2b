"""Stage settings as frozen dataclasses: one class per stage, the one place a setting's default, type and allowed
range are written.

A stage's params object is built once from its luigi.cfg section (``tasks.stage_params``), hashed whole into the
stage's folder name and passed whole to the pipeline functions, so a setting can never change the bytes without
changing the folder. Fields are declared with ``setting`` (default + range + one line of help); a field whose value
names a side file (``file=True``) is hashed by the file's content, not its path; one naming a resource by a name or a
path (``digest=``, e.g. a vocabulary) by what the given function makes of it; a field that changes no byte of the
output (``hashed=False``: a trainer's loader workers, its checkpoint retention) is left out of the hash.

The ingest settings live here too (``[ingest]``: ``IngestPlanParams``, ``DecodeLimits``): ``pipeline.core.images``
takes its decoding defaults from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclasses.dataclass(frozen=True)
class Range:
    """ge/gt/le/lt bounds (None = open); ``text`` is how settings errors print them."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, x: float) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    @property
    def text(self) -> str:
        low = (f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None)
        high = (f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None)
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"≥ {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
        if high:
            return f"≤ {self.le:g}" if self.le is not None else f"< {self.lt:g}"
        return ""


def setting(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, choices: tuple[str, ...] = (), items: tuple[str, ...] = (), file: bool = False,
            digest: Callable[[Any], str] | None = None, optional: bool = False, hashed: bool = True,
            check: Callable[[Any], None] | None = None, help: str = "") -> Any:
    """A stage setting: its default, allowed range or choices, ``items`` (a comma list of these, possibly empty; the
    value stays a string), whether it names a side file (hashed by content), ``digest`` (the value enters the
    stage hash as ``digest(value)``: the content of what it names, e.g. a vocabulary by name or path), whether
    it may be empty (``optional``: a number in the range, or "" = "use another default"; the value stays a
    string), whether it enters the stage hash at all (``hashed=False``: it changes no byte of the output) and
    ``check``: a function of the value raising ValueError (one line) when it cannot work, run with the other
    settings checks before anything runs (e.g. a side file that does not parse)."""
    meta = {"range": Range(ge, gt, le, lt), "choices": tuple(choices), "items": tuple(items), "file": file,
            "digest": digest, "optional": optional, "hashed": hashed, "check": check, "help": help}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class StageParams:
    """Base of every stage's params. A subclass names its luigi.cfg section (``section = "use"``: a class attribute,
    not a field, so never hashed) and adds ``setting`` fields only (hashed unless ``hashed=False``)."""


# ------------------------------------------------------------------------------------------------ [ingest]
@dataclass(frozen=True)
class IngestPlanParams(StageParams):
    """The ingest plan (``tasks.ingest.PlanIngest``): shard membership of every entry."""

    section = "ingest"  # its luigi.cfg section

    shard_size: int = setting(1000, ge=1, help="images per shard: the unit of work, retry and accounting")
    # The listing's fingerprint holds what it changes (an http(s) entry read, or an unsupported_url row), and that
    # names the plan's folder: not hashed again here.
    allow_urls: bool = setting(False, hashed=False, help="read http(s):// entries of a list (default: each is an "
                                                         "unsupported_url reject row)")


@dataclass(frozen=True)
class DecodeLimits(StageParams):
    """Ingest's decoding limits (``tasks.ingest.IngestShard``; ``pipeline.core.images.decode_image``'s defaults)."""

    section = "ingest"  # its luigi.cfg section

    max_side: int = setting(2048, ge=1, help="longer side above this is downsized")
    min_side: int = setting(2, ge=1, help="shorter side below this is rejected (too_small)")
    max_pixels: int = setting(178_956_970, ge=1, help="more pixels = decompression_bomb")


# ------------------------------------------------------------------------------------------------ [storage]
@dataclass(frozen=True)
class StorageParams(StageParams):
    """``[storage]``: how object-storage inputs are reached. None of it changes a byte of the output (an object's
    content is hashed into the plan), so none of it is hashed into a stage's folder."""

    section = "storage"  # its luigi.cfg section

    endpoint_url: str = setting("", hashed=False, help="S3 endpoint of an S3-compatible store (MinIO, Ceph, ...); "
                                                       "empty: AWS_ENDPOINT_URL, else AWS's own")
    region: str = setting("", hashed=False, help="S3 region; empty: AWS_DEFAULT_REGION / the AWS config")
    retries: int = setting(3, ge=0, hashed=False, help="times a read or listing is retried after a transient error "
                                                      "(connection, timeout, 5xx) before the shard fails")
    retry_seconds: float = setting(1.0, ge=0, hashed=False, help="wait before the first retry; doubles after each")
    timeout_seconds: float = setting(30.0, gt=0, hashed=False, help="connect and read timeout of one request")
    block_size: int = setting(8388608, ge=65536, hashed=False,
                              help="bytes fetched per request when reading an object (a tar is read in blocks of "
                                   "this size, never whole)")
