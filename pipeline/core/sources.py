"""Where images come from: a folder (recursive), a list file (.txt one path per line, or .parquet with a
``path`` column), or existing WebDataset tars (a .tar path, a glob, or a brace pattern like
``shards-{000..009}.tar``). Listing is cheap (names and stats only); reading bytes happens later, per shard.
Each may be in object storage too (``pipeline.core.storage``): ``s3://bucket/prefix/`` is listed as a folder is
(size and ETag for the stats), ``s3://bucket/shards-{000..009}.tar`` are tars, ``s3://bucket/list.txt`` a list, and
a list's ``s3://`` entries are read (``http(s)://`` ones only with ``allow_urls``).

Source strings: a plain file path, or ``<tar path>::<member name>`` for a tar member, always in the printable,
lossless text form of ``source_text`` (a name that is not UTF-8 — Latin-1 names from old archives — is kept, its
bytes escaped as ``\\xNN``; ``source_path`` gives the path back for reading). Entries that cannot be images are still listed, so
each becomes a reject row with a reason instead of vanishing or stopping the run (``Listing.problems``): FIFOs,
sockets and devices (``not_a_regular_file``, never opened, so a FIFO cannot hang the run) and folders that cannot be
listed (``unreadable_folder``, one row per folder).

Tars follow the webdataset convention (``webdataset_key``): a sample's key is its member path without the
extensions, directories kept. Every member but a folder is an entry: the first image member of each key is read,
every other member is a reject row (``non_image_member``, ``not_a_regular_file`` for links, ``duplicate_member``),
and a tar that cannot be opened or listed to its end is one ``unreadable_tar`` row (source = the tar) while the
other tars are ingested.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
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

from pseudoseg.pipeline.core import storage as remote
from pseudoseg.pipeline.core.artifacts import sha256_hex
from pseudoseg.pipeline.core.params import StorageParams

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
UNREADABLE_TAR = "unreadable_tar"  # a tar that cannot be opened (or listed to its end): source = the tar
LINKED_FOLDER_SEEN = "linked_folder_seen"  # a link to a folder the listing already entered (a loop, a second link)
LISTED_TWICE = "listed_twice"  # a list names the same file again (after normalising the path)
UNSUPPORTED_URL = "unsupported_url"  # a list entry that is a URL of a scheme not read (http(s): unless allow_urls)
INVALID_PATH = "invalid_path"  # a list entry no file system can hold (a NUL byte)
DUPLICATE_MEMBER = "duplicate_member"  # a tar member with the webdataset key of an earlier image member
NON_IMAGE_MEMBER = "non_image_member"  # a tar member that is no image (.json, .txt, no extension): never read
PLAN_REASONS = (UNREADABLE, NOT_A_REGULAR_FILE, UNREADABLE_FOLDER, UNREADABLE_TAR, DUPLICATE_MEMBER, NON_IMAGE_MEMBER,
                LINKED_FOLDER_SEEN, LISTED_TWICE, UNSUPPORTED_URL, INVALID_PATH)


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
    """(paths, problems) of a folder tree: files with an image extension or none, hidden names skipped (a folder
    named like an image is listed: it is rejected as unreadable). Linked folders are entered too, each folder
    once: the real tree first, then each link in order; a link to a folder already entered (a loop back up the
    tree, a second link to one folder) is one ``linked_folder_seen`` row naming where its images are listed. Every
    entry's kind comes from its directory entry and ``stat`` — nothing is opened — so FIFOs and devices are found
    without blocking. A folder that cannot be listed becomes a problem instead of silently losing its images."""
    paths: list[str] = []
    problems: dict[str, str] = {}
    seen: dict[tuple[int, int], str] = {}  # (device, inode) of each folder entered → its path

    def identity(path: str, follow: bool = True) -> tuple[int, int] | None:
        try:
            st = os.stat(path, follow_symlinks=follow)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    if (root_id := identity(root)) is not None:
        seen[root_id] = root
    pending, links = [root], []
    while pending or links:
        if not pending:  # every real folder is listed: now the next linked one, unless entered already
            link = links.pop(0)
            target = identity(link)
            if target is not None and target in seen:
                paths.append(link)
                problems[link] = (f"{LINKED_FOLDER_SEEN}: a link to the folder {source_text(seen[target])}, whose "
                                  "images are listed there (not entered twice)")
                continue
            if target is not None:
                seen[target] = link
            pending.append(link)
            continue
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            problems[folder] = (f"{UNREADABLE_FOLDER}: cannot list folder {source_text(folder)}: "
                                f"{type(exc).__name__}: {_safe(exc.strerror or str(exc))}")
            paths.append(folder)
            continue
        for child in reversed(children):  # the stack pops the first name first
            if child.name.startswith("."):
                continue
            try:
                is_folder, is_linked_folder = child.is_dir(follow_symlinks=False), child.is_dir()
            except OSError:  # cannot tell: listed when the name fits, rejected as unreadable when read
                is_folder = is_linked_folder = False
            if is_folder:
                if (found := identity(child.path, follow=False)) is not None:
                    seen.setdefault(found, child.path)
                pending.append(child.path)
                if _is_image_name(child.name):  # a folder named like an image: listed, rejected as unreadable
                    paths.append(child.path)
                continue
            if is_linked_folder:
                links.append(child.path)
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


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _list_entries(lines: Sequence[str], base: Path | str, allow_urls: bool = False) -> tuple[list[str], dict[str, str]]:
    """(paths, problems) of a list's lines: each path relative to the list's folder (a list in object storage: its
    prefix), normalised (``./a.jpg`` and ``a.jpg`` are one file). A path listed again is an entry of its own,
    ``<path>#2`` (``#3``, ...), a ``listed_twice`` row; an ``s3://`` URL is read (and ``http(s)://`` where
    ``allow_urls``), any other URL is an ``unsupported_url`` row naming its scheme; a line with a NUL byte an
    ``invalid_path`` row. Every line stays an entry, so in = ok + rejected counts each."""
    paths: list[str] = []
    problems: dict[str, str] = {}
    count: dict[str, int] = {}
    for line in lines:
        if "\x00" in line:
            entry = line.replace("\x00", "\\x00")
            problems[entry] = f"{INVALID_PATH}: a path with a NUL byte (no file system holds one)"
        elif (url := _URL.match(line)) is not None and not remote.readable_scheme(line, allow_urls):
            entry = line
            why = ("is read only where [ingest] allow_urls = true" if remote.is_url(line) else "is not read")
            problems[entry] = (f"{UNSUPPORTED_URL}: {url.group(1)}:// {why}; list local or mounted paths or "
                               "s3:// objects (download or mount the files first)")
        else:
            if url is not None:
                entry = line
            elif isinstance(base, str):  # a list in object storage: its relative lines are under its prefix
                entry = line if line.startswith("/") else f"{base}/{os.path.normpath(line)}"
            else:
                entry = os.path.normpath(line if os.path.isabs(line) else base / line)
            count[entry] = count.get(entry, 0) + 1
            if count[entry] > 1:
                problems[f"{entry}#{count[entry]}"] = (f"{LISTED_TWICE}: the list names {source_text(entry)} again; "
                                                       "it is read once")
                entry = f"{entry}#{count[entry]}"
        if entry in problems and entry in paths:  # the same URL or NUL line again: still one row each
            count[entry] = count.get(entry, 1) + 1
            entry = f"{entry}#{count[entry]}"
            problems[entry] = problems[entry.rsplit("#", 1)[0]]
        paths.append(entry)
    return paths, problems


def _tar_paths(spec: str, storage: StorageParams | None = None) -> list[str]:
    paths: list[str] = []
    for pattern in braceexpand.braceexpand(spec):
        if glob.has_magic(pattern) and remote.is_remote(pattern):
            matches = remote.glob_objects(pattern, storage or StorageParams())
        else:
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        paths.extend(matches)
    if not paths:
        raise SourceError(f"no tar files match {spec!r}")
    return list(dict.fromkeys(paths))  # a tar named twice is read once


def webdataset_key(name: str) -> tuple[str, str] | None:
    """(key, extensions) of a tar member name as the webdataset convention groups members into samples: the key
    is the member's path up to the first dot of its last component — directories kept, so ``v1.0/chelsea.jpg`` is
    sample ``v1.0/chelsea`` — and the extensions are the rest (``a.seg.png`` → ``seg.png``). The ``./`` that
    ``tar -C dir .`` puts before every name is not part of the key (webdataset keeps it: ``./a``; every such name
    has it, so the samples are the same). A last component without a dot has no key (webdataset skips such
    members), nor has one starting with a dot (a hidden file: webdataset would file ``d/.x.jpg`` under the key
    ``d/``, the folder's name)."""
    while name.startswith("./"):
        name = name[2:]
    folder, slash, base = name.rpartition("/")
    stem, dot, extensions = base.partition(".")
    if not stem or not dot or not extensions:
        return None
    return f"{folder}{slash}{stem}", extensions


def tar_member_key(source: str) -> str | None:
    """The webdataset key of a tar member source ``<tar>::<member>`` (None: not a tar member, or no key)."""
    if TAR_MEMBER_SEP not in source:
        return None
    found = webdataset_key(source_path(source.split(TAR_MEMBER_SEP, 1)[1]))
    return found[0] if found else None


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link to {source_text(member.linkname)!r}"
    if member.islnk():
        return f"a hard link to {source_text(member.linkname)!r}"
    for test, kind in ((member.isfifo, "a FIFO"), (member.ischr, "a character device"),
                       (member.isblk, "a block device")):
        if test():
            return kind
    return f"of tar type {member.type!r}"


class TarIndex:
    """The members of one tar by label, in tar order: a member's label is its name, and a name that occurs again
    (``tar -r``, or two folders packed as one) gets ``#2``, ``#3``, ... so every member — the first one of a name
    included, which is the one ``tarfile.getmember`` would *not* return — can be addressed. Folders are structure,
    not members. ``error``: why the tar could not be listed to its end (the members before it are kept)."""

    def __init__(self, tar: tarfile.TarFile, path: str, storage: StorageParams | None = None) -> None:
        self.members: dict[str, tarfile.TarInfo] = {}
        self.error: str | None = None
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError) as exc:
                last = next(reversed(self.members), None)
                self.error = (f"cannot list past {f'member {last!r}' if last else 'its start'}: "
                              f"{type(exc).__name__}: {_safe(str(exc))}")
                break
            if member is None:
                break
            if member.isdir():
                continue
            label, n = member.name, 1
            while label in self.members:
                n += 1
                label = f"{member.name}#{n}"
            self.members[label] = member
        plain = isinstance(tar.fileobj, io.BufferedReader) or getattr(tar.fileobj, "fs", None) is not None
        if self.error is None and plain:  # an uncompressed tar: offsets are the file's own
            self.error = _missing_end(path, tar.offset, storage)


def open_tar(path: str, storage: StorageParams | None = None) -> tarfile.TarFile:
    """A tar opened for reading: a local file, or an object read in blocks (``storage.open_object``)."""
    if remote.is_remote(path):
        return tarfile.open(fileobj=remote.open_object(path, storage or StorageParams()), mode="r:*")
    return tarfile.open(path)


def _open_binary(path: str, storage: StorageParams | None) -> io.IOBase:
    return remote.open_object(path, storage or StorageParams()) if remote.is_remote(path) else open(path, "rb")


def _missing_end(path: str, offset: int, storage: StorageParams | None = None) -> str | None:
    """Why a tar whose listing stopped at ``offset`` may have lost members (None: it ends with the zero block that
    closes every tar, so nothing was cut off)."""
    try:
        with _open_binary(path, storage) as fh:
            fh.seek(offset)
            block = fh.read(512)
    except OSError as exc:
        return f"cannot check its end: {type(exc).__name__}: {_safe(exc.strerror or str(exc))}"
    if len(block) == 512 and not any(block):
        return None
    return (f"truncated: no end-of-archive block after byte {offset}; members after the last one listed "
            f"are lost")


def _tar_members(tar_path: str, storage: StorageParams | None = None) -> tuple[list[str], dict[str, str]]:
    """(member labels, problems by label) of one tar, by the webdataset convention: every member is listed; an
    image member (last extension an image type) with a key not seen before in this tar is ingested, every other
    member becomes a reject row — ``non_image_member`` (a sample's .json/.txt/.cls, a name without extension),
    ``not_a_regular_file`` (symbolic and hard links, devices: never followed) or ``duplicate_member`` (the key
    of an earlier image member: the first in tar order is ingested). Raises OSError / tarfile.TarError when the
    tar cannot be opened."""
    with open_tar(tar_path, storage) as tar:
        index = TarIndex(tar, tar_path, storage)
    labels: list[str] = []
    problems: dict[str, str] = {}
    first_of: dict[str, str] = {}
    for label, member in index.members.items():
        labels.append(label)
        found = webdataset_key(member.name)
        if not member.isreg():
            problems[label] = f"{NOT_A_REGULAR_FILE}: tar member is {_member_kind(member)}, not followed"
        elif found is None:
            problems[label] = (f"{NON_IMAGE_MEMBER}: no webdataset key (its name has no extension, or starts "
                               f"with '.'): not a sample member")
        elif not _is_image_name(member.name):
            problems[label] = (f"{NON_IMAGE_MEMBER}: .{found[1]} of sample {source_text(found[0])!r} is not an "
                               f"image type")
        elif found[0] in first_of:
            problems[label] = (f"{DUPLICATE_MEMBER}: webdataset key {source_text(found[0])!r} already taken by "
                               f"member {source_text(first_of[found[0]])!r} (the first in tar order is ingested)")
        else:
            first_of[found[0]] = label
    if index.error is not None:
        labels.append("")  # the tar itself
        problems[""] = f"{UNREADABLE_TAR}: {index.error}"
    return labels, problems


def _remote_stats(urls: Sequence[str], storage: StorageParams) -> list[str]:
    """"<url>|<size>:<etag>" of objects (the ETag, not the time: an object written again with the same bytes
    keeps its plan); a missing object's token says so (it is rejected as unreadable when read)."""
    def token(url: str) -> str:
        try:
            size, etag = remote.stat_object(url, storage)
        except OSError as exc:
            return f"{url}|error:{exc.errno}"
        return f"{url}|{size}:{etag}"

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(token, urls))


def _remote_kind(spec: str) -> str:
    """What an object-storage spec names: tars, a list, one image, or a prefix listed like a folder."""
    name = spec.rstrip("/").rsplit("/", 1)[-1]
    if spec.endswith(".tar") or "{" in spec or glob.has_magic(spec):
        return "tars"
    if not spec.endswith("/") and Path(name).suffix in (".txt", ".lst", ".parquet"):
        return "list"
    if not spec.endswith("/") and _is_image_name(name):
        return "image"
    return "folder"


def _list_remote_folder(spec: str, storage: StorageParams) -> tuple[list[str], list[str]]:
    """(sorted URLs, stat tokens) under a prefix, as a folder is listed: names with an image extension or none,
    no name (of the object or a folder above it) starting with '.'."""
    try:
        found = remote.list_objects(spec, storage)
    except OSError as exc:
        raise SourceError(f"cannot list {spec}: {_safe(str(exc))}") from exc
    except remote.StorageUnavailable as exc:
        raise SourceError(str(exc)) from exc
    root = spec.rstrip("/") + "/"
    urls = []
    for url in found:
        rel = url[len(root):] if url.startswith(root) else url.rsplit("/", 1)[-1]
        parts = rel.split("/")
        if any(part.startswith(".") for part in parts) or not _is_listed_name(parts[-1]):
            continue
        urls.append(url)
    urls.sort()
    return urls, [f"{url}|{found[url][0]}:{found[url][1]}" for url in urls]


def _read_list_lines(spec: str, storage: StorageParams) -> list[str]:
    """The entries of a .txt/.lst/.parquet list (a local file or an object)."""
    suffix = Path(spec.rstrip("/")).suffix
    if remote.is_remote(spec):
        try:
            data = remote.read_bytes(spec, storage)
        except (OSError, remote.StorageUnavailable) as exc:
            raise SourceError(f"cannot read the list {spec}: {_safe(str(exc))}") from exc
    else:
        data = Path(spec).read_bytes()
    if suffix == ".parquet":
        table = pq.read_table(io.BytesIO(data))
        column = "path" if "path" in table.column_names else "source"
        if column not in table.column_names:
            raise SourceError(f"{spec}: a path list in Parquet needs a 'path' column")
        # a 'source' column is ours (a manifest, a plan): its values are source_text
        unescape = source_path if column == "source" else str
        return [unescape(str(p)) for p in table.column(column).to_pylist() if p]
    # one path per line, in the file system's encoding (a non-UTF-8 name is kept, not an error)
    lines = [os.fsdecode(ln).strip() for ln in data.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _sorted_entries(paths: Sequence[str], storage: StorageParams) -> tuple[list[str], list[str]]:
    """``_sorted_with_stats`` of a list's entries, local paths and object URLs mixed."""
    urls = sorted(p for p in paths if remote.scheme(p) and not remote.is_url(p) and remote.is_remote(p))
    local = [p for p in paths if p not in set(urls)]
    entries, stats = _sorted_with_stats(local)
    if urls:
        remote_stats = dict(zip(urls, _remote_stats(urls, storage), strict=True))
        stats = dict(zip(entries, stats, strict=True)) | remote_stats
        entries = sorted([*entries, *urls])
        stats = [stats[e] for e in entries]
    return entries, stats


def list_source(spec: str | os.PathLike, *, storage: StorageParams | None = None,
                allow_urls: bool = False) -> Listing:
    """Enumerate a source deterministically. Raises SourceError when the spec itself is unusable. ``storage``:
    how ``s3://`` sources and entries are reached; ``allow_urls``: whether a list's ``http(s)://`` entries are
    read (default: ``unsupported_url`` rows)."""
    spec = str(spec)
    storage = storage or StorageParams()
    path = Path(spec)
    problems: dict[str, str] = {}
    kind = _remote_kind(spec) if remote.is_remote(spec) else None
    if kind is not None and (missing := remote.missing_package()):
        raise SourceError(f"{spec}: {missing}")
    if kind == "folder":
        entries, stats = _list_remote_folder(spec, storage)
    elif kind == "image":
        entries, stats = [spec], _remote_stats([spec], storage)
    elif path.is_dir() and kind is None:
        paths, found = _walk_folder(str(path))
        entries, stats = _sorted_with_stats(paths)
        problems = {source_text(p): problem for p, problem in found.items()}
    elif kind == "tars" or (kind is None and (spec.endswith(".tar") or "{" in spec or glob.has_magic(spec))):
        entries, stats, opened = [], [], 0
        failures: list[str] = []
        try:
            tar_paths = _tar_paths(spec, storage)
        except remote.StorageUnavailable as exc:
            raise SourceError(str(exc)) from exc
        for tar_path in tar_paths:
            tar_text = source_text(tar_path)
            stats.append(_remote_stats([tar_path], storage)[0] if kind else f"{tar_text}|{_stat_token(tar_path)}")
            try:
                labels, found = _tar_members(tar_path, storage)
            except remote.StorageUnavailable as exc:
                raise SourceError(str(exc)) from exc
            except (OSError, tarfile.TarError) as exc:  # one row for the tar; the other tars go on
                why = f"{type(exc).__name__}: {_safe(str(exc))}"
                failures.append(f"{tar_text}: {why}")
                entries.append(tar_text)
                problems[tar_text] = f"{UNREADABLE_TAR}: cannot read it: {why}"
                continue
            opened += 1
            for label in labels:  # in tar order: a shard reads its tar front to back
                source = f"{tar_text}{TAR_MEMBER_SEP}{source_text(label)}" if label else tar_text
                entries.append(source)
                if label in found:
                    problems[source] = found[label]
        if not opened:
            raise SourceError(f"no tar of {spec!r} can be read: {'; '.join(failures)}")
    elif kind is None and path.is_file() and _is_image_name(path.name):  # one image: a source of one entry
        entries, stats = _sorted_with_stats([spec])
    elif kind == "list" or (kind is None and path.is_file() and path.suffix in (".txt", ".lst", ".parquet")):
        lines = _read_list_lines(spec, storage)
        base = spec.rstrip("/").rsplit("/", 1)[0] if kind else path.parent
        paths, problems = _list_entries(lines, base, allow_urls)
        try:
            entries, stats = _sorted_entries(paths, storage)
        except remote.StorageUnavailable as exc:
            raise SourceError(str(exc)) from exc
        problems = {source_text(p): problem for p, problem in problems.items()}
    else:
        raise SourceError(
            f"image source {spec!r} is neither a folder, a .txt/.lst/.parquet list, nor WebDataset .tar shards"
        )
    marks = [f"{e}|{problems[e]}" for e in entries if e in problems]  # none in a healthy folder: same as before
    text = "\n".join([source_text(spec), *stats, *entries, *marks])
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    return Listing(spec=spec, entries=tuple(entries), fingerprint=fingerprint, problems=problems)


def source_problem(spec: str) -> str | None:
    """Why ``spec`` cannot be a source, in words, before anything is listed (None: it can): a path that does not
    exist, a tar pattern matching nothing, a file that is neither an image, a list nor a tar, a URL of a scheme
    that is not read (an ``s3://`` source is checked when it is listed: that needs the store)."""
    if remote.scheme(spec) is not None:
        if not remote.is_remote(spec):
            return (f"{spec}: {remote.scheme(spec)}:// is not a source; give a folder, a list, tars, or an s3:// "
                    "prefix, list or tars")
        return remote.missing_package()
    path = Path(spec)
    if path.is_dir():
        return None if os.access(path, os.R_OK | os.X_OK) else f"{spec}: folder not readable"
    if spec.endswith(".tar") or "{" in spec or glob.has_magic(spec):
        try:
            tars = _tar_paths(spec)
        except SourceError as exc:
            return str(exc)
        missing = [t for t in tars if not os.path.isfile(t)]
        return f"{missing[0]}: no such tar file" if len(missing) == len(tars) else None
    if not path.exists():
        return f"{spec}: no such file or folder"
    if path.is_file() and (_is_image_name(path.name) or path.suffix in (".txt", ".lst", ".parquet")):
        return None
    return (f"{spec}: not a folder, an image, a .txt/.lst/.parquet list of paths, or WebDataset .tar shards")
def relative_name(spec: str | os.PathLike, source: str) -> str:
    """An entry's path relative to the root of its source (source-text form, '/' separators): under the folder for
    a folder, the member's name for a tar member (its leading ``./`` dropped), under the list's folder for a list
    (the full path for an entry outside it). What ground truth keyed by path (COCO's ``file_name``) is matched by."""
    if TAR_MEMBER_SEP in source:
        member = source.split(TAR_MEMBER_SEP, 1)[1]
        while member.startswith("./"):
            member = member[2:]
        return member
    spec = str(spec)
    if remote.is_remote(spec):
        kind = _remote_kind(spec)
        root = spec.rstrip("/") if kind == "folder" else spec.rsplit("/", 1)[0] if kind == "list" else ""
        return source[len(root) + 1:] if root and source.startswith(root + "/") else source
    root = spec if Path(spec).is_dir() else (str(Path(spec).parent) if Path(spec).suffix in (".txt", ".lst", ".parquet")
                                             else "")
    if root:
        prefix = source_text(os.path.normpath(root)).rstrip("/") + "/"
        normalised = source_text(os.path.normpath(source_path(source)))
        if normalised.startswith(prefix):
            return normalised[len(prefix):]
    return source


def num_shards(num_entries: int, shard_size: int) -> int:
    return max(1, -(-num_entries // shard_size))


class EntryReader:
    """Reads the bytes of entries; keeps tar files open while a shard is being read. ``storage``: how ``s3://``
    (and allowed ``http(s)://``) entries are reached; an object that is not there raises an OSError naming its URL,
    a store that cannot be reached ``StorageUnavailable`` (after the retries)."""

    def __init__(self, storage: StorageParams | None = None) -> None:
        self._tars: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}
        self.storage = storage or StorageParams()

    def read(self, source: str) -> bytes:
        """Bytes of one entry (a source string, see ``source_text``); OSError (NotARegularFile for a FIFO, socket
        or device, never opened) or tarfile.TarError when it cannot be read."""
        if TAR_MEMBER_SEP in source:
            tar_text, member_text = source.split(TAR_MEMBER_SEP, 1)
            tar_path, member = source_path(tar_text), source_path(member_text)
            opened = self._tars.get(tar_path)
            if opened is None:
                tar = open_tar(tar_path, self.storage)
                opened = self._tars[tar_path] = (tar, TarIndex(tar, tar_path, self.storage).members)
            tar, members = opened
            info = members.get(member)
            if info is None:
                raise FileNotFoundError(errno.ENOENT, f"no member {member_text} in tar", tar_text)
            if not info.isreg():
                raise NotARegularFile(f"tar member {member_text} is {_member_kind(info)}, not followed")
            fh = tar.extractfile(info)
            if fh is None:
                raise OSError(f"tar member {member_text} is not a regular file")
            return fh.read()
        if remote.scheme(source) is not None:
            return remote.read_bytes(source, self.storage)
        return read_regular_file(source_path(source))

    def close(self) -> None:
        for tar, _ in self._tars.values():
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
                 problems: Mapping[str, str] | None = None,
                 storage: StorageParams | None = None) -> Iterator[PlannedEntry]:
    """Hash every entry and assign shards by sorted position; the first of identical contents wins. Entries in
    ``problems`` (``Listing.problems``) are not read: their problem is their ``read_error``. An object store that
    cannot be reached raises ``StorageUnavailable``: no plan rather than one that rejects what it could not read."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    problems = problems or {}
    with EntryReader(storage) as tar_reader, ThreadPoolExecutor(threads) as pool:
        # Tar members share one open TarFile, which is not thread-safe: read those serially.
        def work(src: str) -> tuple[str, int, str | None]:
            if src in problems:
                return "", 0, problems[src]
            return _hash_entry(tar_reader if TAR_MEMBER_SEP in src else EntryReader(storage), src)

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
