"""End-of-run summary: per stage, shards done/failed, records in/ok/rejected, seconds — read from done.json files."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import luigi

from pipeline.artifacts import QUARANTINE, load_shard_stats
from tasks.base import CommittedTask, ShardRange, ShardTask


def walk_dag(roots: Iterable[luigi.Task]) -> Iterator[luigi.Task]:
    """Every task Luigi schedules from ``roots`` (``deps()``: shard ranges where [pseudoseg] shards_per_task > 1),
    once, and the shards of every range (requires() is cheap: listings and stage folders are cached)."""
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        task = stack.pop()
        if task.task_id in seen:
            continue
        seen.add(task.task_id)
        yield task
        if isinstance(task, ShardRange):
            for unit in task.units():
                if unit.task_id not in seen:
                    seen.add(unit.task_id)
                    yield unit
        stack.extend(task.deps())


@dataclass
class StageRow:
    stage: str
    shards: int = 0
    done: int = 0
    records_in: int = 0
    ok: int = 0
    rejected: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return self.shards - self.done


def summarise(roots: Iterable[luigi.Task]) -> list[StageRow]:
    rows: dict[str, StageRow] = defaultdict(lambda: StageRow(""))
    for task in walk_dag(roots):
        if not isinstance(task, ShardTask):
            continue
        row = rows[task.stage]
        row.stage = task.stage
        row.shards += 1
        # Done = a valid record whose files are in place (CommittedTask.complete); garbage counts as not done.
        stats = load_shard_stats(task.stage_dir.done_path(task.shard)) if task.complete() else None
        if stats is not None:
            row.done += 1
            row.records_in += stats["in_count"]
            row.ok += stats["ok_count"]
            row.rejected += stats["rejected_count"]
            row.seconds += stats["seconds"]
    return sorted(rows.values(), key=lambda r: r.stage)


def format_table(rows: list[StageRow]) -> str:
    # Records are images for ingest, captions/boxes/masks for later stages: in = ok + rejected per stage.
    header = ("stage", "shards", "done", "failed", "records in", "ok", "rejected", "seconds")
    body = [(r.stage, r.shards, r.done, r.failed, r.records_in, r.ok, r.rejected, f"{r.seconds:.1f}")
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def quarantine_notes(roots: Iterable[luigi.Task], since: float) -> list[str]:
    """One line per unit invalidated since ``since`` (epoch seconds) under the DAG of ``roots``: the reason
    recorded in its ``.quarantine/<unit>-<time>-<pid>/reason.txt``, and where the evidence lies."""
    folders = {task.stage_dir.path for task in walk_dag(roots) if isinstance(task, CommittedTask)}
    notes = []
    for folder in sorted(folders):
        for reason in sorted((folder / QUARANTINE).glob("*/reason.txt")):
            if reason.stat().st_mtime >= since:
                notes.append(f"{reason.read_text().strip()} (evidence: {reason.parent})")
    return notes
