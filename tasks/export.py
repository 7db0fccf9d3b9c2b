"""Exports of the USE segment–text pairs: one COCO JSON per dataset, and an HTML preview gallery per shard."""

from __future__ import annotations

import luigi

from pipeline.artifacts import ShardOutput, StageDir
from pipeline.export import coco_from_segments, write_coco_json
from pipeline.preview import preview_shard
from schemas import MANIFEST, SEGMENTS
from tasks.base import CommittedTask, DatasetTask, ProgressReporter, ShardTask, StageWrapper, verify_inputs
from tasks.ingest import IngestShard
from tasks.use import SegmentNMSShard


class ExportCoco(DatasetTask):
    """`coco.json` (images, RLE annotations with their expressions) that pycocotools loads."""

    def requires(self) -> list[SegmentNMSShard]:
        return [SegmentNMSShard(shard=i, **self.common()) for i in range(self.shard_count)]

    @property
    def stage_dir(self) -> StageDir:
        return StageDir(self.root, self.dataset, "export_coco", {"segments": self.requires()[0].stage_dir.hash})

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir.path / "coco.json"))

    def run(self) -> None:
        verify_inputs(self, [u for t in self.requires() for u in (t, IngestShard(shard=t.shard, **self.common()))])
        manifest, segments = [], []
        for task in self.requires():
            ingest = IngestShard(shard=task.shard, **self.common()).stage_dir
            manifest += MANIFEST.read_parquet(ingest.shard_path(task.shard, "parquet")).to_pylist()
            segments += SEGMENTS.read_parquet(task.stage_dir.shard_path(task.shard, "parquet")).to_pylist()
        self.stage_dir.write_params()
        write_coco_json(coco_from_segments(manifest, segments, dataset=self.dataset), self.output().path)


class PreviewShard(ShardTask):
    """`shard-NNNNNN/index.html`: every image of the shard with its segments coloured and expressions written."""

    stage = "use_preview"

    def requires(self) -> SegmentNMSShard:
        return SegmentNMSShard(shard=self.shard, **self.common())

    def content_params(self) -> dict:
        return {"segments": self.requires().stage_dir.hash}

    def inputs_to_verify(self) -> list[CommittedTask]:
        return [self.requires(), IngestShard(shard=self.shard, **self.common())]

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        segments_task = self.requires()
        rows = SEGMENTS.read_parquet(segments_task.stage_dir.shard_path(self.shard, "parquet")).to_pylist()
        ingest = IngestShard(shard=self.shard, **self.common()).stage_dir
        manifest = MANIFEST.read_parquet(ingest.shard_path(self.shard, "parquet"))
        preview_shard(ingest.shard_path(self.shard, "tar"), rows, self.stage_dir.path / f"shard-{self.shard:06d}",
                      title=f"{self.dataset} shard {self.shard}: USE segment–text pairs")
        return ShardOutput(in_count=len(manifest), ok_count=len(manifest))


class Preview(StageWrapper):
    shard_task = PreviewShard
