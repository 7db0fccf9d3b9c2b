"""Images in object storage: ``s3://bucket/key`` (and, where ``[ingest] allow_urls`` says so, ``http(s)://`` list
entries) read through fsspec (s3fs), as ``pipeline.core.sources`` reads local and mounted files.

Only inputs are remote: the artifact store stays on a POSIX file system (atomic rename, O_EXCL locks), which object
storage does not offer. fsspec and s3fs are imported when a remote source is first used, never on the command
line's fast paths.

Errors are sorted in two: an object that is not there or may not be read (``FileNotFoundError``,
``PermissionError``) is the entry's fault: an ``OSError``, so it becomes a reject row naming the URL, like a missing
local file. Anything else (connection refused, timeouts, 5xx) is the store's: retried ``[storage] retries`` times,
``retry_seconds`` apart (doubling), then ``StorageUnavailable`` — not an ``OSError`` — fails the shard or the plan
without committing anything, so a rerun finishes it once the store is back.
"""

from __future__ import annotations

import errno
import functools
import re
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

from pseudoseg.pipeline.core.params import StorageParams

REMOTE_SCHEMES = ("s3",)  # listed like folders, read by default
URL_SCHEMES = ("http", "https")  # list entries only, read only where [ingest] allow_urls = true
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
T = TypeVar("T")


class StorageUnavailable(RuntimeError):
    """The store could not be reached after the retries: not the entry's fault, so no reject row is written (the
    shard fails; a rerun reads it)."""


def scheme(text: str) -> str | None:
    """The lower-case URL scheme of ``text`` (None: a path)."""
    found = _SCHEME.match(text)
    return found.group(1).lower() if found else None


def is_remote(text: str) -> bool:
    """An object-storage location (read through fsspec)."""
    return scheme(text) in REMOTE_SCHEMES


def is_url(text: str) -> bool:
    return scheme(text) in URL_SCHEMES


def readable_scheme(text: str, allow_urls: bool) -> bool:
    return is_remote(text) or (allow_urls and is_url(text))


def missing_package() -> str | None:
    """Why object storage cannot be read here (None: it can)."""
    try:
        import s3fs  # noqa: F401
    except ImportError:
        return "reading s3:// needs s3fs: pip install 'pseudoseg[s3]'"
    return None


@functools.lru_cache(maxsize=8)
def filesystem(protocol: str, storage: StorageParams) -> Any:
    """The fsspec file system of ``protocol`` configured by ``storage`` (one per process and settings). Its own
    retries are off: ``call`` retries, bounded, and tells the entry's faults from the store's."""
    import fsspec

    if protocol == "s3":
        problem = missing_package()
        if problem:
            raise StorageUnavailable(problem)
        client: dict[str, Any] = {}
        if storage.endpoint_url:
            client["endpoint_url"] = storage.endpoint_url
        if storage.region:
            client["region_name"] = storage.region
        config = {"retries": {"max_attempts": 1}, "connect_timeout": storage.timeout_seconds,
                  "read_timeout": storage.timeout_seconds}
        fs = fsspec.filesystem("s3", client_kwargs=client, config_kwargs=config, skip_instance_cache=True,
                               use_listings_cache=False, default_block_size=storage.block_size)
        fs.retries = 1  # s3fs's own retry loop (5 by default, unbounded waits): ours instead
        return fs
    return fsspec.filesystem(protocol, skip_instance_cache=True, block_size=storage.block_size)


def _permanent(exc: BaseException) -> bool:
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


_CONFIGURATION_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "NoRegionError", "CredentialRetrievalError",
                         "InvalidConfigError", "ProfileNotFound")


def call(url: str, storage: StorageParams, action: Callable[[Any], T], what: str = "read") -> T:
    """``action(fs)`` on ``url``'s file system, retried after transient errors (``StorageParams.retries``); an
    entry's own fault (missing, forbidden) raises at once as an ``OSError`` naming ``url``; missing credentials or
    a bad profile raise ``StorageUnavailable`` at once (no retry mends them)."""
    wait = storage.retry_seconds
    for attempt in range(storage.retries + 1):
        try:
            return action(filesystem(scheme(url) or "file", storage))
        except StorageUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 — sorted below: the entry's fault, the setup's, or the store's
            if _permanent(exc):
                code = errno.ENOENT if isinstance(exc, FileNotFoundError) else errno.EACCES
                raise type(exc)(code, f"{type(exc).__name__}: {exc}" if str(exc) else "not found", url) from exc
            if type(exc).__name__ in _CONFIGURATION_ERRORS:
                raise StorageUnavailable(f"cannot {what} {url}: {type(exc).__name__}: {exc} (credentials: the AWS "
                                         "environment or profile; endpoint: [storage] endpoint_url)") from exc
            if attempt == storage.retries:
                raise StorageUnavailable(f"cannot {what} {url} after {storage.retries + 1} attempt(s): "
                                         f"{type(exc).__name__}: {exc}") from exc
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def strip_scheme(url: str) -> str:
    return url.split("://", 1)[1] if "://" in url else url


def read_bytes(url: str, storage: StorageParams) -> bytes:
    """An object's bytes, read in ``block_size`` requests (retried whole after a transient error)."""
    def read(fs: Any) -> bytes:
        parts = []
        with fs.open(url if is_url(url) else strip_scheme(url), "rb", block_size=storage.block_size,
                     cache_type="none") as fh:
            while chunk := fh.read(storage.block_size):
                parts.append(chunk)
        return b"".join(parts)

    return call(url, storage, read)


def open_object(url: str, storage: StorageParams) -> IO[bytes]:
    """A seekable file of an object, read in ``block_size`` blocks (a tar is listed and read through it without
    being held whole)."""
    return call(url, storage, lambda fs: fs.open(strip_scheme(url), "rb", block_size=storage.block_size,
                                                 cache_type="readahead"), what="open")


def list_objects(url: str, storage: StorageParams) -> dict[str, tuple[int, str]]:
    """``s3://bucket/prefix/`` → every object under it: URL → (size, ETag). A prefix that holds nothing (or a
    bucket that does not exist) raises FileNotFoundError."""
    prefix = strip_scheme(url).rstrip("/")

    def find(fs: Any) -> dict[str, Any]:
        return fs.find(prefix + "/" if "/" in prefix else prefix, detail=True)

    found = call(url, storage, find, what="list")
    protocol = scheme(url)
    return {f"{protocol}://{key}": (int(info.get("size") or 0), str(info.get("ETag", "")).strip('"'))
            for key, info in found.items() if info.get("type", "file") == "file"}


def stat_object(url: str, storage: StorageParams) -> tuple[int, str]:
    """(size, ETag) of one object (FileNotFoundError when it is not there)."""
    info = call(url, storage, lambda fs: fs.info(strip_scheme(url)), what="stat")
    return int(info.get("size") or 0), str(info.get("ETag", "")).strip('"')


def glob_objects(pattern: str, storage: StorageParams) -> list[str]:
    """URLs of the objects matching a glob pattern (``s3://bucket/shards-*.tar``), sorted."""
    protocol = scheme(pattern)
    found = call(pattern, storage, lambda fs: fs.glob(strip_scheme(pattern)), what="list")
    return sorted(f"{protocol}://{key}" for key in found)
