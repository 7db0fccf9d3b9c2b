"""End-of-run summary of one dataset, from the records alone (done.json files, output files): per stage in DAG
order (tasks.stages.catalog.outputs) what its counts count, shards done/failed, shards ran in this invocation vs. already done, records
in → ok / rejected, rows written, the top reject reasons, seconds; a warning line for each stage that produced
nothing; the paths of what a user opens (gallery, coco.json, model.pt, report.md). The same as ``run.json``."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import luigi

from pseudoseg.models.registry import random_models_notice
from pseudoseg.pipeline.core.artifacts import (
    QUARANTINE,
    StageDir,
    atomic_write_bytes,
    load_shard_stats,
    package_versions,
)
from pseudoseg.tasks.engine.base import CommittedTask, ShardRange, ShardTask, model_settings

TOP_REASONS = 3

# What to change when a stage made nothing because its records were refused for this reason (a stage's warning).
REMEDIES = {
    "low_predicted_iou": "lower [use] pred_iou_thresh",
    "low_stability": "lower [use] stability_score_thresh",
    "no_box": "lower [use] box_threshold or text_threshold",
    "no_auto_mask": "lower [fmbseg] pred_iou_thresh or stability_score_thresh, or raise max_area_fraction",
    "no_class_detected": "lower [fmbseg] min_crops",
    "no_confident_query": "lower [car_labels] theta",
}
RANDOM_THRESHOLDS = ("random tiny models (preset = tiny) rarely pass the papers' thresholds: demo.cfg holds values "
                     "they pass (--config it), or set [models] preset = real")


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
            for unit in task.shard_tasks():
                if unit.task_id not in seen:
                    seen.add(unit.task_id)
                    yield unit
        stack.extend(task.deps())


def output_of(folder: str):  # -> tasks.stages.catalog.Stage
    from pseudoseg.tasks.stages.catalog import Stage
    from pseudoseg.tasks.stages.catalog import output_of as declared_output

    found = declared_output("evaluate" if folder.startswith("eval_") else folder)
    return found if found is not None else Stage(folder, "", "records", "rows")


def dag_position(folder: str) -> int:
    from pseudoseg.tasks.stages.catalog import outputs

    out, ordered = output_of(folder), outputs()
    return ordered.index(out) if out in ordered else len(ordered)


@dataclass
class StageRow:
    stage: str  # the stage folder (``use_box_masks``)
    name: str = ""  # its declared name (``UseBoxMasks``)
    counts: str = "records"  # what in / ok / rejected count
    rows_are: str = "rows"  # what the rows written are
    path: str = ""  # the stage's folder for this run's parameters
    shards: int = 0
    done: int = 0
    ran: int = 0  # units committed during this run (the rest of ``done`` were already done: skipped)
    records_in: int = 0
    ok: int = 0
    rejected: int = 0
    rows: int | None = 0  # None: not recorded (records written before rows were, or not a table)
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)
    artifacts: dict[str, str] = field(default_factory=dict)  # what a user opens: label → path
    counted: bool = True  # False: a single-output task (export, trainer) without per-record counts
    random_models: bool = False  # made by the tiny preset's random models
    stage_dir: StageDir | None = field(default=None, repr=False, compare=False)

    @property
    def failed(self) -> int:
        return self.shards - self.done

    @property
    def skipped(self) -> int:
        return self.done - self.ran

    def top_reasons(self, n: int = TOP_REASONS) -> list[tuple[str, int]]:
        return self.reasons.most_common(n)

    def warning(self) -> str | None:
        """One line if this stage finished but produced nothing."""
        if not self.counted or self.shards == 0 or self.done < self.shards:
            return None
        produced = self.rows if self.rows is not None else self.ok
        if produced:
            return None
        if self.records_in == 0:
            return f"{self.name} produced no {self.rows_are}: it received no {self.counts} (an upstream stage " \
                   f"produced nothing)"
        reasons = ", ".join(f"{reason} {count}" for reason, count in self.top_reasons())
        remedies = [REMEDIES[reason] for reason, _ in self.top_reasons() if reason in REMEDIES]
        why = f"; to keep more, {' / '.join(remedies)}" if remedies else ""
        if remedies and self.random_models:
            why += f" ({RANDOM_THRESHOLDS})"
        return (f"{self.name} produced no {self.rows_are}: {self.records_in} {self.counts} in, {self.ok} ok, "
                f"{self.rejected} rejected" + (f" ({reasons})" if reasons else "") + why)

    def as_json(self) -> dict[str, Any]:
        return {"stage": self.name, "folder": self.stage, "path": self.path, "counts": self.counts,
                "shards": self.shards, "done": self.done, "failed": self.failed, "ran": self.ran,
                "skipped": self.skipped,
                **({"in": self.records_in, "ok": self.ok, "rejected": self.rejected} if self.counted else {}),
                "rows": self.rows, "rows_are": self.rows_are, "seconds": round(self.seconds, 3),
                "reject_reasons": dict(self.reasons.most_common()), "warning": self.warning(),
                "artifacts": self.artifacts}


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _new_row(folder: str, stage_dir: StageDir) -> StageRow:
    out = output_of(folder)
    return StageRow(stage=folder, name=out.name, counts=out.counts, rows_are=out.rows_are, path=str(stage_dir.path),
                    stage_dir=stage_dir)


# Stage folders a user opens as a whole (their shards are the product): label in the run's outputs.
FOLDER_ARTIFACTS = {"use_segments": "segment-text pairs", "fmbseg_labels": "label maps", "car_labels": "label maps"}


def _single(task: luigi.Task, row: StageRow, since: float | None, durations: dict[str, float]) -> None:
    """A task with one output (ModelProbe, ExportCoco, TextClasses, a trainer, Evaluate)."""
    row.counted = False
    row.rows = None
    row.shards += 1
    target = Path(task.output().path)
    if not task.complete():
        return
    row.done += 1
    mtime = _mtime(target)
    if since is not None and mtime is not None and mtime >= since:
        row.ran += 1
        row.seconds += durations.get(task.task_id, 0.0)
    label = {"coco.json": "coco.json", "model.pt": "model.pt", "report.md": "report.md"}.get(target.name)
    if label == "report.md":  # an evaluation: its mIoU, and the picture beside it
        label = f"report.md (mIoU {_miou(target.parent):.2f} %)"
        if (target.parent / "grid.png").is_file():
            row.artifacts["grid.png"] = str(target.parent / "grid.png")
    if label:
        row.artifacts[label] = str(target)
    if target.name == "model.pt":  # metrics.jsonl: one line per optimiser step
        try:
            with open(target.parent / "metrics.jsonl", "rb") as fh:
                row.rows = sum(1 for _ in fh)
        except OSError:
            pass


def _miou(folder: Path) -> float:
    """An evaluation's mIoU in percent, from its per_class.parquet (classes with a non-empty union)."""
    import pyarrow.parquet as pq

    try:
        ious = [v for v in pq.read_table(folder / "per_class.parquet", columns=["iou"]).column("iou").to_pylist()
                if v is not None]
    except (OSError, KeyError, ValueError):
        return float("nan")
    return 100.0 * sum(ious) / len(ious) if ious else float("nan")


def summarise(roots: Iterable[luigi.Task], since: float | None = None,
              durations: dict[str, float] | None = None) -> list[StageRow]:
    """One row per stage folder the DAG of ``roots`` writes, in DAG order; ``since`` (epoch seconds, the run's
    start): units committed after it count as ran, the others as skipped; ``durations``: task id → seconds of the
    single-output tasks that ran (their time is not in a done.json)."""
    rows: dict[str, StageRow] = {}
    galleries: list[Path] = []
    random_models = random_models_notice(model_settings()) is not None
    for task in walk_dag(roots):
        if isinstance(task, ShardTask):
            stage_dir = task.stage_dir
            row = rows.get(task.stage) or rows.setdefault(task.stage, _new_row(task.stage, stage_dir))
            row.shards += 1
            # Done = a valid record whose files are in place (CommittedTask.complete); garbage counts as not done.
            done = stage_dir.done_path(task.shard)
            stats = load_shard_stats(done) if task.complete() else None
            if stats is None:
                continue
            row.done += 1
            row.records_in += stats["in_count"]
            row.ok += stats["ok_count"]
            row.rejected += stats["rejected_count"]
            row.seconds += stats["seconds"]
            if row.rows is not None:  # unknown as soon as one record does not say (written before v2)
                row.rows = None if stats.get("rows") is None else row.rows + stats["rows"]
            row.reasons.update(dict(stats.get("reject_reasons") or {}))
            if task.stage in FOLDER_ARTIFACTS:
                row.artifacts[FOLDER_ARTIFACTS[task.stage]] = str(stage_dir.path)
            mtime = _mtime(done)
            if since is not None and mtime is not None and mtime >= since:
                row.ran += 1
        elif not isinstance(task, CommittedTask) and hasattr(type(task), "stage_dir"):
            try:
                stage_dir = task.stage_dir
            except Exception:  # noqa: BLE001 — e.g. a trainer over an empty source, a benchmark not found: the
                continue       # run's own failure says why; the summary shows what exists
            row = rows.get(stage_dir.stage) or rows.setdefault(stage_dir.stage, _new_row(stage_dir.stage, stage_dir))
            _single(task, row, since, durations or {})
        elif type(task).__name__ == "UsePreview" and task.complete():
            galleries.append(Path(task.output().path))  # <out>/<dataset>/use_preview/<hash>/index.html
    for gallery in galleries:
        folder = gallery.parent.parent.name
        row = rows.get(folder) or rows.setdefault(folder, _new_row(folder, StageDir(gallery.parents[3],
                                                                                    gallery.parents[2].name,
                                                                                    folder, {})))
        row.artifacts["gallery"] = str(gallery)
    for row in rows.values():
        row.random_models = random_models
    return sorted(rows.values(), key=lambda r: (dag_position(r.stage), r.stage))


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def format_table(rows: list[StageRow]) -> str:
    """Per stage, in DAG order: shards done/failed, ran/skipped in this run, records in/ok/rejected (what the stage
    counts), rows written (and what they are), seconds, top reject reasons; then a warning line per empty stage."""
    header = ("stage", "counts", "shards", "done", "failed", "ran", "skipped", "in", "ok", "rejected", "rows",
              "rows are", "seconds", "top reject reasons")
    body = []
    for r in rows:
        counts = (r.records_in, r.ok, r.rejected) if r.counted else (None, None, None)
        reasons = ", ".join(f"{reason} {count}" for reason, count in r.top_reasons())
        if len(r.reasons) > TOP_REASONS:
            reasons += f", +{len(r.reasons) - TOP_REASONS} more"
        body.append((r.name, r.counts if r.counted else "-", r.shards, r.done, r.failed, r.ran, r.skipped,
                     *(_cell(c) for c in counts), _cell(r.rows), r.rows_are, f"{r.seconds:.1f}", reasons or "-"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    left = {0, 1, 11, 13}

    def line(values) -> str:
        cells = [str(x).ljust(w) if i in left else str(x).rjust(w) for i, (x, w) in enumerate(zip(values, widths,
                                                                                                 strict=True))]
        return "  ".join(cells).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths), *(line(b) for b in body)]
    warnings = [w for w in (r.warning() for r in rows) if w]
    lines += [f"WARNING: {w}" for w in warnings]
    return "\n".join(lines)


def artifacts(rows: list[StageRow]) -> dict[str, str]:
    """label → path of what a user opens, in DAG order; a label several stages share names its stage
    (``model.pt (TrainUse)``, ``label maps (CarLabels)``)."""
    shared = {label for label in {lb for r in rows for lb in r.artifacts}
              if sum(label in r.artifacts for r in rows) > 1 or label == "model.pt"}
    found: dict[str, str] = {}
    for r in rows:
        for label, path in r.artifacts.items():
            found[f"{label} ({r.name})" if label in shared else label] = path
    return found


@dataclass
class RunInfo:
    """One invocation: what it ran, when, with what, and where its log, record and card are."""

    command: str
    dataset: str
    root: Path  # <out>/<dataset>
    images: str
    started: float
    ended: float = 0.0
    ok: bool = True
    log: Path | None = None
    settings_hash: str = ""
    causes: list[str] = field(default_factory=list)
    notice: str | None = None  # models.registry.random_models_notice

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def card(self) -> Path:
        return self.root / "README.md"


def footer(rows: list[StageRow], info: RunInfo) -> str:
    lines = ["", "outputs:"]
    found = artifacts(rows)
    width = max((len(k) for k in found), default=0)
    lines += [f"  {label:<{width}}  {path}" for label, path in found.items()] or ["  (none yet)"]
    ran = sum(r.ran for r in rows)
    lines.append(f"ran {ran} unit(s), skipped {sum(r.skipped for r in rows)} already done; "
                 f"{info.ended - info.started:.1f} s")
    lines.append(f"run record: {info.run_json}   dataset card: {info.card}")
    if info.notice:
        lines.append(f"note: {info.notice}")
    if info.log is not None:
        lines.append(f"log: {info.log}")
    return "\n".join(lines)


def run_record(rows: list[StageRow], info: RunInfo) -> dict[str, Any]:
    """What ``run.json`` holds: the table as data, with the run's identity."""
    return {
        "schema": "run/v2",  # v2: per stage "counts" / "rows_are" (v1: "unit" / "rows_unit")
        "command": info.command,
        "dataset": info.dataset,
        "images": info.images,
        "root": str(info.root),
        "status": "ok" if info.ok else "failed",
        "failures": info.causes,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.started)),
        "ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.ended)),
        "seconds": round(info.ended - info.started, 3),
        "settings_hash": info.settings_hash,
        "versions": package_versions(),
        "log": str(info.log) if info.log else None,
        "ran": sum(r.ran for r in rows),
        "skipped": sum(r.skipped for r in rows),
        "stages": [r.as_json() for r in rows],
        "warnings": [w for w in (r.warning() for r in rows) if w],
        "artifacts": artifacts(rows),
        "card": str(info.card),
        "notice": info.notice,
    }


def write_run_json(rows: list[StageRow], info: RunInfo) -> Path:
    """``<out>/<dataset>/run.json``, atomically (a reader never sees half of it)."""
    body = json.dumps(run_record(rows, info), indent=2, ensure_ascii=False) + "\n"
    os.makedirs(info.root, exist_ok=True)
    atomic_write_bytes(info.run_json, body.encode())
    return info.run_json


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
