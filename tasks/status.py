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

import json
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterable
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
)

SHARDS_FILE = "shards.json"  # in a hash folder's _meta/: {"shards": N}, the shard count of the stage's last run

def stage_order() -> list[str]:
    """Stage folder names in DAG order (tasks.dag.OUTPUTS), the ingest plan first."""
    from pseudoseg.tasks.dag import OUTPUTS

    return ["plan", *(output.folder for output in OUTPUTS)]


# -- written by a run -----------------------------------------------------------------------------------------


def _stage_dirs(roots: Iterable[luigi.Task]) -> dict[Path, tuple[StageDir, list[luigi.Task]]]:
    from pseudoseg.tasks.summary import walk_dag

    found: dict[Path, tuple[StageDir, list[luigi.Task]]] = {}
    for task in walk_dag(roots):
        try:
            stage_dir = task.stage_dir
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(stage_dir, StageDir):
            found.setdefault(stage_dir.path, (stage_dir, []))[1].append(task)
    return found


def record_shard_counts(roots: Iterable[luigi.Task]) -> None:
    """Before a run: ``_meta/shards.json`` of every shard stage of the DAG (how many units make it complete)."""
    from pseudoseg.tasks.base import ShardTask

    for stage_dir, tasks in _stage_dirs(roots).values():
        shards = [t for t in tasks if isinstance(t, ShardTask)]
        if shards:
            body = (json.dumps({"shards": len(shards)}) + "\n").encode()
            target = stage_dir.meta_path / SHARDS_FILE
            try:
                atomic_write_bytes(target, body)
            except OSError:
                pass


def mark_latest(roots: Iterable[luigi.Task]) -> list[StageDir]:
    """After a run: point ``latest`` of every stage of the DAG whose units are all complete at its hash folder."""
    marked = []
    for stage_dir, tasks in _stage_dirs(roots).values():
        if all(task.complete() for task in tasks):
            stage_dir.mark_latest()
            marked.append(stage_dir)
    return marked


# -- read back ------------------------------------------------------------------------------------------------


def latest_hash(stage_folder: Path) -> str | None:
    """The hash folder ``latest`` names (the link, else the ``LATEST`` file), if it exists."""
    link = stage_folder / LATEST_LINK
    name = None
    if link.is_symlink():
        name = Path(link.readlink()).name
    elif (stage_folder / LATEST_FILE).is_file():
        name = (stage_folder / LATEST_FILE).read_text().strip()
    return name if name and (stage_folder / name).is_dir() and "/" not in name else None


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
        # Done = a record of this folder whose files are all there at their sizes (as the scheduler checks it).
        if record is None or record.get("params_hash") != folder.name or file_problems(folder, record, "size"):
            continue
        done_units.add(_unit_of(record_path.name, ".done.json"))
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


def stale_folders(out: Path, dataset: str | None = None) -> list[Path]:
    """Hash folders that are not their stage's latest (stages without a latest pointer are left alone)."""
    stale = []
    for ds in datasets_of(out, dataset):
        for stage_folder in stage_folders(ds):
            latest = latest_hash(stage_folder)
            if latest is not None:
                stale += [f for f in hash_folders(stage_folder) if f.name != latest]
    return stale


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def clean_stale(out: Path, dataset: str | None, *, yes: bool, interactive: bool,
                ask: Callable[[str], str] = input) -> int:
    """Remove the stale hash folders: after a y/N question on a terminal, at once with ``yes``; refuses (exit 2)
    without a terminal and without ``yes``. Returns the exit status."""
    if not out.is_dir() or (dataset and not (out / dataset).is_dir()):
        print(f"pseudoseg: nothing to clean: no {'dataset ' + repr(dataset) + ' under ' if dataset else ''}{out}",
              file=sys.stderr)
        return 2
    stale = []
    for folder in stale_folders(out, dataset):
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
