"""`pseudoseg status` and `pseudoseg clean --stale`: read an output tree (no Luigi scheduling), and the ``latest``
pointers a run leaves in every stage folder (``mark_latest``).

A stage folder (``<out>/<dataset>/<stage>/``) holds one hash folder per parameter set it was run with, and
``latest`` / ``LATEST`` naming the hash folder of the last run that completed the stage (pipeline.core.artifacts).
Per hash folder a unit is *done* (a valid ``_meta/<unit>.done.json`` whose files are in place at their recorded
sizes), *failed* (its last attempt left ``_meta/<unit>.failed.json`` and it is not done) or *pending* (neither;
the shard count of a stage is the plan's, recorded by every run in ``_meta/shards.json``). `status` exits 1
when a shard failed in the folder of a stage's last run (the newest ``shards.json``); failures left in folders
of earlier runs are listed, not counted.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import luigi

from pseudoseg.pipeline.core.artifacts import (
    LATEST_FILE,
    LATEST_LINK,
    META_DIR,
    REJECTS_DIR,
    StageDir,
    atomic_write_bytes,
    file_problems,
    load_shard_stats,
    unit_name,
)
from pseudoseg.pipeline.core.locks import UnitLock
from pseudoseg.pipeline.core.locks import describe as describe_holder

SHARDS_FILE = "shards.json"  # in a hash folder's _meta/: {"shards": N}, the shard count of the stage's last run

def stage_order() -> list[str]:
    """Stage folder names in DAG order (tasks.stages.catalog.outputs), the ingest plan first."""
    from pseudoseg.tasks.stages.catalog import outputs

    return ["plan", *(output.folder for output in outputs())]


# -- written by a run -----------------------------------------------------------------------------------------


def _stage_dirs(roots: Iterable[luigi.Task]) -> dict[Path, tuple[StageDir, list[luigi.Task]]]:
    from pseudoseg.tasks.report.summary import walk_dag

    found: dict[Path, tuple[StageDir, list[luigi.Task]]] = {}
    for task in walk_dag(roots):
        try:
            stage_dir = task.stage_dir
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(stage_dir, StageDir):
            found.setdefault(stage_dir.path, (stage_dir, []))[1].append(task)
    return found


def record_shard_counts(roots: Iterable[luigi.Task]) -> list[Path]:
    """Before a run: ``_meta/shards.json`` of every shard stage of the DAG (how many units make it complete).
    Returns every hash folder of the DAG (what the run reads and writes)."""
    from pseudoseg.tasks.engine.base import ShardTask

    found = _stage_dirs(roots)
    for stage_dir, tasks in found.values():
        shards = [t for t in tasks if isinstance(t, ShardTask)]
        if shards:
            body = (json.dumps({"shards": len(shards)}) + "\n").encode()
            target = stage_dir.meta_path / SHARDS_FILE
            try:
                atomic_write_bytes(target, body)
            except OSError:
                pass
    return list(found)


def settings_changes(roots: Iterable[luigi.Task]) -> list[tuple[str, list[str]]]:
    """Before a run: the stages whose folder for these settings is not the one their ``latest`` names, each with
    what differs from that folder's ``params.json`` (``key: old → new``; empty when only an upstream stage
    changed). The run moves their ``latest`` when it completes them."""
    changes = []
    for stage_dir, _ in _stage_dirs(roots).values():
        latest = latest_hash(stage_dir.path.parent)
        if latest is None or latest == stage_dir.hash:
            continue
        try:
            before = json.loads((stage_dir.path.parent / latest / META_DIR / "params.json").read_text())
        except (OSError, ValueError):
            before = {}
        now = json.loads(json.dumps(stage_dir.params, default=str))
        diffs = []
        for group in ("params", "models"):
            old, new = before.get(group) or {}, now.get(group) or {}
            diffs += [f"{key} {old.get(key, '(none)')} → {new.get(key, '(none)')}"
                      for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
        for key in sorted(set(before) | set(now)):
            if key not in ("params", "models", "upstream", "_layout") and before.get(key) != now.get(key):
                diffs.append(f"{key} changed")
        changes.append((stage_dir.stage, diffs))
    return changes


def mark_latest(roots: Iterable[luigi.Task]) -> list[StageDir]:
    """After a run: point ``latest`` of every stage of the DAG whose units are all complete at its hash folder."""
    marked = []
    for stage_dir, tasks in _stage_dirs(roots).values():
        if all(task.complete() for task in tasks):
            stage_dir.mark_latest()
            marked.append(stage_dir)
    return marked


# -- read back ------------------------------------------------------------------------------------------------


def _latest_name(stage_folder: Path) -> str | None:
    """What ``latest`` says (the link's target, else the ``LATEST`` file's line), unchecked."""
    link = stage_folder / LATEST_LINK
    try:
        if link.is_symlink():
            return str(link.readlink())
        if (stage_folder / LATEST_FILE).is_file():
            return (stage_folder / LATEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return "(unreadable)"
    return None


def latest_problem(stage_folder: Path) -> str | None:
    """Why the stage's ``latest`` is ignored (None: absent, or a hash folder of the stage)."""
    name = _latest_name(stage_folder)
    if name is None or ("/" not in name and name not in (".", "..") and is_hash_folder(stage_folder / name)):
        return None
    return f"{stage_folder.name}/latest names {name!r}, not a hash folder of the stage: ignored"


def latest_hash(stage_folder: Path) -> str | None:
    """The hash folder ``latest`` names (the link, else the ``LATEST`` file), if it is a direct child hash folder
    of the stage (a link or file naming ``..``, a path or anything else names nothing)."""
    name = _latest_name(stage_folder)
    return name if name is not None and latest_problem(stage_folder) is None else None


_HEX = frozenset("0123456789abcdef")


def is_hash_folder(path: Path) -> bool:
    """A parameter-set folder: named by a params hash (12 hex digits: this layout and older ones) or holding
    ``_meta/`` — never ``latest``, a hidden folder, or another folder a stage keeps beside (the demo's samples)."""
    if not path.is_dir() or path.is_symlink() or path.name.startswith((".", "_")) or path.name == LATEST_LINK:
        return False
    return (len(path.name) == 12 and set(path.name) <= _HEX) or (path / META_DIR).is_dir()


def hash_folders(stage_folder: Path) -> list[Path]:
    """The parameter-set folders of a stage, oldest first."""
    folders = [p for p in stage_folder.iterdir() if is_hash_folder(p)]
    return sorted(folders, key=lambda p: (p.stat().st_mtime, p.name))


@dataclass
class FolderStatus:
    stage: str
    hash: str
    latest: bool
    shards: int | None = None  # the last run's count (None: not recorded)
    done: int = 0
    failed: list[str] = field(default_factory=list)  # unit names
    rows: int | None = None
    rejects: Counter = field(default_factory=Counter)
    errors: dict[str, str] = field(default_factory=dict)  # failed unit → its last error
    last_run: bool = False  # the stage's most recent run worked in this folder (its failures count)

    @property
    def pending(self) -> int:
        if self.shards is None:
            return 0
        return max(self.shards - self.done - len(self.failed), 0)


def _unit_of(name: str, suffix: str) -> str:
    return name[: -len(suffix)]


def folder_status(stage: str, folder: Path, latest: bool) -> FolderStatus:
    """Done / failed / pending units, rows and rejects by reason of one hash folder."""
    import pyarrow.parquet as pq

    status = FolderStatus(stage, folder.name, latest)
    meta = folder / META_DIR
    try:
        status.shards = int(json.loads((meta / SHARDS_FILE).read_text())["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    done_units: set[str] = set()
    for record_path in sorted(meta.glob("*.done.json")):
        record = load_shard_stats(record_path)
        unit = _unit_of(record_path.name, ".done.json")
        # Done = a record of exactly this unit of this folder (stage, dataset, hash and shard as its place says,
        # a shard the last run counts) whose files are all there at their sizes (as the scheduler checks it).
        if (record is None or record.get("params_hash") != folder.name or record.get("stage") != stage
                or record.get("dataset") != folder.parent.parent.name
                or unit != (unit_name(record["shard"]) if record.get("shard", -1) >= 0 else unit)
                or (status.shards is not None and record.get("shard", -1) >= status.shards)
                or file_problems(folder, record, "size")):
            continue
        done_units.add(unit)
        if record["shard"] < 0:
            continue  # the ingest plan: a unit, not a shard of rows
        for entry in record["files"]:
            name = entry["name"]
            if name.startswith(f"{REJECTS_DIR}/"):
                table = pq.read_table(folder / name, columns=["reason"])
                status.rejects.update(table.column("reason").to_pylist())
            elif "/" not in name and name.endswith(".parquet"):
                status.rows = (status.rows or 0) + pq.ParquetFile(folder / name).metadata.num_rows
    status.done = len([u for u in done_units if u.startswith("shard-")]) or len(done_units)
    for marker in sorted(meta.glob("*.failed.json")):
        unit = _unit_of(marker.name, ".failed.json")
        if unit in done_units:
            continue
        status.failed.append(unit)
        try:
            status.errors[unit] = json.loads(marker.read_text()).get("error", "")
        except (OSError, ValueError, AttributeError):
            status.errors[unit] = "(unreadable failure record)"
    if status.shards is None and done_units and not any(u.startswith("shard-") for u in done_units):
        status.shards = len(done_units)  # named units (the ingest plan): all there are
    return status


def last_run_folder(folders: list[Path], latest: str | None) -> str | None:
    """The hash folder the stage's most recent run worked in: the newest ``_meta/shards.json`` (every run writes
    it at its start), else ``latest``, else the newest folder."""
    def started(folder: Path) -> float:
        try:
            return (folder / META_DIR / SHARDS_FILE).stat().st_mtime
        except OSError:
            return float("-inf")

    stamped = [f for f in folders if started(f) > float("-inf")]
    if stamped:
        return max(stamped, key=started).name
    return latest or (folders[-1].name if folders else None)


def stage_folders(dataset_folder: Path) -> list[Path]:
    """The stage folders of one dataset, in DAG order (unknown ones last, by name)."""
    order = {name: i for i, name in enumerate(stage_order())}
    folders = [p for p in dataset_folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
               and (any(hash_folders(p)) or (p / LATEST_FILE).exists())]
    return sorted(folders, key=lambda p: (order.get(p.name, len(order)), p.name))


def datasets_of(out: Path, dataset: str | None) -> list[Path]:
    if dataset:
        return [out / dataset]
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith((".", "_")) and stage_folders(p))


def tree_status(out: Path, dataset: str | None = None) -> dict[str, list[FolderStatus]]:
    """dataset → the status of every hash folder of every stage, stages in DAG order, latest first per stage."""
    result: dict[str, list[FolderStatus]] = {}
    for ds in datasets_of(out, dataset):
        rows: list[FolderStatus] = []
        for stage_folder in stage_folders(ds):
            latest = latest_hash(stage_folder)
            folders = hash_folders(stage_folder)
            folders.sort(key=lambda p: p.name != latest)  # stable: latest first, the others oldest first
            stage_rows = [folder_status(stage_folder.name, f, f.name == latest) for f in folders]
            last = last_run_folder(folders, latest)
            for row in stage_rows:
                row.last_run = row.hash == last
            rows += stage_rows
        result[ds.name] = rows
    return result


def format_status(rows: list[FolderStatus]) -> str:
    header = ("stage", "hash", "latest", "shards", "done", "pending", "failed", "rows", "rejects by reason")
    body = []
    for r in rows:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(r.rejects.items())) or "-"
        if r.shards is None and not r.done and not r.failed:  # no units (a trainer, an export): nothing to count
            counts: tuple = ("-", "-", "-", "-")
        else:
            counts = ("?" if r.shards is None else r.shards, r.done, "?" if r.shards is None else r.pending,
                      len(r.failed))
        body.append((r.stage, r.hash, "*" if r.latest else "", *counts, "-" if r.rows is None else r.rows,
                     reasons))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def status_report(out: Path, dataset: str | None = None) -> tuple[str, bool]:
    """(the text `pseudoseg status` prints, whether a shard failed in a stage's last run)."""
    if not out.is_dir():
        return f"pseudoseg: no output tree at {out}", True
    if dataset and not (out / dataset).is_dir():
        return f"pseudoseg: no dataset {dataset!r} under {out}", True
    trees = tree_status(out, dataset)
    if not trees:
        return f"pseudoseg: no stage folders under {out}", False
    parts, failed = [], False
    for ds, rows in trees.items():
        parts.append(f"{ds} ({out / ds}):\n{format_status(rows)}")
        for r in rows:
            for unit in r.failed:
                failed = failed or r.last_run
                older = "" if r.last_run else " (an earlier run's folder)"
                parts.append(f"  failed: {r.stage}/{r.hash} {unit}{older}: "
                             f"{r.errors.get(unit) or '(no error recorded)'}")
    return "\n\n".join(parts), failed


# -- clean --stale -------------------------------------------------------------------------------------------


LEASES = ".runs"  # <out>/<dataset>/.runs/: one lease per run in progress (a lock file + the folders it uses)


@contextlib.contextmanager
def run_lease(dataset_root: Path, stale_after: float) -> Iterator[Callable[[Iterable[Path]], None]]:
    """While a run works on a dataset: a lease, a lock file kept fresh by the same heartbeat as shard locks, and
    beside it the hash folders the run reads and writes (the yielded function records them), so `clean --stale`
    refuses to run meanwhile and, forced, keeps them. Removed when the run ends; a killed run's lease goes stale
    like its locks."""
    name = f"run-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    lock = UnitLock(dataset_root / LEASES / name, stale_after=stale_after)
    listing = dataset_root / LEASES / f"{name}.json"

    def record(folders: Iterable[Path]) -> None:
        atomic_write_bytes(listing, (json.dumps(sorted({str(f) for f in folders})) + "\n").encode())

    with lock:
        try:
            yield record
        finally:
            listing.unlink(missing_ok=True)


def live_leases(dataset_folder: Path, stale_after: float) -> list[tuple[str, set[Path]]]:
    """(who holds it, the folders it keeps) of every lease of a run still alive on this dataset."""
    found = []
    for lease in sorted((dataset_folder / LEASES).glob("run-*")):
        if lease.suffix == ".json" or lease.name.startswith(".") or not lease.is_file():
            continue
        try:
            holder, mtime = UnitLock.read(lease), lease.stat().st_mtime
        except OSError:
            continue
        if UnitLock(lease, stale_after=stale_after).is_stale(holder, mtime):
            continue
        try:
            folders = {Path(p) for p in json.loads(lease.with_name(f"{lease.name}.json").read_text())}
        except (OSError, ValueError, TypeError):
            folders = set()
        found.append((describe_holder(holder), folders))
    return found


def reachable_folders(dataset_folder: Path) -> set[Path]:
    """Every hash folder a stage's ``latest`` names, and every folder those were made from (the ``upstream``
    hashes of their params.json, followed to the end): what the latest results still stand on."""
    by_hash = {f.name: f for stage_folder in stage_folders(dataset_folder) for f in hash_folders(stage_folder)}
    todo = [stage_folder / latest for stage_folder in stage_folders(dataset_folder)
            if (latest := latest_hash(stage_folder)) is not None]
    kept: set[Path] = set()
    while todo:
        folder = todo.pop()
        if folder in kept:
            continue
        kept.add(folder)
        try:
            upstream = json.loads((folder / META_DIR / "params.json").read_text()).get("upstream") or {}
        except (OSError, ValueError, AttributeError):
            continue
        todo += [by_hash[h] for h in upstream.values() if isinstance(h, str) and h in by_hash]
    return kept


def stale_folders(out: Path, dataset: str | None = None, keep: Iterable[Path] = ()) -> list[Path]:
    """Hash folders that are not their stage's latest, nor reachable from a latest (``reachable_folders``), nor
    in ``keep`` (stages without a valid latest pointer are left alone)."""
    stale = []
    keep = {Path(k).resolve() for k in keep}
    for ds in datasets_of(out, dataset):
        reachable = reachable_folders(ds)
        for stage_folder in stage_folders(ds):
            if latest_hash(stage_folder) is not None:
                stale += [f for f in hash_folders(stage_folder)
                          if f not in reachable and f.resolve() not in keep]
    return stale


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def clean_stale(out: Path, dataset: str | None, *, yes: bool, interactive: bool, force: bool = False,
                stale_after: float = 600.0, ask: Callable[[str], str] = input) -> int:
    """Remove the stale hash folders: after a y/N question on a terminal, at once with ``yes``; refuses (exit 2)
    without a terminal and without ``yes``, and while a run works on the dataset unless ``force`` (then every
    folder that run uses is kept). Returns the exit status."""
    if not out.is_dir() or (dataset and not (out / dataset).is_dir()):
        print(f"pseudoseg: nothing to clean: no {'dataset ' + repr(dataset) + ' under ' if dataset else ''}{out}",
              file=sys.stderr)
        return 2
    keep: set[Path] = set()
    for ds in datasets_of(out, dataset):
        for stage_folder in stage_folders(ds):
            problem = latest_problem(stage_folder)
            if problem:
                print(f"  {ds.name}/{problem}")
        for holder, folders in live_leases(ds, stale_after):
            if not force:
                print(f"pseudoseg: clean: a run is working on {ds.name} ({holder}); clean when it has ended, or "
                      "--force to clean around it (the folders it uses are kept)", file=sys.stderr)
                return 2
            print(f"  {ds.name}: a run is working on it ({holder}): its {len(folders)} folder(s) are kept")
            keep |= folders
    stale = []
    for folder in stale_folders(out, dataset, keep):
        if any(folder.glob(".lock-*")):  # a run is working in it (or one died holding a lock: rerun, then clean)
            print(f"  {folder.relative_to(out)}: a shard lock is held there, skipped")
        else:
            stale.append(folder)
    if not stale:
        print("pseudoseg: no stale hash folders (every stage folder holds only its latest)")
        return 0
    total = 0
    for folder in stale:
        size = folder_bytes(folder)
        total += size
        print(f"  {folder.relative_to(out)}  ({size / 1e6:.1f} MB)")
    print(f"{len(stale)} stale hash folder(s), {total / 1e6:.1f} MB")
    if not yes:
        if not interactive:
            print("pseudoseg: clean --stale: not a terminal, nothing removed; pass --yes to remove them",
                  file=sys.stderr)
            return 2
        if ask("remove them? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    for folder in stale:
        shutil.rmtree(folder)
    print(f"removed {len(stale)} stale hash folder(s)")
    return 0
