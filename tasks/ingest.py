"""Ingest stage: plan (hash + shard assignment of every entry), then one IngestShard per shard."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc

from pipeline.artifacts import ShardOutput, StageDir
from pipeline.ingest import STAGE, DecodeLimits, ingest_entries
from pipeline.sources import EntryReader, PlannedEntry, plan_entries
from schemas import MANIFEST, PLAN, REJECTS
from tasks.base import CommittedTask, ProgressReporter, ShardTask, StageWrapper, ingest


class PlanIngest(CommittedTask):
    """Hashes every entry once (ids, duplicates, unreadable paths) and fixes the shard of each: ``plan.parquet``
    and its record ``plan.done.json`` (same contract as a shard's, shard -1), which every IngestShard verifies."""

    @property
    def stage_dir(self) -> StageDir:
        def compute() -> StageDir:
            params = {"listing": self.listing.fingerprint, "shard_size": ingest().shard_size}
            return StageDir(self.root, self.dataset, "plan", params)

        return self.cached_stage_dir(compute)

    @property
    def unit(self) -> str:
        return "plan"

    def describe(self) -> str:
        return "ingest plan"

    @property
    def plan_path(self) -> Path:
        return self.stage_dir.unit_path(self.unit, "parquet")

    def produce_unit(self) -> ShardOutput:
        if callable(self.set_status_message):  # None outside a Luigi worker
            self.set_status_message(f"hashing {len(self.listing.entries)} entries")
        listing = self.listing
        rows = [e.__dict__ for e in plan_entries(listing.entries, ingest().shard_size, problems=listing.problems)]
        output = ShardOutput(in_count=len(rows), ok_count=len(rows))
        output.add_table("parquet", PLAN, PLAN.table(rows))
        return output


def read_plan_shard(path: str, shard: int) -> list[PlannedEntry]:
    table = PLAN.read_parquet(path).filter(pc.field("shard") == shard)
    return [PlannedEntry(**row) for row in table.sort_by("position").to_pylist()]


class IngestShard(ShardTask):
    """Original bytes (or a downsized PNG for giants) + JSON meta in a WebDataset tar, a manifest Parquet, and
    a rejects Parquet for every entry that could not be accepted."""

    stage = STAGE

    def requires(self) -> PlanIngest:
        return PlanIngest(**self.common())

    def limits(self) -> DecodeLimits:
        cfg = ingest()
        return DecodeLimits(max_side=cfg.max_side, min_side=cfg.min_side, max_pixels=cfg.max_pixels)

    def content_params(self) -> dict:
        return {"plan": self.requires().stage_dir.hash, **self.limits().__dict__}

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        entries = read_plan_shard(str(self.requires().plan_path), self.shard)
        progress.start(len(entries))
        with EntryReader() as reader, self.tar_spool() as tar:
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


class Ingest(StageWrapper):
    shard_task = IngestShard
