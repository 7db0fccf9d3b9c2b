"""Ingest stage: plan (hash + shard assignment of every entry), then one IngestShard per shard."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pseudoseg.pipeline.core.artifacts import ShardOutput, StageDir, read_record
from pseudoseg.pipeline.core.ingest import STAGE, ingest_entries
from pseudoseg.pipeline.core.params import DecodeLimits, IngestPlanParams, StorageParams
from pseudoseg.pipeline.core.sources import EntryReader, PlannedEntry, plan_entries
from pseudoseg.schemas import MANIFEST, PLAN, REJECTS, SchemaError
from pseudoseg.tasks.engine.base import (
    LOG,
    CommittedTask,
    ProgressReporter,
    ShardTask,
    StageSettings,
    by_settings,
    stage_params,
    stage_wrapper,
)
from pseudoseg.tasks.engine.progress import STAGE_PROGRESS, report_status
from pseudoseg.tasks.stages.catalog import declare


class PlanIngest(StageSettings, CommittedTask):
    """Hashes every entry once (ids, duplicates, unreadable paths) and fixes the shard of each: ``plan.parquet``
    and its record ``plan.done.json`` (same contract as a shard's, shard -1), which every IngestShard verifies."""

    params_type = IngestPlanParams

    def content_params(self) -> dict[str, Any]:
        return {**super().content_params(), "listing": self.listing.fingerprint}

    @property
    def stage_dir(self) -> StageDir:
        return self.cached_stage_dir(lambda: StageDir(self.root, self.dataset, "plan", self.content_params()))

    @property
    def unit(self) -> str:
        return "plan"

    def describe(self) -> str:
        return "ingest plan"

    @property
    def plan_path(self) -> Path:
        return self.stage_dir.unit_path(self.unit, "parquet")

    def content_digest(self) -> str:
        """What the plan holds (its Parquet's sha256, from its record): what the ingest shards hash as their
        upstream. The plan's own folder follows the listing (names, sizes, mtimes: cheap to check), so a folder whose
        files were rewritten or copied with the same bytes gets a new plan with the same content, and nothing after
        it is redone. Every stage's folder name depends on this, so the plan is made here, under its lock, when it
        is not done yet (while Luigi schedules: once per build, before any stage runs)."""
        def compute() -> str:
            if self.problems():
                entries = len(self.listing.entries)
                LOG.info("pseudoseg: hashing the %d entries of %s for the ingest plan", entries, self.images)
                STAGE_PROGRESS.note(f"ingest plan: hashing {entries} entr{'y' if entries == 1 else 'ies'}")
                with self.lock():
                    self.run_locked()
            record = read_record(self.stage_dir, self.unit)
            (plan,) = [f for f in record["files"] if f["name"] == self.stage_dir.unit_name_of(self.unit, "parquet")]
            return plan["sha256"][:16]

        return by_settings(("plan content", type(self), tuple(self.param_kwargs.items())), compute)

    def produce_unit(self) -> ShardOutput:
        report_status(self, f"hashing {len(self.listing.entries)} entries")
        listing, shard_size = self.listing, self.params.shard_size
        rows = [e.__dict__ for e in plan_entries(listing.entries, shard_size, problems=listing.problems,
                                                 storage=stage_params(StorageParams))]
        output = ShardOutput(in_count=len(rows), ok_count=len(rows))
        output.files["parquet"] = PLAN.to_parquet_bytes(PLAN.table(rows), row_group_size=plan_row_group_size(shard_size))
        return output


# The plan holds every entry (a million rows at COCO-like scale); each ingest shard needs only its own. The plan
# is written in whole-shard Parquet row groups of about PLAN_GROUP_ROWS rows, sorted by position (= by shard), so
# a shard reads the row group(s) whose `shard` statistics cover it, not the file: reading stays constant per
# shard as the plan grows. Plans written otherwise (one row group) are read the same way, only slower.
PLAN_GROUP_ROWS = 8192


def plan_row_group_size(shard_size: int) -> int:
    """Rows per row group of the plan: a whole number of shards, about PLAN_GROUP_ROWS rows."""
    return shard_size * max(1, PLAN_GROUP_ROWS // shard_size)


def _file_key(path: str) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@functools.lru_cache(maxsize=4)
def _plan_file(path: str, key: tuple[int, ...]) -> tuple[pq.ParquetFile, list[tuple[int | None, int | None]]]:
    """The open plan (version checked) and (min, max) shard of each row group; once per file version."""
    try:
        plan = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SchemaError(f"{path}: not a readable Parquet file for {PLAN.tag}: {exc}") from exc
    PLAN.check_version(plan.schema_arrow.metadata, where=path)
    column = plan.schema_arrow.get_field_index("shard")
    groups = []
    for i in range(plan.metadata.num_row_groups):
        stats = plan.metadata.row_group(i).column(column).statistics if column >= 0 else None
        groups.append((stats.min, stats.max) if stats is not None and stats.has_min_max else (None, None))
    return plan, groups


@functools.lru_cache(maxsize=2)
def _plan_group(path: str, key: tuple[int, ...], index: int) -> tuple[pa.Table, np.ndarray, bool]:
    """One row group of the plan, checked against the contract (the shards of a range share it), its shard
    column and whether that column is sorted."""
    plan, _ = _plan_file(path, key)
    table = plan.read_row_group(index)
    PLAN.validate(table, where=path)
    shards = table.column("shard").to_numpy()
    return table, shards, bool(np.all(shards[1:] >= shards[:-1]))


def read_plan_shard(path: str, shard: int) -> list[PlannedEntry]:
    """The plan's entries of ``shard``, by position."""
    key = _file_key(path)
    _, groups = _plan_file(path, key)
    parts = []
    for i, (low, high) in enumerate(groups):
        if low is not None and not low <= shard <= high:
            continue
        table, shards, ordered = _plan_group(path, key, i)
        if ordered:
            start, stop = np.searchsorted(shards, [shard, shard + 1])
            parts.append(table.slice(start, stop - start))
        else:
            parts.append(table.filter(pa.array(shards == shard)))
    rows = sorted((row for part in parts for row in part.to_pylist()), key=lambda row: row["position"])
    return [PlannedEntry(**row) for row in rows]


class IngestShard(ShardTask):
    """Original bytes (or a downsized PNG for giants) + JSON meta in a WebDataset tar, a manifest Parquet, and
    a rejects Parquet for every entry that could not be accepted."""

    stage = STAGE
    params_type = DecodeLimits

    def requires(self) -> PlanIngest:
        return PlanIngest(**self.common())

    def limits(self) -> DecodeLimits:
        return self.params

    def upstream_params(self) -> dict[str, str]:
        return {"plan": self.requires().content_digest()}

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        entries = read_plan_shard(str(self.requires().plan_path), self.shard)
        progress.start(len(entries))
        with EntryReader(stage_params(StorageParams)) as reader, self.tar_spool() as tar:
            result = ingest_entries(entries, reader.read, self.limits(), on_entry=progress.step, sink=tar.write)
        output = ShardOutput(
            files={"tar": tar.path},
            in_count=len(entries),
            ok_count=len(result.manifest),
            rejected_count=len(result.rejects),
        )
        output.add_table("parquet", MANIFEST, MANIFEST.table(result.manifest))
        output.add_table("rejects.parquet", REJECTS, REJECTS.table(result.rejects))
        return output


Ingest = declare(stage_wrapper(IngestShard), makes="list, hash, decode and shard the images; bad inputs become reject rows",
                 counts="images", rows_are="images", contract=MANIFEST, full_dag=True)
