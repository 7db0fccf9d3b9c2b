"""Content-addressed, atomic shard artifacts.

Layout (version ``LAYOUT``; every path comes from :class:`StageDir`) — one glob is one table::

    <root>/<dataset>/<stage>/<params-hash>/shard-NNNNNN.parquet          the stage's rows (only these match shard-*.parquet)
    <root>/<dataset>/<stage>/<params-hash>/shard-NNNNNN.tar              WebDataset payloads (other suffixes: .text.npy, ...)
    <root>/<dataset>/<stage>/<params-hash>/_rejects/shard-NNNNNN.parquet bad records
    <root>/<dataset>/<stage>/<params-hash>/_meta/shard-NNNNNN.done.json  the unit's record (written last)
    <root>/<dataset>/<stage>/<params-hash>/_meta/shard-NNNNNN.failed.json  the unit's last attempt failed (tasks.base)
    <root>/<dataset>/<stage>/<params-hash>/_meta/params.json             the parameters behind the hash
    <root>/<dataset>/<stage>/latest -> <params-hash>                     relative link to the last complete run's folder
    <root>/<dataset>/<stage>/LATEST                                      the same hash as one line of text

``_``-prefixed folders are metadata to pyarrow.dataset / Spark / Hive-style readers (skipped when a folder is
read), ``.``-prefixed ones (``.tmp/``, ``.quarantine/``, ``.lock-*``) are hidden from every reader.
Every file is written to a hidden temporary name in the stage's ``.tmp/`` and renamed into place, and the shard's
``done.json`` is renamed last, so a crash at any point leaves no visible artifact for that shard. The folders are
fsynced after the payload renames and again after ``done.json``: a record that was reported survives a power cut.
A record lists its files by their path relative to the hash folder (``shard-000000.parquet``,
``_rejects/shard-000000.parquet``).

``done.json`` records size and sha256 of every file; :func:`record_problems` checks a unit against it (a missing,
unreadable or inconsistent record, a missing file, a size or sha256 mismatch) and :meth:`StageDir.quarantine`
moves a bad record aside (into the hidden ``.quarantine/`` folder) so the unit counts as not done and is redone.

While units are being made, their temporaries live in the stage's hidden ``.tmp/`` folder, which therefore holds
only what is in flight (or what a killed attempt left): a commit writes its done.json there first (listing every
file it is about to rename into place) and renames it into the stage folder last. Clearing what a killed attempt
left (:meth:`StageDir.clear_unfinished`) reads ``.tmp/`` and removes names, never scanning the stage folder,
which holds every shard of the stage.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa

from pseudoseg.pipeline.core.locks import UnitLock, describe, holds, owner_token
from pseudoseg.schemas import REJECTS, SHARD_STATS, SHARD_STATS_V1, Contract, SchemaError

# The CLI routes this logger (a child of the one Luigi's worker prints through) to the terminal and the run's log.
LOG = logging.getLogger("luigi-interface.pseudoseg")

TMP_PREFIX = ".tmp-"
LOCK_PREFIX = ".lock-"  # + unit name: the unit's lock file in its stage folder
TMP_DIR = ".tmp"  # in a stage folder: temporaries of the units in flight (and hints of what a redo must remove)
QUARANTINE = ".quarantine"  # hidden: bad records and files moved aside, never read as artifacts
META_DIR = "_meta"  # in a stage folder: done.json records, failure markers, params.json (not data)
REJECTS_DIR = "_rejects"  # in a stage folder: the rejects table, one Parquet per shard
# Hashed into every stage folder name: a tree of another layout is never mixed with this one (it is stale).
# 1: everything flat in the hash folder; 2: _rejects/ + _meta/, latest link.
LAYOUT = 2
LATEST_LINK = "latest"  # relative symlink in a stage folder → the hash folder of the last complete run
LATEST_FILE = "LATEST"  # the same hash as text, for tools and file systems without links
# Suffix (what ShardOutput.files and unit_path take) → sub-folder and suffix of the file there.
_PLACES = {"rejects.parquet": (REJECTS_DIR, "parquet"), "done.json": (META_DIR, "done.json"),
           "failed.json": (META_DIR, "failed.json")}
VERIFY_MODES = ("sha256", "size", "off")
# Packages whose version can change an artifact's bytes; recorded in every done.json.
VERSIONED_PACKAGES = ("pseudoseg", "numpy", "pillow", "opencv-python", "pyarrow", "webdataset", "torch",
                      "transformers", "segment-anything", "spacy", "pycocotools")


def canonical_json(value: Any) -> str:
    """Sorted, compact JSON: the one spelling used for hashing parameters."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def params_hash(params: Mapping[str, Any], length: int = 12) -> str:
    """Hash of the content-affecting parameters (including upstream hashes), naming the output folder."""
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()[:length]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def unit_name(unit: int | str) -> str:
    """File-name stem of one committed unit: a shard number → ``shard-NNNNNN``; a name (``plan``) as is."""
    return unit if isinstance(unit, str) else shard_name(unit)


def fsync_dir(path: Path) -> None:
    """Make the renames and creations inside ``path`` durable (no-op where the file system refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. EINVAL on file systems without directory fsync
        pass
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """mkdir -p, fsyncing the parent of every folder it creates, so the folder survives a power cut too."""
    path = Path(path)
    if path.is_dir():
        return
    make_dirs(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return
    fsync_dir(path.parent)


def unit_file(folder: Path, unit: int | str, suffix: str) -> Path:
    """Where a unit's file of ``suffix`` lies in the hash folder ``folder`` (see the module docstring)."""
    sub, suffix = _PLACES.get(suffix, ("", suffix))
    return Path(folder) / sub / f"{unit_name(unit)}.{suffix}"


def record_unit_file(done: Path, suffix: str) -> Path:
    """The file of ``suffix`` of the unit whose done.json is ``done`` (e.g. its rejects beside a found record)."""
    done = Path(done)
    return unit_file(done.parent.parent, done.name.removesuffix(".done.json"), suffix)


@dataclass(frozen=True)
class StageDir:
    """One stage's output folder for one parameter set."""

    root: Path
    dataset: str
    stage: str
    params: Mapping[str, Any]

    @functools.cached_property
    def hash(self) -> str:
        return params_hash({**self.params, "_layout": LAYOUT})

    @functools.cached_property
    def stage_path(self) -> Path:
        """The stage's folder: one hash folder per parameter set, plus the ``latest`` pointer."""
        return Path(self.root) / self.dataset / self.stage

    @functools.cached_property
    def path(self) -> Path:
        return self.stage_path / self.hash

    @property
    def meta_path(self) -> Path:
        return self.path / META_DIR

    @property
    def rejects_dir(self) -> Path:
        return self.path / REJECTS_DIR

    @property
    def params_path(self) -> Path:
        return self.meta_path / "params.json"

    def shard_path(self, shard: int, suffix: str) -> Path:
        """``suffix`` without the leading dot, e.g. 'parquet', 'rejects.parquet', 'tar', 'done.json'."""
        return self.unit_path(shard, suffix)

    def unit_path(self, unit: int | str, suffix: str) -> Path:
        """File of ``suffix`` of a shard (number) or of a named unit such as the ingest ``plan``: data files are
        ``<unit>.<suffix>`` in the hash folder; rejects, records and failure markers go to their sub-folders
        (see the module docstring)."""
        return unit_file(self.path, unit, suffix)

    def unit_name_of(self, unit: int | str, suffix: str) -> str:
        """How a record names that file: its path relative to the hash folder (``_rejects/shard-000000.parquet``)."""
        return self.unit_path(unit, suffix).relative_to(self.path).as_posix()

    def rejects_path(self, shard: int) -> Path:
        return self.unit_path(shard, "rejects.parquet")

    def done_path(self, shard: int | str) -> Path:
        return self.unit_path(shard, "done.json")

    def failed_path(self, unit: int | str) -> Path:
        """Marker of a unit whose last attempt failed (written by the task, removed when the unit is done)."""
        return self.unit_path(unit, "failed.json")

    def mark_latest(self) -> None:
        """Point the stage's ``latest`` link and ``LATEST`` file at this hash folder (each replaced atomically:
        a reader sees the old or the new one). Call when every unit of the stage is done."""
        if not self.path.is_dir():
            return
        pointer, body = self.stage_path / LATEST_FILE, (self.hash + "\n").encode()
        try:
            same = pointer.read_bytes() == body
        except OSError:
            same = False
        if not same:
            atomic_write_bytes(pointer, body)
        link = self.stage_path / LATEST_LINK
        if link.is_symlink() and os.readlink(link) == self.hash:
            if not same:
                fsync_dir(self.stage_path)
            return
        tmp = self.stage_path / f"{TMP_PREFIX}{LATEST_LINK}.{_tmp_suffix()}"
        try:
            os.symlink(self.hash, tmp, target_is_directory=True)
            os.replace(tmp, link)
        except OSError:  # no symlinks here (some file systems, Windows without privilege): LATEST is enough
            tmp.unlink(missing_ok=True)
        fsync_dir(self.stage_path)

    def lock_path(self, unit: int | str) -> Path:
        """Hidden per-unit lock file (see pipeline.core.locks); never an artifact, never cleared by another run."""
        return self.path / f"{LOCK_PREFIX}{unit_name(unit)}"

    def lost_lock(self, unit: int | str) -> str | None:
        """The token of ``unit``'s lock if this process took it and it has been taken over since (this process was
        judged stale — paused past ``lock_stale_seconds`` — and another now works on the unit); else None."""
        path = self.lock_path(unit)
        token = owner_token(path)
        return token if token is not None and not holds(path) else None

    def clear_own_temporaries(self, unit: int | str, token: str) -> None:
        """Remove the temporaries of ``unit`` named by lock ``token`` (this process's), nothing else."""
        try:
            entries = list(os.scandir(self.tmp_path))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.startswith(f"{TMP_PREFIX}{unit_name(unit)}.") and tmp_owner(entry.name) == token:
                Path(entry.path).unlink(missing_ok=True)

    def write_params(self) -> None:
        """params.json: the parameters behind the hash, human-readable. Idempotent."""
        target = self.params_path
        body = (json.dumps({**self.params, "_layout": LAYOUT}, sort_keys=True, indent=2, default=str)
                + "\n").encode()
        if not target.exists() or target.read_bytes() != body:
            make_dirs(self.meta_path)
            atomic_write_bytes(target, body)
            # First commit into this folder (a TarSpool may have created it with a plain mkdir): make its entry
            # and its parents' durable before any done.json inside is reported.
            for folder in (self.meta_path, self.path, *list(self.path.parents)[:3]):
                fsync_dir(folder)

    @property
    def tmp_path(self) -> Path:
        """The stage's hidden folder of temporaries (see the module docstring)."""
        return self.path / TMP_DIR

    def begin(self, unit: int | str) -> None:
        """Before producing ``unit`` (holding its lock): temporaries of this stage's units go to ``.tmp/``."""
        self.tmp_path.mkdir(parents=True, exist_ok=True)

    def mark_stale(self, unit: int | str, names: Iterable[str] | None) -> None:
        """Record final file names of ``unit`` that must go before it is made again (None: unknown, scan)."""
        self.begin(unit)
        body = {"scan": True} if names is None else {"files": sorted(set(names))}
        (self.tmp_path / f"{TMP_PREFIX}{unit_name(unit)}.stale").write_text(json.dumps(body) + "\n")

    def clear_unfinished(self, shard: int | str) -> None:
        """Before (re)running a shard: remove what a killed attempt left behind — its temporaries in ``.tmp/``,
        and payloads renamed into place before the attempt died without its done.json — by name: the names the
        unit's done.json temporary (or a ``.stale`` hint) lists. Reads ``.tmp/`` (what is in flight), never the
        stage folder. Call it only while holding the unit's lock: a live writer's temporaries look like a dead
        one's. A process whose lock on the unit was taken over since it took it (a stale holder that resumed) clears
        only the temporaries named by its own token: the new holder's work is not its to touch."""
        if self.done_path(shard).exists():
            return
        lost = self.lost_lock(shard)
        if lost is not None:
            self.clear_own_temporaries(shard, lost)
            return
        name = unit_name(shard)
        try:
            entries = [e for e in os.scandir(self.tmp_path) if e.name.startswith(f"{TMP_PREFIX}{name}.")]
        except FileNotFoundError:
            return
        names: set[str] = set()
        scan = False
        for entry in entries:
            if entry.name.endswith(".stale") or entry.name.startswith(f"{TMP_PREFIX}{name}.done.json."):
                listed = _listed_names(Path(entry.path))
                scan = scan or listed is None
                names.update(listed or ())
        if scan:  # a garbage record was moved aside: its names are unknown, so look (rare)
            for folder in (self.path, self.rejects_dir):
                if folder.is_dir():
                    names.update(p.relative_to(self.path).as_posix() for p in folder.iterdir()
                                 if p.name.startswith(f"{name}."))
        done = self.unit_name_of(shard, "done.json")
        for n in names:
            if self._own_file(n, name) and n != done:
                (self.path / n).unlink(missing_ok=True)
        for entry in entries:
            Path(entry.path).unlink(missing_ok=True)

    def _own_file(self, rel: str, name: str) -> bool:
        """``rel`` (a name a record lists) is a file of unit ``name`` in this hash folder or one of its data
        sub-folders (never a path leading elsewhere)."""
        parts = rel.split("/")
        return (parts[-1].split(".", 1)[0] == name and ".." not in parts and "\\" not in rel
                and (len(parts) == 1 or (len(parts) == 2 and parts[0] in (REJECTS_DIR, META_DIR))))

    def quarantine(self, unit: int | str, reason: str, files: Iterable[str] = ()) -> Path:
        """Invalidate a committed unit: move its done.json (first: that alone makes it not done) and the named
        bad ``files`` into ``.quarantine/<unit>-<utc time>-<pid>/`` with ``reason.txt``. Returns that folder.
        A done.json another process already moved away is not an error."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.path / QUARANTINE / f"{unit_name(unit)}-{stamp}-{os.getpid()}"
        make_dirs(dest)
        (dest / "reason.txt").write_text(reason + "\n")  # first: a moved record always has its reason
        done, files = self.done_path(unit).name, [f for f in files if f != self.done_path(unit).name]
        moves = [(self.done_path(unit), dest / done)]
        moves += [(self.path / name, dest / name) for name in files if self._own_file(name, unit_name(unit))]
        for source, target in moves:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
            except FileNotFoundError:
                pass
        fsync_dir(dest)
        for folder in {self.meta_path, *(s.parent for s, _ in moves)}:
            fsync_dir(folder)
        # The record's other files stay until the unit is redone: clear_unfinished removes them by name.
        listed = _listed_names(dest / done)
        self.mark_stale(unit, None if listed is None else [n for n in listed if n not in files])
        return dest


def _listed_names(record: Path) -> list[str] | None:
    """File names a done.json (or its temporary, or a ``.stale`` hint) lists; None: unreadable or ``scan``."""
    try:
        body = json.loads(record.read_text())
        if body.get("scan"):
            return None
        return [f["name"] if isinstance(f, dict) else str(f) for f in body["files"]]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _tmp_suffix(owner: str | None = None) -> str:
    """pid + random: two processes (or two hosts with the same pid on a shared file system) never share one;
    prefixed by ``owner``, the token of the unit's lock, when this process took it."""
    return f"{owner + '-' if owner else ''}{os.getpid()}-{secrets.token_hex(4)}"


def tmp_owner(name: str) -> str | None:
    """The lock token a temporary's name carries (``_tmp_suffix``), None for one made without a lock."""
    parts = name.rsplit(".", 1)[-1].split("-")
    return parts[0] if len(parts) == 3 else None


def temporary_path(target: Path, tmp_dir: Path | None = None) -> Path:
    """Hidden temporary for ``target``: ``.tmp-<name>.[<lock token>-]<pid>-<random>`` in ``tmp_dir``, else in the
    folder's ``.tmp/`` where it has one (``StageDir.begin``), else beside ``target``. The lock token is that of the
    unit's lock (``.lock-<unit>`` in the stage folder) when this process took it: whose temporary it is."""
    target = Path(target)
    folder = tmp_dir if tmp_dir is not None else target.parent / TMP_DIR
    stage_folder = tmp_dir.parent if tmp_dir is not None else target.parent
    owner = owner_token(stage_folder / f"{LOCK_PREFIX}{target.name.split('.', 1)[0]}")
    name = f"{TMP_PREFIX}{target.name}.{_tmp_suffix(owner)}"
    return folder / name if folder.is_dir() else target.with_name(name)


def _write_temporary(target: Path, data: bytes, tmp_dir: Path | None = None) -> Path:
    """``data`` in an fsynced temporary for ``target`` (``temporary_path``); the caller renames it."""
    tmp = temporary_path(target, tmp_dir)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def atomic_write_bytes(target: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write to a hidden temporary (``temporary_path``), fsync, then rename: readers see all of the file or
    none of it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(_write_temporary(target, data, tmp_dir), target)


def webdataset_tar_bytes(samples: Iterable[Mapping[str, Any]]) -> bytes:
    """A WebDataset tar of ``samples`` (dicts with ``__key__`` and ``ext → bytes``), in the given order.

    webdataset's own TarWriter, with a fixed mtime so the same samples always give the same bytes."""
    buf = io.BytesIO()
    import webdataset as wds  # here: it imports torch, which a command checking its settings does not need

    with wds.TarWriter(buf, mtime=0.0, encoder=False) as writer:
        for sample in samples:
            writer.write(dict(sample))
    return buf.getvalue()


class TarSpool:
    """A WebDataset tar written sample by sample to the hidden temporary of its final path, so a shard of large
    samples (feature caches, SAM embeddings: gigabytes per 1000 images) never sits in memory. Same bytes as
    :func:`webdataset_tar_bytes` for the same samples. Use as a context manager, then put ``spool.path`` in
    ``ShardOutput.files``: :func:`commit_shard` renames it into place. On an exception the temporary is removed.
    """

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        self.path = temporary_path(self.target)
        self.count = 0

    def __enter__(self) -> TarSpool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "wb")  # noqa: SIM115 — closed in __exit__
        import webdataset as wds  # here: it imports torch (see webdataset_tar_bytes)

        self._writer = wds.TarWriter(self._fh, mtime=0.0, encoder=False)
        return self

    def write(self, sample: Mapping[str, Any]) -> None:
        self._writer.write(dict(sample))
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        if exc_type is not None:
            self.path.unlink(missing_ok=True)


def _file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return path.stat().st_size, h.hexdigest()


@functools.cache
def _package_versions() -> tuple[tuple[str, str], ...]:
    out = []
    for name in VERSIONED_PACKAGES:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, "absent"))
    return tuple(out)


# sha256 of files this process hashed, by (path, device, inode, size, mtime, ctime): a plan that every ingest shard
# verifies, or an ingest shard that ten stages read, is hashed once per process while it stays the same file.
# Committed files are only ever replaced by rename (a new inode); an in-place write changes mtime/ctime. A file
# changed within TRUST_AFTER_NS of being hashed could keep the same timestamps (coarse file-system clocks), so
# such a digest is not remembered.
_DIGESTS: dict[tuple, str] = {}
_DIGESTS_LIMIT = 65536
_VALID_RECORDS_LIMIT = 1 << 18
TRUST_AFTER_NS = 1_000_000_000


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, remembered while its stat is unchanged (see _DIGESTS)."""
    before = os.stat(path)
    key = (str(path), before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns, before.st_ctime_ns)
    digest = _DIGESTS.get(key)
    if digest is not None:
        return digest
    started = time.time_ns()
    _, digest = _file_digest(Path(path))
    if max(before.st_mtime_ns, before.st_ctime_ns) < started - TRUST_AFTER_NS:
        after = os.stat(path)
        if (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns) == key[2:]:
            if len(_DIGESTS) >= _DIGESTS_LIMIT:
                _DIGESTS.clear()
            _DIGESTS[key] = digest
    return digest


def package_versions() -> dict[str, str]:
    """Versions of VERSIONED_PACKAGES, looked up once per process (11 metadata reads ≈ 13 ms)."""
    return dict(_package_versions())


@dataclass
class ShardOutput:
    """What one shard task produced: named payloads (suffix → bytes, or the path of a finished :class:`TarSpool`
    temporary) plus its accounting."""

    files: dict[str, bytes | Path] = field(default_factory=dict)
    in_count: int = 0
    ok_count: int = 0
    rejected_count: int = 0
    rows: int | None = None  # rows of the main table (``parquet``); None: the unit has none
    reject_reasons: dict[str, int] = field(default_factory=dict)  # reason code -> rejects, from the rejects table

    def add_table(self, suffix: str, contract: Contract, table: pa.Table) -> None:
        """Serialise ``table`` as ``shard-N.<suffix>``; the main table's row count and the rejects' reason counts
        go into the record (done.json), so a summary never has to open a Parquet file."""
        self.files[suffix] = contract.to_parquet_bytes(table)
        if suffix == "parquet":
            self.rows = table.num_rows
        if contract is REJECTS:
            self.reject_reasons = dict(Counter(table.column("reason").to_pylist()))


class AccountingError(RuntimeError):
    """A shard's counts do not add up (in != ok + rejected): a bug, never written as done."""


def refuse_late_commit(stage_dir: StageDir, shard: int | str, output: ShardOutput, token: str) -> None:
    """A holder whose lock was taken over does not commit: its temporaries go (only its own), one WARNING line."""
    for data in output.files.values():
        if isinstance(data, Path):
            data.unlink(missing_ok=True)
    stage_dir.clear_own_temporaries(shard, token)
    try:
        holder = describe(UnitLock.read(stage_dir.lock_path(shard)))
    except FileNotFoundError:
        holder = "nobody now"
    LOG.warning("pseudoseg: %s %s: not committed: this process's lock on it was taken over while it worked (judged "
                "stale: no heartbeat for [pseudoseg] lock_stale_seconds); held by %s; this result is discarded, the "
                "new holder's work is left alone", stage_dir.stage,
                f"shard {shard}" if isinstance(shard, int) else shard, holder)


def commit_shard(stage_dir: StageDir, shard: int | str, output: ShardOutput, *,
                 seconds: float) -> dict[str, Any] | None:
    """Rename every payload into place, fsync the folder, then write done.json last and fsync the folder again.
    ``shard`` is a shard number, or a unit name (``"plan"``: recorded as shard -1). Returns the stats record, or
    None when this process's lock on the unit was taken over meanwhile (``refuse_late_commit``: nothing written)."""
    lost = stage_dir.lost_lock(shard)
    if lost is not None:
        refuse_late_commit(stage_dir, shard, output, lost)
        return None
    if output.in_count != output.ok_count + output.rejected_count:
        raise AccountingError(
            f"{stage_dir.stage} shard {shard}: in={output.in_count} != ok={output.ok_count} "
            f"+ rejected={output.rejected_count}"
        )
    stage_dir.write_params()
    stage_dir.begin(shard)
    files = []
    for suffix in sorted(output.files):
        data = output.files[suffix]
        num_bytes, digest = _file_digest(data) if isinstance(data, Path) else (len(data), sha256_hex(data))
        files.append({"name": stage_dir.unit_name_of(shard, suffix), "num_bytes": num_bytes, "sha256": digest})
    stats = {
        "stage": stage_dir.stage,
        "dataset": stage_dir.dataset,
        "shard": _record_shard(shard),
        "params_hash": stage_dir.hash,
        "params": {k: canonical_json(v) for k, v in sorted(stage_dir.params.items())},
        "in_count": output.in_count,
        "ok_count": output.ok_count,
        "rejected_count": output.rejected_count,
        "rows": output.rows,
        "reject_reasons": dict(sorted(output.reject_reasons.items())) if output.rejected_count else None,
        "seconds": round(float(seconds), 3),
        "versions": package_versions(),
        "files": files,
    }
    # done.json first as a temporary in .tmp/: until it is renamed into place it tells a redo (killed between
    # the renames below and that one) which payloads to remove.
    done = _write_temporary(stage_dir.done_path(shard), SHARD_STATS.to_json_bytes(stats), stage_dir.tmp_path)
    folders: dict[Path, None] = {}
    for suffix in sorted(output.files):
        data, path = output.files[suffix], stage_dir.unit_path(shard, suffix)
        if path.parent not in folders:
            make_dirs(path.parent)
            folders[path.parent] = None
        if isinstance(data, Path):  # a spooled temporary, already fsynced
            os.replace(data, path)
        else:
            atomic_write_bytes(path, data, stage_dir.tmp_path)
    for folder in folders:
        fsync_dir(folder)  # payload renames durable before done.json can name them
    lost = stage_dir.lost_lock(shard)
    if lost is not None:  # taken over during the renames: the new holder's done.json is the one to stand
        done.unlink(missing_ok=True)
        refuse_late_commit(stage_dir, shard, output, lost)
        return None
    os.replace(done, stage_dir.done_path(shard))
    fsync_dir(stage_dir.meta_path)  # the reported done.json survives a power cut
    stage_dir.failed_path(shard).unlink(missing_ok=True)  # an earlier failed attempt is history now
    return stats


def _record_shard(unit: int | str) -> int:
    return unit if isinstance(unit, int) else -1


# done.json files whose record passed its contract in this process, by stat key (as _DIGESTS; keys only, ~200
# bytes each): Luigi's completeness checks, the run and the end-of-run table each read every record, and checking
# one against its contract costs ten times reading and parsing it.
_VALID_RECORDS: set[tuple] = set()


def _stat_key(path: Path, st: os.stat_result) -> tuple:
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_shard_stats(path: Path) -> dict[str, Any]:
    """A SHARD_STATS record (``SHARD_STATS.read_json``); the contract check is skipped for a file this process
    already checked and that is unchanged since (_VALID_RECORDS)."""
    try:
        before = os.stat(path)
    except OSError:
        return _read_stats_json(path)  # raises as it always did
    key = _stat_key(path, before)
    if key in _VALID_RECORDS:
        try:
            text = Path(path).read_text()
            if _stat_key(path, os.stat(path)) == key:
                record = json.loads(text)
                record.pop("schema", None)
                return _upgraded(record)
        except (OSError, ValueError):
            pass
        _VALID_RECORDS.discard(key)
    started = time.time_ns()
    record = _read_stats_json(path)
    if max(before.st_mtime_ns, before.st_ctime_ns) < started - TRUST_AFTER_NS:
        try:
            unchanged = _stat_key(path, os.stat(path)) == key
        except OSError:
            unchanged = False
        if unchanged:
            if len(_VALID_RECORDS) >= _VALID_RECORDS_LIMIT:
                _VALID_RECORDS.clear()
            _VALID_RECORDS.add(key)
    return record


def _upgraded(record: dict[str, Any]) -> dict[str, Any]:
    """A v1 record as a current one: what v1 did not record is null (unknown)."""
    record.setdefault("rows", None)
    record.setdefault("reject_reasons", None)
    return record


def _read_stats_json(path: Path) -> dict[str, Any]:
    """A current SHARD_STATS record, or a v1 one (written before ``rows``/``reject_reasons``) upgraded."""
    try:
        return SHARD_STATS.read_json(path)
    except SchemaError as exc:
        if f"found {SHARD_STATS_V1.tag}" not in str(exc):
            raise
    return _upgraded(SHARD_STATS_V1.read_json(path))


def load_shard_stats(path: Path) -> dict[str, Any] | None:
    """The record, or None where it is missing or not a valid SHARD_STATS record (= not done)."""
    try:
        return read_shard_stats(path)
    except (SchemaError, OSError, ValueError, TypeError, AttributeError):
        return None


def read_record(stage_dir: StageDir, unit: int | str) -> dict[str, Any]:
    """The unit's done.json, checked against the contract AND against where it lies (stage, dataset, shard,
    params hash): a record copied or left from elsewhere is invalid. Raises SchemaError naming the file."""
    path = stage_dir.done_path(unit)
    try:
        record = read_shard_stats(path)
    except (OSError, ValueError, TypeError, AttributeError) as exc:  # SchemaError is a ValueError
        raise SchemaError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from exc
    expected = {"stage": stage_dir.stage, "dataset": stage_dir.dataset, "shard": _record_shard(unit),
                "params_hash": stage_dir.hash}
    wrong = {k: record.get(k) for k, v in expected.items() if record.get(k) != v}
    if wrong:
        raise SchemaError(f"{path}: record of another unit: {wrong} (expected {expected})")
    return record


def file_problems(folder: Path, record: Mapping[str, Any], mode: str) -> dict[str, str]:
    """file name → what is wrong with it against ``record``'s size (and, for mode sha256, its sha256)."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode {mode!r}: expected one of {', '.join(VERIFY_MODES)}")
    problems: dict[str, str] = {}
    if mode == "off":
        return problems
    for entry in record["files"]:
        path = Path(folder) / entry["name"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems[entry["name"]] = "missing"
            continue
        if size != entry["num_bytes"]:
            problems[entry["name"]] = f"{size} bytes, recorded {entry['num_bytes']}"
        elif mode == "sha256":
            digest = file_sha256(path)
            if digest != entry["sha256"]:
                problems[entry["name"]] = f"sha256 {digest[:12]}…, recorded {entry['sha256'][:12]}…"
    return problems


def record_problems(stage_dir: StageDir, unit: int | str, mode: str) -> dict[str, str]:
    """Everything wrong with a committed unit (file name → problem; empty = valid): no done.json, an invalid
    done.json, or files that do not match it (size always unless mode is off; sha256 in mode sha256)."""
    done = stage_dir.done_path(unit)
    if not done.exists():
        return {done.name: "missing"}
    try:
        record = read_record(stage_dir, unit)
    except SchemaError as exc:
        return {done.name: f"invalid: {str(exc).replace(str(done) + ': ', '')}"}
    return file_problems(stage_dir.path, record, mode)
