"""Exports of the USE segment–text pairs: one COCO JSON per dataset, and an HTML preview gallery per shard."""

from __future__ import annotations

from pathlib import Path

import luigi

from pseudoseg.models.registry import random_models_notice
from pseudoseg.pipeline.core.artifacts import ShardOutput, StageDir, atomic_write_bytes
from pseudoseg.pipeline.core.ingest import iter_ingested_samples
from pseudoseg.pipeline.use.export import (
    COCO_EXPORT_VERSION,
    IMAGES_DIR,
    coco_from_segments,
    export_image,
    write_coco_json,
)
from pseudoseg.pipeline.use.preview import index_html, preview_shard
from pseudoseg.schemas import MANIFEST, SEGMENTS
from pseudoseg.tasks.engine.base import (
    CommittedTask,
    DatasetTask,
    ProgressReporter,
    ShardTask,
    StageWrapper,
    model_settings,
    verify_inputs,
)
from pseudoseg.tasks.stages.catalog import declare
from pseudoseg.tasks.stages.ingest import IngestShard
from pseudoseg.tasks.stages.use import UseSegmentsShard


@declare(makes="USE segments as COCO JSON + the images at mask size", counts="segments", rows_are="COCO files",
         full_dag=True)
class ExportCoco(DatasetTask):
    """`coco.json` (images, RLE annotations with their expressions) that pycocotools and FiftyOne load, and beside
    it `data/<image_id>.<ext>`: every image at the size its masks were made on (`file_name` is relative to
    `data/`), so masks and pixels line up whatever the source was (a giant downsized at ingest, EXIF rotation)."""

    def requires(self) -> list[UseSegmentsShard]:
        return [UseSegmentsShard(shard=i, **self.common()) for i in range(self.shard_count)]

    @property
    def stage_dir(self) -> StageDir:
        return StageDir(self.root, self.dataset, "export_coco", {"segments": self.requires()[0].stage_dir.hash,
                                                                  "format": COCO_EXPORT_VERSION})

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.stage_dir.path / "coco.json"))

    def run(self) -> None:
        verify_inputs(self, [u for t in self.requires() for u in (t, IngestShard(shard=t.shard, **self.common()))])
        manifest, segments, file_names = [], [], {}
        data_dir = self.stage_dir.path / IMAGES_DIR
        for task in self.requires():
            ingest = IngestShard(shard=task.shard, **self.common()).stage_dir
            manifest += MANIFEST.read_parquet(ingest.shard_path(task.shard, "parquet")).to_pylist()
            segments += SEGMENTS.read_parquet(task.stage_dir.shard_path(task.shard, "parquet")).to_pylist()
            for image_id, payload, meta in iter_ingested_samples(str(ingest.shard_path(task.shard, "tar"))):
                data, ext = export_image(payload, meta)
                file_names[image_id] = f"{image_id}.{ext}"
                atomic_write_bytes(data_dir / file_names[image_id], data)
        self.stage_dir.write_params()
        coco = coco_from_segments(manifest, segments, dataset=self.dataset, file_names=file_names)
        write_coco_json(coco, self.output().path)  # last: the task's target


class UsePreviewShard(ShardTask):
    """`shard-NNNNNN/index.html`: every image of the shard with its segments coloured and expressions written."""

    stage = "use_preview"

    def requires(self) -> UseSegmentsShard:
        return UseSegmentsShard(shard=self.shard, **self.common())

    def content_params(self) -> dict:
        return {"segments": self.requires().stage_dir.hash, "banner": preview_banner()}

    def inputs_to_verify(self) -> list[CommittedTask]:
        return [self.requires(), IngestShard(shard=self.shard, **self.common())]

    def produce(self, progress: ProgressReporter) -> ShardOutput:
        segments_task = self.requires()
        rows = SEGMENTS.read_parquet(segments_task.stage_dir.shard_path(self.shard, "parquet")).to_pylist()
        ingest = IngestShard(shard=self.shard, **self.common()).stage_dir
        manifest = MANIFEST.read_parquet(ingest.shard_path(self.shard, "parquet"))
        preview_shard(ingest.shard_path(self.shard, "tar"), rows, self.stage_dir.path / f"shard-{self.shard:06d}",
                      title=f"{self.dataset} shard {self.shard}: USE segment–text pairs", banner=preview_banner())
        return ShardOutput(in_count=len(manifest), ok_count=len(manifest))


def preview_banner() -> str | None:
    """The notice a gallery of random models carries (the tiny preset: outputs are random by design)."""
    return random_models_notice(model_settings())


@declare(makes="one HTML gallery of the USE segments per shard")
class UsePreviewShards(StageWrapper):
    """Every shard's gallery (`shard-N/index.html`)."""

    shard_task = UsePreviewShard


@declare(makes="one page linking every shard's gallery", counts="images", rows_are="pages", full_dag=True)
class UsePreview(DatasetTask):
    """`use_preview/<hash>/index.html`: one page linking every shard's gallery, with its image count."""

    def requires(self) -> UsePreviewShards:
        return UsePreviewShards(**self.common())

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(UsePreviewShard(shard=0, **self.common()).stage_dir.path / "index.html"))

    def run(self) -> None:
        shards = []
        for task in self.requires().requires():
            count = len(list((task.stage_dir.path / f"shard-{task.shard:06d}").glob("*.png")))
            shards.append((f"shard-{task.shard:06d}/index.html", f"shard {task.shard}", count))
        page = index_html(f"{self.dataset}: USE segment–text pairs", shards, banner=preview_banner())
        atomic_write_bytes(Path(self.output().path), page.encode("utf-8"))
