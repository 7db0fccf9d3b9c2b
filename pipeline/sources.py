"""Where images come from: a folder (recursive), a list file (.txt one path per line, or .parquet with a
``path`` column), or existing WebDataset tars (a .tar path, a glob, or a brace pattern like
``shards-{000..009}.tar``). Listing is cheap (names and stats only); reading bytes happens later, per shard.

Source strings: a plain file path, or ``<tar path>::<member name>`` for a tar member.
"""

from __future__ import annotations

import glob
import hashlib
import os
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import pyarrow.parquet as pq

from pipeline.artifacts import sha256_hex

# Files with these extensions are taken from folders. Formats we cannot decode are still listed so they end up
# as reject rows with a reason, instead of silently disappearing.
IMAGE_EXTENSIONS = frozenset(
    "jpg jpeg jpe png webp bmp dib tif tiff gif ppm pgm pbm pnm "
    "heic heif avif jp2 j2k svg psd ico tga pcx jxl".split()
)
TAR_MEMBER_SEP = "::"
ID_LENGTH = 20  # hex chars of sha256 (80 bits) — collisions are not a practical concern at web scale


class SourceError(ValueError):
    """The source specification itself is unusable (not a bad image: those become reject rows)."""


@dataclass(frozen=True)
class Listing:
    """Sorted entries of a source plus a fingerprint of names, sizes and mtimes (changes → new plan)."""

    spec: str
    entries: tuple[str, ...]
    fingerprint: str


def _is_image_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def _stat_token(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError as exc:  # dangling symlink etc.: still listed, rejected later as unreadable
        return f"error:{exc.errno}"


def _tar_paths(spec: str) -> list[str]:
    paths: list[str] = []
    for pattern in braceexpand.braceexpand(spec):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        paths.extend(matches)
    if not paths:
        raise SourceError(f"no tar files match {spec!r}")
    return paths


def _tar_members(tar_path: str) -> list[str]:
    """One image per WebDataset key: the first member (in tar order) whose extension is an image type."""
    try:
        with tarfile.open(tar_path) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
    except (OSError, tarfile.TarError) as exc:
        raise SourceError(f"cannot read tar {tar_path}: {exc}") from exc
    seen: set[str] = set()
    out = []
    for name in names:
        key = name.split(".", 1)[0] if "." in os.path.basename(name) else name
        if _is_image_name(name) and key not in seen:
            seen.add(key)
            out.append(name)
    return out


def list_source(spec: str | os.PathLike) -> Listing:
    """Enumerate a source deterministically. Raises SourceError when the spec itself is unusable."""
    spec = str(spec)
    path = Path(spec)
    stats: list[str] = []
    if path.is_dir():
        entries = []
        for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            # A directory that looks like an image (x.jpg/) is listed so it is rejected as unreadable.
            for name in filenames + [d for d in dirnames if _is_image_name(d)]:
                if not name.startswith(".") and _is_image_name(name):
                    entries.append(os.path.join(dirpath, name))
        entries.sort()
        stats = [f"{e}|{_stat_token(e)}" for e in entries]
    elif spec.endswith(".tar") or "{" in spec or glob.has_magic(spec):
        entries = []
        for tar_path in _tar_paths(spec):
            stats.append(f"{tar_path}|{_stat_token(tar_path)}")
            entries.extend(f"{tar_path}{TAR_MEMBER_SEP}{m}" for m in _tar_members(tar_path))
    elif path.is_file() and path.suffix in (".txt", ".lst", ".parquet"):
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            column = "path" if "path" in table.column_names else "source"
            if column not in table.column_names:
                raise SourceError(f"{path}: a path list in Parquet needs a 'path' column")
            lines = [str(p) for p in table.column(column).to_pylist() if p]
        else:
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            lines = [ln for ln in lines if ln and not ln.startswith("#")]
        base = path.parent
        entries = sorted(str(p if os.path.isabs(p) else base / p) for p in lines)
        stats = [f"{e}|{_stat_token(e)}" for e in entries]
    else:
        raise SourceError(
            f"image source {spec!r} is neither a folder, a .txt/.lst/.parquet list, nor WebDataset .tar shards"
        )
    fingerprint = hashlib.sha256("\n".join([spec, *stats, *entries]).encode()).hexdigest()[:16]
    return Listing(spec=spec, entries=tuple(entries), fingerprint=fingerprint)


def num_shards(num_entries: int, shard_size: int) -> int:
    return max(1, -(-num_entries // shard_size))


class EntryReader:
    """Reads the bytes of entries; keeps tar files open while a shard is being read."""

    def __init__(self) -> None:
        self._tars: dict[str, tarfile.TarFile] = {}

    def read(self, source: str) -> bytes:
        """Bytes of one entry; OSError (or tarfile.TarError) when it cannot be read."""
        if TAR_MEMBER_SEP in source:
            tar_path, member = source.split(TAR_MEMBER_SEP, 1)
            tar = self._tars.get(tar_path)
            if tar is None:
                tar = self._tars[tar_path] = tarfile.open(tar_path)
            fh = tar.extractfile(member)
            if fh is None:
                raise OSError(f"tar member {member} is not a regular file")
            return fh.read()
        with open(source, "rb") as fh:
            return fh.read()

    def close(self) -> None:
        for tar in self._tars.values():
            tar.close()
        self._tars.clear()

    def __enter__(self) -> EntryReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class PlannedEntry:
    position: int
    shard: int
    source: str
    image_id: str
    sha256: str
    num_bytes: int
    read_error: str | None
    duplicate_of: str | None


def unreadable_id(source: str) -> str:
    return hashlib.sha256(f"unreadable:{source}".encode()).hexdigest()[:ID_LENGTH]


def _hash_entry(reader: EntryReader, source: str) -> tuple[str, int, str | None]:
    try:
        data = reader.read(source)
    except (OSError, tarfile.TarError) as exc:
        return "", 0, f"{type(exc).__name__}: {exc}"
    return sha256_hex(data), len(data), None


def plan_entries(entries: Sequence[str], shard_size: int, *, threads: int = 8) -> Iterator[PlannedEntry]:
    """Hash every entry and assign shards by sorted position; the first of identical contents wins."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    with EntryReader() as tar_reader, ThreadPoolExecutor(threads) as pool:
        # Tar members share one open TarFile, which is not thread-safe: read those serially.
        def work(src: str) -> tuple[str, int, str | None]:
            return _hash_entry(tar_reader if TAR_MEMBER_SEP in src else EntryReader(), src)

        plain = [e for e in entries if TAR_MEMBER_SEP not in e]
        hashed = dict(zip(plain, pool.map(work, plain), strict=True))
        hashed.update({e: work(e) for e in entries if TAR_MEMBER_SEP in e})
    first_by_sha: dict[str, str] = {}
    for position, source in enumerate(entries):
        sha, size, error = hashed[source]
        duplicate_of = None
        if error is None:
            duplicate_of = first_by_sha.setdefault(sha, source)
            duplicate_of = None if duplicate_of == source else duplicate_of
        image_id = sha[:ID_LENGTH] if error is None else unreadable_id(source)
        yield PlannedEntry(position, position // shard_size, source, image_id, sha, size, error, duplicate_of)
