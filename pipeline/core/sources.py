"""Where images come from: a folder (recursive), a list file (.txt one path per line, or .parquet with a
``path`` column), or existing WebDataset tars (a .tar path, a glob, or a brace pattern like
``shards-{000..009}.tar``). Listing is cheap (names and stats only); reading bytes happens later, per shard.

Source strings: a plain file path, or ``<tar path>::<member name>`` for a tar member, always in the printable,
lossless text form of ``source_text`` (a name that is not UTF-8 — Latin-1 names from old archives — is kept, its
bytes escaped as ``\\xNN``; ``source_path`` gives the path back for reading). Entries that cannot be images are still listed, so
each becomes a reject row with a reason instead of vanishing or stopping the run (``Listing.problems``): FIFOs,
sockets and devices (``not_a_regular_file``, never opened, so a FIFO cannot hang the run) and folders that cannot be
listed (``unreadable_folder``, one row per folder).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import stat
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import pyarrow.parquet as pq

from pseudoseg.pipeline.core.artifacts import sha256_hex

# Files with these extensions are taken from folders, and so are files without any extension (decoding goes by
# content, never by name; a README among them becomes a not_an_image reject). Formats we cannot decode are still
# listed so they end up as reject rows with a reason, instead of silently disappearing.
IMAGE_EXTENSIONS = frozenset(
    "jpg jpeg jpe png webp bmp dib tif tiff gif ppm pgm pbm pnm "
    "heic heif avif jp2 j2k svg psd ico tga pcx jxl".split()
)
TAR_MEMBER_SEP = "::"
ID_LENGTH = 20  # hex chars of sha256 (80 bits) — collisions are not a practical concern at web scale


# Reject reasons found while listing or planning (the plan's ``read_error`` is "<reason>: <detail>").
UNREADABLE = "unreadable"  # the bytes cannot be read (permissions, dangling link, a directory named x.jpg, I/O)
NOT_A_REGULAR_FILE = "not_a_regular_file"  # FIFO, socket, character or block device: never opened
UNREADABLE_FOLDER = "unreadable_folder"  # a folder whose names cannot be listed: its images are unknown
PLAN_REASONS = (UNREADABLE, NOT_A_REGULAR_FILE, UNREADABLE_FOLDER)


class SourceError(ValueError):
    """The source specification itself is unusable (not a bad image: those become reject rows)."""


class NotARegularFile(OSError):
    """A FIFO, socket or device where an image file was expected; raised before the entry is opened."""


@dataclass(frozen=True)
class Listing:
    """Sorted entries of a source plus a fingerprint of names, sizes and mtimes (changes → new plan).

    ``problems``: entry → "<reason>: <detail>" for entries known bad without reading them (a FIFO, an unreadable
    folder); they are in ``entries`` too, so each gets its place, shard and reject row."""

    spec: str
    entries: tuple[str, ...]
    fingerprint: str
    problems: Mapping[str, str] = field(default_factory=dict)


def source_text(path: str) -> str:
    """The printable, lossless text of a path as Python's os functions give it (undecodable bytes of the name held as
    lone surrogates, PEP 383): unchanged when it is valid UTF-8 without a backslash (every usual name); otherwise each
    backslash is written ``\\\\`` and each byte that is not UTF-8 ``\\xNN``, so every Parquet/JSON writer takes it
    and ``source_path`` maps it back to the same bytes."""
    if "\\" not in path:
        try:
            path.encode("utf-8")
            return path
        except UnicodeEncodeError:
            pass
    out = []
    for ch in os.fsencode(path).decode("utf-8", "surrogateescape"):
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def source_path(text: str) -> str:
    """The path (for open/stat) of a ``source_text``; the inverse of ``source_text``."""
    if "\\" not in text:
        return text
    raw, pos = bytearray(), 0
    for m in _ESCAPE.finditer(text):
        raw += text[pos:m.start()].encode("utf-8")
        raw += b"\\" if m.group(1) == "\\" else bytes([int(m.group(1)[1:], 16)])
        pos = m.end()
    raw += text[pos:].encode("utf-8")
    return os.fsdecode(bytes(raw))


def plan_reject(read_error: str) -> tuple[str, str]:
    """(reason, detail) of a plan's ``read_error``; plans written before reasons were recorded hold only a detail
    (their reason: unreadable)."""
    reason, sep, detail = read_error.partition(": ")
    return (reason, detail) if sep and reason in PLAN_REASONS else (UNREADABLE, read_error)


def _safe(text: str) -> str:
    """An error message as valid UTF-8 (a message may quote a non-UTF-8 path)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_image_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def _is_listed_name(name: str) -> bool:
    """Image extensions, and no extension at all (decoded by content)."""
    return not name.startswith(".") and (_is_image_name(name) or "." not in name)


def _special_kind(mode: int) -> str | None:
    """What a stat mode is when it is neither a regular file nor a directory."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "a special file"


def _stat_token(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError as exc:  # dangling symlink etc.: still listed, rejected later as unreadable
        return f"error:{exc.errno}"


def _sorted_with_stats(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """(sorted source texts, "<text>|<size:mtime>" in the same order) of file-system paths."""
    pairs = sorted((source_text(p), p) for p in paths)
    return [t for t, _ in pairs], [f"{t}|{_stat_token(p)}" for t, p in pairs]


def _walk_folder(root: str) -> tuple[list[str], dict[str, str]]:
    """(paths, problems) of a folder tree: files with an image extension or none, hidden names skipped, symlinked
    folders not entered (a folder named like an image is listed: it is rejected as unreadable). Every entry's kind
    comes from its directory entry and ``stat`` — nothing is opened — so FIFOs and devices are found without
    blocking. A folder that cannot be listed becomes a problem instead of silently losing its images."""
    paths: list[str] = []
    problems: dict[str, str] = {}
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                children = list(it)
        except OSError as exc:
            problems[folder] = (f"{UNREADABLE_FOLDER}: cannot list folder {source_text(folder)}: "
                                f"{type(exc).__name__}: {_safe(exc.strerror or str(exc))}")
            paths.append(folder)
            continue
        for child in children:
            if child.name.startswith("."):
                continue
            try:
                is_folder, is_linked_folder = child.is_dir(follow_symlinks=False), child.is_dir()
            except OSError:  # cannot tell: listed when the name fits, rejected as unreadable when read
                is_folder = is_linked_folder = False
            if is_folder:
                pending.append(child.path)
            if is_linked_folder:  # a folder named like an image is listed (rejected as unreadable); links not entered
                if _is_image_name(child.name):
                    paths.append(child.path)
                continue
            if not _is_listed_name(child.name):
                continue
            paths.append(child.path)
            try:
                if child.is_file():
                    continue
                kind = _special_kind(child.stat().st_mode)  # follows a symlink, never opens
            except OSError:
                continue  # dangling symlink: rejected as unreadable when read
            if kind is not None:
                problems[child.path] = f"{NOT_A_REGULAR_FILE}: {kind}, not opened"
    return list(dict.fromkeys(paths)), problems  # an unlistable folder named x.jpg: once, as unreadable_folder


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
    problems: dict[str, str] = {}
    if path.is_dir():
        paths, found = _walk_folder(str(path))
        entries, stats = _sorted_with_stats(paths)
        problems = {source_text(p): problem for p, problem in found.items()}
    elif spec.endswith(".tar") or "{" in spec or glob.has_magic(spec):
        entries, stats = [], []
        for tar_path in _tar_paths(spec):
            tar_text = source_text(tar_path)
            stats.append(f"{tar_text}|{_stat_token(tar_path)}")
            entries.extend(f"{tar_text}{TAR_MEMBER_SEP}{source_text(m)}" for m in _tar_members(tar_path))
    elif path.is_file() and path.suffix in (".txt", ".lst", ".parquet"):
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            column = "path" if "path" in table.column_names else "source"
            if column not in table.column_names:
                raise SourceError(f"{path}: a path list in Parquet needs a 'path' column")
            # a 'source' column is ours (a manifest, a plan): its values are source_text
            unescape = source_path if column == "source" else str
            lines = [unescape(str(p)) for p in table.column(column).to_pylist() if p]
        else:  # one path per line, in the file system's encoding (a non-UTF-8 name is kept, not an error)
            lines = [os.fsdecode(ln).strip() for ln in path.read_bytes().splitlines()]
            lines = [ln for ln in lines if ln and not ln.startswith("#")]
        base = path.parent
        entries, stats = _sorted_with_stats([str(p if os.path.isabs(p) else base / p) for p in lines])
    else:
        raise SourceError(
            f"image source {spec!r} is neither a folder, a .txt/.lst/.parquet list, nor WebDataset .tar shards"
        )
    marks = [f"{e}|{problems[e]}" for e in entries if e in problems]  # none in a healthy folder: same as before
    text = "\n".join([source_text(spec), *stats, *entries, *marks])
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    return Listing(spec=spec, entries=tuple(entries), fingerprint=fingerprint, problems=problems)


def num_shards(num_entries: int, shard_size: int) -> int:
    return max(1, -(-num_entries // shard_size))


class EntryReader:
    """Reads the bytes of entries; keeps tar files open while a shard is being read."""

    def __init__(self) -> None:
        self._tars: dict[str, tarfile.TarFile] = {}

    def read(self, source: str) -> bytes:
        """Bytes of one entry (a source string, see ``source_text``); OSError (NotARegularFile for a FIFO, socket
        or device, never opened) or tarfile.TarError when it cannot be read."""
        if TAR_MEMBER_SEP in source:
            tar_text, member_text = source.split(TAR_MEMBER_SEP, 1)
            tar_path, member = source_path(tar_text), source_path(member_text)
            tar = self._tars.get(tar_path)
            if tar is None:
                tar = self._tars[tar_path] = tarfile.open(tar_path)
            fh = tar.extractfile(member)
            if fh is None:
                raise OSError(f"tar member {member_text} is not a regular file")
            return fh.read()
        return read_regular_file(source_path(source))

    def close(self) -> None:
        for tar in self._tars.values():
            tar.close()
        self._tars.clear()

    def __enter__(self) -> EntryReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_regular_file(path: str) -> bytes:
    """The bytes of a regular file. A FIFO, socket or device raises NotARegularFile before it is opened (``stat``
    follows symlinks); the open itself is non-blocking, so a file swapped for a FIFO after the check cannot hang
    the run either. A directory raises IsADirectoryError, as ``open`` does."""
    kind = _special_kind(os.stat(path).st_mode)
    if kind is not None:
        raise NotARegularFile(f"{kind}, not opened")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as fh:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        kind = _special_kind(mode)
        if kind is not None:
            raise NotARegularFile(f"{kind}, not read")
        return fh.read()


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


def read_error_text(exc: BaseException) -> str:
    """``"<reason>: <detail>"`` of an entry that could not be read (a plan's ``read_error``)."""
    if isinstance(exc, NotARegularFile):
        return f"{NOT_A_REGULAR_FILE}: {_safe(str(exc))}"
    return f"{UNREADABLE}: {type(exc).__name__}: {_safe(str(exc))}"


def _hash_entry(reader: EntryReader, source: str) -> tuple[str, int, str | None]:
    try:
        data = reader.read(source)
    except (OSError, tarfile.TarError) as exc:
        return "", 0, read_error_text(exc)
    return sha256_hex(data), len(data), None


def plan_entries(entries: Sequence[str], shard_size: int, *, threads: int = 8,
                 problems: Mapping[str, str] | None = None) -> Iterator[PlannedEntry]:
    """Hash every entry and assign shards by sorted position; the first of identical contents wins. Entries in
    ``problems`` (``Listing.problems``) are not read: their problem is their ``read_error``."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    problems = problems or {}
    with EntryReader() as tar_reader, ThreadPoolExecutor(threads) as pool:
        # Tar members share one open TarFile, which is not thread-safe: read those serially.
        def work(src: str) -> tuple[str, int, str | None]:
            if src in problems:
                return "", 0, problems[src]
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
