"""Ingest stage: plan (hash + shard assignment of every entry), then one IngestShard per shard."""

from __future__ import annotations

import luigi
import pyarrow.compute as pc

from pipeline.artifacts import ShardOutput, StageDir, atomic_write_bytes
from pipeline.ingest import STAGE, DecodeLimits, ingest_entries
from pipeline.sources import EntryReader, PlannedEntry, plan_entries
from schemas import MANIFEST, PLAN, REJECTS
from tasks.base import DatasetTask, ProgressReporter, ShardTask, StageWrapper, ingest


class PlanIngest(DatasetTask):
    """Hashes every entry once (ids, duplicates, unreadable paths) and fixes the shard of each."""

    @property
    def stage_dir(self) -> StageDir:
        params = {"listing": self.listing.fingerprint, "shard_size": ingest().shard_size}
        return StageDir(self.root, self.dataset, "plan", params)

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir.path / "plan.parquet"))

    def run(self) -> None:
        self.set_status_message(f"hashing {len(self.listing.entries)} entries")
        listing = self.listing
        rows = [e.__dict__ for e in plan_entries(listing.entries, ingest().shard_size, problems=listing.problems)]
        stage_dir = self.stage_dir
        stage_dir.write_params()
        atomic_write_bytes(stage_dir.path / "plan.parquet", PLAN.to_parquet_bytes(PLAN.table(rows)))


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
        entries = read_plan_shard(self.input().path, self.shard)
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
